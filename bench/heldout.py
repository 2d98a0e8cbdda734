"""Held-out check: the demo's config and a model folder on English MultiClinSum reports the demo never
trained on, laid out as the test release names them (`multiclinsum_test_<N>_en.txt`).

    python bench/heldout.py                                   # the untrained SmolLM2 folder
    python bench/heldout.py --model runs/demo/student/hf      # the demo's student

Takes --reports reports of ../shared/data/multiclinsum_gs_train_en that are not in the bundled sample,
writes them (with their gold summaries) as a `multiclinsum_test_en` release folder, and runs the
project's own steps on it: `launch/prepare_data.py` with `data.split_fractions=[0,0,1]` (all test),
then `launch/evaluate.py`. Writes bench/results/heldout.json (ROUGE, BERTScore, empty predictions).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "multiclinsum_gs_train_en"


def release_folder(out: Path, reports: int) -> list[str]:
    """The first `reports` reports outside the bundled sample, renamed multiclinsum_test_<N>_en."""
    seen = {p.stem for p in (REPO / "data" / "sample").glob("*_en/fulltext/*.txt")}
    ids = [p.stem for p in sorted(SOURCE.glob("fulltext/*.txt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
           if p.stem not in seen][:reports]
    for sub in ("fulltext", "summaries"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for n, source_id in enumerate(ids, 1):
        name = f"multiclinsum_test_{n}_en"
        (out / "fulltext" / f"{name}.txt").write_text((SOURCE / "fulltext" / f"{source_id}.txt").read_text())
        (out / "summaries" / f"{name}_sum.txt").write_text((SOURCE / "summaries" / f"{source_id}_sum.txt").read_text())
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/smollm2_to_smollm2_demo_cpu.yaml")
    parser.add_argument("--model", default=".cache/SmolLM2-135M-Instruct")
    parser.add_argument("--reports", type=int, default=24)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "heldout")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "heldout.json")
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"error: {SOURCE} not found; this check needs the shared MultiClinSum English split")
    started = time.time()
    ids = release_folder(args.work / "multiclinsum_test_en", args.reports)
    prepared, eval_dir = args.work / "prepared", args.work / "eval"
    steps = [[sys.executable, "launch/prepare_data.py", "--config", args.config, "--input",
              str(args.work / "multiclinsum_test_en"), "--output", str(prepared), "data.split_fractions=[0,0,1]"],
             [sys.executable, "launch/evaluate.py", "--config", args.config, "--models", f"model={args.model}",
              f"data.prepared_dir={prepared}", f"eval.output_dir={eval_dir}", "eval.split=test",
              "eval.showcase_id=null"]]
    for step in steps:
        subprocess.run(step, cwd=REPO, check=True)
    with open(eval_dir / "per_report.csv") as f:
        rows = list(csv.DictReader(f))
    evaluation = json.loads((eval_dir / "scores.json").read_text())  # the evaluation's own counts and scores
    counts, scores = evaluation["counts"]["model"], evaluation["scores"]
    result = {"model": args.model, "config": args.config, "reports": len(rows), "source_ids": ids,
              "empty_predictions": counts["empty"], "predictions_read": counts["references"] - counts["missing"],
              "means": {m: round(sum(float(r[m]) for r in rows) / len(rows), 4)
                        for m in ("rougeL", "rouge1", "rouge2", "bertscore_f1", "copy4")},
              "scores": scores, "wall_s": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("reports", "empty_predictions", "means", "wall_s")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
