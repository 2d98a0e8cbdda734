"""Decoding that does not loop: what eval.repetition_penalty and eval.frequency_penalty do to ROUGE-L,
loops (repeat4) and inventions (unsupported_numbers, novel_terms), for the untrained SmolLM2 and the
demo's student, on the demo's 14 test reports and on bench/heldout.py's 24 English reports the demo
never trained on.

    make demo                                   # the student (runs/demo/student/hf) and the demo's data
    python bench/decoding.py --repetition-penalties 1.0 1.1 --frequency-penalties 0.5 1.0

One launch/evaluate.py run per (data set, setting) with both models, into runs/decoding/<set>/<setting>/
(rp1.1 = repetition_penalty 1.1, fp0.5 = frequency_penalty 0.5, the other off); a rerun skips the runs
that already wrote scores.json (and each evaluation resumes its predictions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from heldout import release_folder  # noqa: E402

MEASURES = ("rougeL", "rouge1", "bertscore_f1", "repeat4", "unsupported_numbers", "novel_terms", "copy4")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/smollm2_to_smollm2_demo_cpu.yaml")
    parser.add_argument("--base", default=".cache/SmolLM2-135M-Instruct")
    parser.add_argument("--student", default="runs/demo/student/hf")
    parser.add_argument("--repetition-penalties", type=float, nargs="+", default=[1.0, 1.1])
    parser.add_argument("--frequency-penalties", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--heldout-reports", type=int, default=24)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "decoding")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decoding.json")
    args = parser.parse_args()
    for path in (args.base, args.student):
        if not (REPO / path / "config.json").is_file():
            raise SystemExit(f"error: {path} is not a model folder; run `make demo` first (it trains the student)")
    heldout = args.work / "heldout"
    if not (heldout / "prepared" / "test.jsonl").is_file():
        release_folder(heldout / "multiclinsum_test_en", args.heldout_reports)
        subprocess.run([sys.executable, "launch/prepare_data.py", "--config", args.config, "--input",
                        str(heldout / "multiclinsum_test_en"), "--output", str(heldout / "prepared"),
                        "data.split_fractions=[0,0,1]"], cwd=REPO, check=True)
    sets = {"demo_test": [], "heldout_en": [f"data.prepared_dir={heldout / 'prepared'}", "eval.showcase_id=null"]}
    settings = {f"rp{p:g}": {"repetition_penalty": p, "frequency_penalty": 0.0} for p in args.repetition_penalties}
    settings |= {f"fp{p:g}": {"repetition_penalty": 1.0, "frequency_penalty": p} for p in args.frequency_penalties}
    results = []
    for name, overrides in sets.items():
        for setting, decoding in settings.items():
            out = args.work / name / setting
            started = time.time()
            if not (out / "scores.json").is_file():
                subprocess.run([sys.executable, "launch/evaluate.py", "--config", args.config, "--models",
                                f"base={args.base}", f"student={args.student}", f"eval.output_dir={out}",
                                *(f"eval.{k}={v}" for k, v in decoding.items()), *overrides], cwd=REPO, check=True)
            scores = json.loads((out / "scores.json").read_text())
            for row in scores["scores"]:
                if row["lang"] != "all":
                    continue
                results.append({"set": name, "setting": setting, **decoding, "model": row["model"], "n": row["n"],
                                **{m: round(100 * row[m], 2) for m in MEASURES},
                                **{f"{m}_ci": [round(100 * row[f"{m}_lo"], 2), round(100 * row[f"{m}_hi"], 2)]
                                   for m in ("rougeL", "repeat4", "unsupported_numbers")},
                                "gold_repeat4": round(100 * row["ref_repeat4"], 2),
                                "gold_unsupported_numbers": round(100 * row["ref_unsupported_numbers"], 2),
                                "wall_s": round(time.time() - started, 1)})
            print(json.dumps([r for r in results if r["set"] == name and r["setting"] == setting]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "config": args.config, "base": args.base,
                                    "student": args.student, "points": "mean over reports x 100", "rows": results},
                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
