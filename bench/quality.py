"""Quality bench: does distil-tuning make a better student? Five arms from the same base model.

    python bench/quality.py                       # SmolLM2 on the real English gold standard, CPU (~90 min)
    python bench/quality.py --config launch/configs/paper_qwen25_05b.yaml --launcher deepspeed   # GPU node

Arms (same reports, seed and schedule; only what the arm names changes):
  base              no training
  standard          gamma = 1: summaries only (fine-tuning baseline)
  distil            gamma = loss.gamma of the config (0.8, the paper's best): summaries + the teacher's
                    key information, written by the project's own Stage 1 job (teacher.model)
  standard_matched  gamma = 1, more epochs, so it sees as many supervised tokens as `distil`: tells a
                    gain of the extraction task from a gain of more compute
  distil_kd         `distil` plus token-level distillation: the teacher's top-k next-token distributions
                    over both tasks' answers (stored by the same Stage 1 job, teacher.topk_logprobs),
                    loss.kd_alpha = --kd-alpha, generalized JSD with loss.kd_beta = --kd-beta
Each arm is evaluated on the whole test split with the project's evaluation (launch/evaluate.py);
eval.max_new_tokens is set to cover the reference summaries: the 95th percentile of the test
references' token lengths (+1 for the end-of-turn token), rounded up to 32. The training summaries
cannot set it: they are cropped (data.crop_summary_chars), the test references are not. Scores are in points (0-100); `paired.X_minus_Y` is
the mean per-report difference with a 95% bootstrap interval over the same reports. Beside ROUGE each
arm records what ROUGE misses (distil/faithfulness.py): unsupported_numbers, novel_terms, repeat4 —
LOWER is better for these three (listed under `lower_is_better`), so a negative paired difference
is a gain; `gold_summaries` holds the gold summaries' own rates on the same test reports. An arm
kept from before these metrics existed is scored again from its predictions when --work still holds
them (nothing is generated); otherwise it lacks them, and its pairs use the metrics both arms have.

Resumable: every step writes under --work and is skipped when done (prepared data, each arm's
training checkpoints and predictions). What a later rerun needs to pair the arms lives in --keep
(committed under bench/results/quality/, so a fresh clone resumes too): the teacher's key-info
ledger and each finished arm's result with its per-report scores. A run stopped partway
continues where it stopped; a rerun with other settings is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distil.config import load_config  # noqa: E402
from distil.data import read_jsonl, write_jsonl  # noqa: E402

ARMS = ("base", "standard", "distil", "standard_matched", "distil_kd")
METRICS = ("rougeL", "rouge1", "rouge2", "bertscore_f1", "copy4", "unsupported_numbers", "novel_terms", "repeat4")
LOWER_IS_BETTER = ("unsupported_numbers", "novel_terms", "repeat4")
GOLD = ("ref_copy4", "ref_unsupported_numbers", "ref_novel_terms", "ref_repeat4")  # the test references' own rates
PAIRS = (("distil", "base"), ("distil", "standard"), ("distil", "standard_matched"), ("distil_kd", "distil"))


def paired(a: dict[str, dict], b: dict[str, dict], samples: int, seed: int) -> dict[str, list[float]]:
    """Per metric [mean, lo, hi] of a - b over the reports both scored (points), resampled together; only the
    metrics both arms recorded (an arm kept from an older run may lack the newer ones)."""
    from eval.metrics import bootstrap_ci

    ids = sorted(set(a) & set(b))
    out = {}
    for m in (m for m in METRICS if all(m in a[i] and m in b[i] for i in ids)):
        diff = [a[i][m] - b[i][m] for i in ids]
        lo, hi = bootstrap_ci(diff, samples, seed)
        out[m] = [round(sum(diff) / len(diff), 3), round(lo, 3), round(hi, 3)]
    return out


def covering_tokens(tokenizer, summaries: list[str], quantile: float = 0.95, step: int = 32) -> int:
    """Generation budget that covers `quantile` of the reference summaries, rounded up to `step`."""
    lengths = sorted(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in summaries)
    k = min(len(lengths) - 1, math.ceil(quantile * len(lengths)) - 1)
    return step * math.ceil((lengths[k] + 1) / step)  # + 1: the end-of-turn token


def free_port() -> int:
    """A port nobody listens on now: DeepSpeed's default 29500 may be taken (a test run, another bench)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path, env: dict) -> None:
    """A step as a subprocess (vLLM, Ray and DeepSpeed own their processes); its log goes to a file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"error: step failed (exit {code}): {shlex.join(cmd)}\n  log: {log}")


def prepare(args, env: dict) -> Path:
    """Paper split of the sources; the first --train-reports training reports (the split is shuffled)."""
    data = args.work / "data"
    if (data / "subset.json").is_file():
        return data
    full = args.work / "data_full"
    run([sys.executable, "launch/prepare_data.py", "--config", args.config, "--output", str(full), *args.overrides],
        args.work / "logs" / "prepare.log", env)
    train = read_jsonl(full / "train.jsonl")
    keep = train[:args.train_reports] if args.train_reports else train
    write_jsonl(data / "train.jsonl", keep)
    for split in ("valid", "test"):
        rows = read_jsonl(full / f"{split}.jsonl")
        write_jsonl(data / f"{split}.jsonl", rows[:args.test_reports] if split == "test" and args.test_reports else rows)
    (data / "subset.json").write_text(json.dumps({"train_reports": len(keep), "of": len(train)}))
    return data


def token_budget(cfg, data: Path, key_info: Path, gamma: float) -> dict:
    """Tokens the arm trains on per epoch: all (compute) and supervised (assistant answers)."""
    from transformers import AutoTokenizer

    from distil.dataset import load_train_rows
    from distil.teacher_config import annotation_key

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    _, stats = load_train_rows(tokenizer, str(data), str(key_info), gamma, cfg.train.max_length, cfg.train.pack_length,
                               annotation=annotation_key(cfg.teacher))
    return {"tokens": stats.tokens, "supervised": stats.labelled_tokens, "rows": stats.rows}


def arm_result(eval_dir: Path, arm: str) -> tuple[dict, dict, dict]:
    """(means in points, per-report metrics in points, the gold summaries' mean GOLD rates in points) from the
    evaluation's per_report.csv."""
    per_report, gold = {}, {}
    with open(eval_dir / "per_report.csv") as f:
        for row in csv.DictReader(f):
            if row["model"] == arm:
                per_report[row["id"]] = {m: 100 * float(row[m]) for m in METRICS}
                gold[row["id"]] = {m: 100 * float(row[m]) for m in GOLD}
    means = {m: round(sum(r[m] for r in per_report.values()) / len(per_report), 3) for m in METRICS}
    return means, per_report, {m: round(sum(r[m] for r in gold.values()) / len(gold), 3) for m in GOLD}


def evaluate_arm(args, arm: str, model: str, common: list[str], max_new: int, env: dict) -> Path:
    """Evaluate the arm's model on the test split (resumable: kept predictions are not generated again)."""
    eval_dir = args.work / "eval" / arm
    run([sys.executable, "launch/evaluate.py", "--config", args.config, "--models", f"{arm}={model}", *common,
         f"eval.output_dir={eval_dir}", f"eval.max_new_tokens={max_new}", "eval.split=test"],
        args.work / "logs" / f"eval_{arm}.log", env)
    return eval_dir


def refresh_kept(result_file: Path, arm: str, eval_dir: Path, evaluate) -> None:
    """A kept arm recorded before some METRICS existed is scored again from its predictions when --work still
    holds them (`evaluate()` generates nothing then); without them it stays as it is and pairs skip what it lacks."""
    kept = json.loads(result_file.read_text())
    missing = [m for m in METRICS if m not in kept]
    if missing and (eval_dir / "predictions" / f"{arm}.jsonl").is_file():
        means, per_report, gold = arm_result(evaluate(), arm)
        result_file.write_text(json.dumps({**kept, **means, "gold_summaries": gold, "per_report": per_report}))
        print(f"{arm}: done before, scored again for {missing} ({result_file})", flush=True)
    else:
        print(f"{arm}: done before ({result_file})" + (f"; lacks {missing}: its predictions are gone" if missing else ""),
              flush=True)


def store_size(key_info: Path) -> dict:
    """Bytes on disk of the teacher's top-k store (arrays + index) per answer token it holds."""
    from distil.teacher_topk import TopkStore, store_dir

    folder = store_dir(key_info)
    tokens = sum(e.tokens for e in TopkStore(folder).entries.values())
    on_disk = sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith((".bin", ".jsonl")))
    return {"answer_tokens": tokens, "bytes": on_disk, "bytes_per_token": round(on_disk / max(tokens, 1), 1)}


def check_settings(path: Path, settings: dict) -> None:
    """The arms kept in --keep are only comparable with arms of the same data, config and overrides."""
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"error: {path} was written by a run with other settings ({path.read_text().strip()}; "
                         f"now {json.dumps(settings)}): pass another --keep, or delete that folder to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/smollm2_to_smollm2_quality_cpu.yaml")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    parser.add_argument("--keep", type=Path, default=REPO / "bench" / "results" / "quality",
                        help="the key-info ledger and the finished arms' results (small; kept across clones)")
    parser.add_argument("--launcher", default=f"{Path(sys.executable).parent / 'deepspeed'} --num_gpus 2 "
                                              f"--master_port {free_port()}",
                        help="how Stage 2 is started (on a GPU node: deepspeed)")
    parser.add_argument("--train-reports", type=int, default=160, help="first N of the train split; 0 = all")
    parser.add_argument("--test-reports", type=int, default=0, help="first N of the test split; 0 = all (the bench)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--kd-alpha", type=float, default=1.0, help="loss.kd_alpha of the distil_kd arm")
    parser.add_argument("--kd-beta", type=float, default=0.5, help="loss.kd_beta of the distil_kd arm (0.5 = JSD)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every step, e.g. train.max_steps=2")
    args = parser.parse_args(argv)
    args.work, args.keep = args.work.resolve(), args.keep.resolve()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cfg = load_config(args.config, args.overrides)
    started = time.time()

    data = prepare(args, env)
    settings = {"config": str(args.config), "train_reports": json.loads((data / "subset.json").read_text()),
                "test_reports": len(read_jsonl(data / "test.jsonl")), "overrides": args.overrides}
    check_settings(args.keep / "settings.json", settings)
    key_info = args.keep / "key_info.jsonl"
    common = [f"data.prepared_dir={data}", f"data.key_info_path={key_info}", *args.overrides]
    if any(arm in args.arms for arm in ("distil", "standard_matched", "distil_kd")):
        run([sys.executable, "launch/annotate.py", "--config", args.config, "--no-progress", *common,
             "teacher.splits=[train]"], args.work / "logs" / "annotate.log", env)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    max_new = covering_tokens(tokenizer, [r["summary"] for r in read_jsonl(data / "test.jsonl")])
    budget = {"standard": token_budget(cfg, data, key_info, 1.0)}
    epochs, matched_epochs = cfg.train.num_epochs, None
    if key_info.is_file():  # written by Stage 1 above; absent when only base / standard are asked for
        budget["distil"] = token_budget(cfg, data, key_info, cfg.loss.gamma)
        matched_epochs = round(epochs * budget["distil"]["supervised"] / budget["standard"]["supervised"], 3)
    kd = [f"loss.kd_alpha={args.kd_alpha}", f"loss.kd_beta={args.kd_beta}"]
    plan = {"base": None, "standard": (1.0, epochs, []), "distil": (cfg.loss.gamma, epochs, []),
            "standard_matched": (1.0, matched_epochs, []), "distil_kd": (cfg.loss.gamma, epochs, kd)}

    results_dir = args.keep
    results_dir.mkdir(parents=True, exist_ok=True)
    for arm in args.arms:
        result_file = results_dir / f"{arm}.json"
        if result_file.is_file():
            model = cfg.model.name_or_path if plan[arm] is None else str(args.work / arm / "hf")
            refresh_kept(result_file, arm, args.work / "eval" / arm,
                         lambda: evaluate_arm(args, arm, model, common, max_new, env))
            continue
        t0 = time.time()
        model = cfg.model.name_or_path
        train_tokens = {"supervised": 0, "tokens": 0, "epochs": 0}
        if plan[arm] is not None:
            gamma, arm_epochs, arm_overrides = plan[arm]
            out = args.work / arm
            if not (out / "hf" / "config.json").is_file():
                run([*shlex.split(args.launcher), "launch/train.py", "--config", args.config, *common,
                     f"loss.gamma={gamma}", f"train.num_epochs={arm_epochs}", f"train.output_dir={out}", *arm_overrides],
                    args.work / "logs" / f"train_{arm}.log", {**env, "OMP_NUM_THREADS": "1"})
            per_epoch = budget["standard" if gamma == 1.0 else "distil"]
            train_tokens = {k: round(per_epoch[k] * arm_epochs) for k in ("supervised", "tokens")}
            train_tokens["epochs"] = arm_epochs
            model = str(out / "hf")
        train_s = time.time() - t0
        means, per_report, gold = arm_result(evaluate_arm(args, arm, model, common, max_new, env), arm)
        result = {**means, "gold_summaries": gold, "n": len(per_report),
                  "train_tokens": train_tokens["supervised"],
                  "train_tokens_all": train_tokens["tokens"], "epochs": train_tokens["epochs"],
                  "wall_s": round(time.time() - t0, 1), "train_wall_s": round(train_s, 1),
                  **({"kd": {"alpha": args.kd_alpha, "beta": args.kd_beta, "temperature": 1.0,
                             "topk": cfg.teacher.topk_logprobs, "store": store_size(key_info)}}
                     if arm == "distil_kd" else {}),
                  "per_report": per_report}
        result_file.write_text(json.dumps(result))
        print(f"{arm}: " + ", ".join(f"{m} {means[m]:.2f}" for m in METRICS) + f" ({result['wall_s']:.0f} s)",
              flush=True)

    done = {arm: json.loads((results_dir / f"{arm}.json").read_text()) for arm in ARMS
            if (results_dir / f"{arm}.json").is_file()}
    report = {
        "config": args.config, "model": cfg.model.name_or_path, "teacher": cfg.teacher.model,
        "train_reports": json.loads((data / "subset.json").read_text()), "test_reports": len(read_jsonl(data / "test.jsonl")),
        "eval_max_new_tokens": max_new, "eval_max_new_tokens_rule": "95th percentile of the test references' tokens + 1, up to x32",
        "tokens_per_epoch": budget, "gamma_distil": cfg.loss.gamma, "scale": "points (0-100)",
        "lower_is_better": list(LOWER_IS_BETTER),
        "gold_summaries": next((r["gold_summaries"] for r in done.values() if "gold_summaries" in r), None),
        "machine": f"{os.cpu_count()} CPUs" + (" + GPU" if _has_cuda() else ""), "date": time.strftime("%Y-%m-%d"),
        "this_run_wall_s": round(time.time() - started, 1),
        **{arm: {k: v for k, v in r.items() if k != "per_report"} for arm, r in done.items()},
        "paired": {f"{a}_minus_{b}": paired(done[a]["per_report"], done[b]["per_report"],
                                            cfg.eval.bootstrap_samples, cfg.eval.seed)
                   for a, b in PAIRS if a in done and b in done},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("paired",)}, indent=1))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
