"""Quality bench: does distil-tuning make a better student? Arms from the same base model.

    python bench/quality.py                       # SmolLM2 teaches itself, real English gold standard, CPU
    python bench/quality.py --trained-teacher     # a SmolLM2 teacher that knows more (below), CPU, hours
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
With a trained teacher (--trained-teacher): the teacher is SmolLM2 fine-tuned by the project's own Stage 2
(summaries only, --teacher-epochs) on a teacher split of the training reports that the student never sees;
the next --unlabelled-reports after the student's --train-reports lose their summaries (data/unlabelled.jsonl),
the --teacher-reports after them are the teacher's (defaults 60 / 200 / 214: the whole training split).
Why 60: SmolLM2-135M trained on 214 reports for 4 epochs scores 25.5 ROUGE-L, no more than the student
trained on 160 reports with matched compute (25.6, bench/results/quality.json): this model's score levels
off with data, so the teacher's lead has to come from the student having fewer labels than the teacher. Stage 1 runs with that teacher (key information of the
train and unlabelled reports, teacher.summarize for the unlabelled ones, top-k), and three arms join:
  seqkd             gamma = 1 plus the teacher's summaries of the unlabelled reports (sequence-level KD,
                    loss.teacher_summary_weight = --teacher-summary-weight)
  distil_seqkd      `distil` plus the teacher's summaries
  teacher           the teacher itself: the score to transfer
and standard_matched is matched to the largest distillation arm. Every distillation arm is paired with
standard_matched, and `gap_closed.<arm>` = (arm - standard_matched) / (teacher - standard_matched).
After Stage 2 (docs/align.md), from arms already done, each paired with its parents (`parents` in its result):
  merged            the linear soup (1:1, launch/merge.py) of the best distillation arm by ROUGE-L and
                    standard_matched
  dpo               the best fine-tuned arm aligned with DPO (launch/make_pairs.py, launch/align.py): its own
                    worst samples of the labelled and unlabelled reports rejected, the gold (teacher) summaries
                    chosen; --dpo-learning-rate, --dpo-beta, --dpo-samples (samples per report)
And on-policy distillation (docs/onpolicy.md):
  onpolicy          distil_kd's examples over --onpolicy-rounds rounds (one pass in all: its supervised tokens),
                    each round the student answering its share of the train and unlabelled reports, the teacher
                    grading every sampled token (launch/onpolicy.py; weight --onpolicy-weight, divergence
                    --onpolicy-beta); paired with standard_matched and distil_kd, per-round seconds recorded
  onpolicy_after_kd distil_kd's student, then --onpolicy-rounds rounds of its own samples graded by the teacher
                    alone (weight 1: no supervised example again; the published order, on-policy after SFT);
                    paired with its parent distil_kd and with standard_matched
The teacher folder is not kept; its Stage 1 outputs and its fingerprint (teacher_model.json) are, so a
fresh clone trains the remaining arms without it.
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
TEACHER_ARMS = ("seqkd", "distil_seqkd", "teacher")  # with a trained teacher (--trained-teacher)
# several teachers: the trained one and --second-teacher, combined (distil/combine.py); each against the single
# trained teacher's arm it extends
MULTI_ARMS = {"multi_each": "distil", "multi_best_grounded": "distil", "multi_mixture": "distil_kd"}
# after Stage 2 (docs/align.md), from arms already done: `merged` = the linear soup of the best distillation arm and
# standard_matched, `dpo` = DPO of the best fine-tuned arm against its own worst samples; each paired with its parents
AFTER_ARMS = ("merged", "dpo")
# on-policy: the arm it starts from (None: the base model, distil_kd's supervised examples shared over the rounds)
ONPOLICY_ARMS = {"onpolicy": None, "onpolicy_after_kd": "distil_kd"}
DISTILLATION_ARMS = ("distil", "distil_kd", "seqkd", "distil_seqkd", *ONPOLICY_ARMS)
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
    """Paper split of the sources; the first --train-reports training reports (the split is shuffled) are the
    student's labelled split. With a trained teacher (--teacher-reports) the next --unlabelled-reports lose
    their summaries (data/unlabelled.jsonl) and the next --teacher-reports are the teacher's own training
    split (teacher_data/train.jsonl): three disjoint sets of reports; valid and test are the same for all."""
    data = args.work / "data"
    if (data / "subset.json").is_file():
        return data
    full = args.work / "data_full"
    run([sys.executable, "launch/prepare_data.py", "--config", args.config, "--output", str(full), *args.overrides],
        args.work / "logs" / "prepare.log", env)
    train = read_jsonl(full / "train.jsonl")
    keep = train[:args.train_reports] if args.train_reports else train
    subset = {"train_reports": len(keep), "of": len(train)}
    folders = [data]
    if args.teacher_reports:
        start, end = len(keep), len(keep) + args.unlabelled_reports + args.teacher_reports
        if not args.train_reports or end > len(train):
            raise SystemExit(f"error: --train-reports {args.train_reports} + --unlabelled-reports "
                             f"{args.unlabelled_reports} + --teacher-reports {args.teacher_reports} must be at most "
                             f"the {len(train)} training reports (and --train-reports above 0)")
        unlabelled = train[start:start + args.unlabelled_reports]
        write_jsonl(data / "unlabelled.jsonl", [dict(r, summary=None, split="unlabelled") for r in unlabelled])
        write_jsonl(args.work / "teacher_data" / "train.jsonl", train[start + args.unlabelled_reports:end])
        subset.update(unlabelled_reports=len(unlabelled), teacher_reports=end - start - len(unlabelled))
        folders.append(args.work / "teacher_data")
    write_jsonl(data / "train.jsonl", keep)
    for split in ("valid", "test"):
        rows = read_jsonl(full / f"{split}.jsonl")
        for folder in folders:
            write_jsonl(folder / f"{split}.jsonl",
                        rows[:args.test_reports] if split == "test" and args.test_reports else rows)
    (data / "subset.json").write_text(json.dumps(subset))
    return data


def train_teacher(args, common: list[str], env: dict) -> str:
    """The teacher that knows more: the student's own recipe (summaries only) on the teacher split, for
    --teacher-epochs. Returns the model to name as teacher.model: its folder, or, when the folder is gone
    (a fresh clone) but keep/teacher_model.json recorded it, its fingerprint: the Stage 1 outputs kept in
    --keep are selected by that (distil/fingerprint.py), so the arms train without retraining the teacher."""
    from distil.fingerprint import model_identity

    record, out = args.keep / "teacher_model.json", args.work / "teacher"
    if record.is_file() and not (out / "hf" / "config.json").is_file():
        return json.loads(record.read_text())["identity"]
    if not (out / "hf" / "config.json").is_file():
        t0 = time.time()
        run([*shlex.split(args.launcher), "launch/train.py", "--config", args.config, *common,
             f"data.prepared_dir={args.work / 'teacher_data'}", "loss.gamma=1.0", "loss.kd_alpha=0",
             f"train.num_epochs={args.teacher_epochs}", f"train.output_dir={out}"],
            args.work / "logs" / "train_teacher.log", {**env, "OMP_NUM_THREADS": "1"})
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"identity": model_identity(str(out / "hf")), "folder": str(out / "hf"),
                                      "epochs": args.teacher_epochs, "train_wall_s": round(time.time() - t0, 1),
                                      "reports": len(read_jsonl(args.work / "teacher_data" / "train.jsonl"))}) + "\n")
    return str(out / "hf")


def token_budget(cfg, data: Path, key_info: Path, gamma: float) -> dict:
    """Tokens the arm (its config `cfg`, loss.gamma = `gamma`) trains on per epoch: all (compute) and
    supervised (assistant answers)."""
    from transformers import AutoTokenizer

    from distil.config import teachers
    from distil.dataset import load_train_rows

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    _, stats = load_train_rows(tokenizer, str(data), str(key_info), gamma, cfg.train.max_length, cfg.train.pack_length,
                               teachers=teachers(cfg), text_rule=cfg.combine.text,
                               teacher_summary_weight=cfg.loss.teacher_summary_weight)
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


def best_arm(keep: Path, arms: tuple[str, ...], wanted_by: str) -> str:
    """Of `arms`, the one with the highest ROUGE-L among those recorded in `keep`."""
    scores = {a: json.loads((keep / f"{a}.json").read_text())["rougeL"] for a in arms if (keep / f"{a}.json").is_file()}
    if not scores:
        raise SystemExit(f"error: the {wanted_by} arm starts from one of {list(arms)}: run one first (--arms)")
    return max(scores, key=scores.get)


def trained(args, arm: str, wanted_by: str) -> Path:
    folder = args.work / arm / "hf"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: the {wanted_by} arm needs the model of arm {arm} ({folder}), gone from --work; "
                         f"delete {args.keep / (arm + '.json')} and rerun with --arms {arm} {wanted_by}")
    return folder


def merge_arms(args, common: list[str], env: dict) -> list[str]:
    """`merged`: the linear soup (1:1) of the best distillation arm and standard_matched; returns its parents."""
    parents = [best_arm(args.keep, DISTILLATION_ARMS, "merged"), "standard_matched"]
    folders = [trained(args, p, "merged") for p in parents]
    out = args.work / "merged" / "hf"
    if not (out / "config.json").is_file():
        models = "[" + ", ".join(f"{{path: {f}}}" for f in folders) + "]"
        run([sys.executable, "launch/merge.py", "--config", args.config, *common, "merge.method=linear",
             f"merge.models={models}", f"merge.output_dir={out}"], args.work / "logs" / "merge.log", env)
    return parents


def align_arm(args, common: list[str], max_new: int, env: dict) -> list[str]:
    """`dpo`: pairs from the best fine-tuned arm's own samples of the labelled and unlabelled reports (the teacher's
    summary chosen there), then DPO on DeepSpeed; returns its parent."""
    parent = best_arm(args.keep, ("standard_matched", *DISTILLATION_ARMS), "dpo")
    work = args.work / "dpo"
    overrides = [*common, f"align.policy={trained(args, parent, 'dpo')}", f"align.pairs_path={work / 'pairs.jsonl'}",
                 "align.splits=[train,unlabelled]", f"align.output_dir={work}", f"eval.max_new_tokens={max_new}",
                 f"align.learning_rate={args.dpo_learning_rate}", f"align.beta={args.dpo_beta}",
                 f"align.samples_per_report={args.dpo_samples}"]
    if not (work / "hf" / "config.json").is_file():
        run([sys.executable, "launch/make_pairs.py", "--config", args.config, *overrides],
            args.work / "logs" / "pairs_dpo.log", env)
        run([*shlex.split(args.launcher), "launch/align.py", "--config", args.config, *overrides],
            args.work / "logs" / "align_dpo.log", {**env, "OMP_NUM_THREADS": "1"})
    return [parent]


def pair_counts(work: Path) -> dict:
    """How many reports of the dpo arm gave a pair (status ok) and how many had none to give (same)."""
    rows = read_jsonl(work / "pairs.jsonl")
    return {"ok": sum(r["status"] == "ok" for r in rows), "same": sum(r["status"] == "same" for r in rows)}


def onpolicy_arm(args, arm: str, common: list[str], kd: list[str], gamma: float, env: dict) -> tuple[list[dict], float]:
    """launch/onpolicy.py with distil_kd's loss, from the base model (`onpolicy`) or from a trained arm at weight 1
    (`onpolicy_after_kd`); returns its rounds' records and its weight."""
    parent = ONPOLICY_ARMS[arm]
    start = [f"model.name_or_path={trained(args, parent, arm)}"] if parent else []
    weight = 1.0 if parent else args.onpolicy_weight
    out = args.work / arm
    if not (out / "hf" / "config.json").is_file():
        run([sys.executable, "launch/onpolicy.py", "--config", args.config, "--launcher", args.launcher, *common,
             *start, f"loss.gamma={gamma}", *kd, f"onpolicy.output_dir={out}", f"onpolicy.rounds={args.onpolicy_rounds}",
             f"onpolicy.weight={weight}", f"onpolicy.beta={args.onpolicy_beta}",
             "onpolicy.splits=[train,unlabelled]"], args.work / "logs" / f"{arm}.log", env)
    return [json.loads((out / f"round-{r:03d}" / "round.json").read_text()) for r in range(args.onpolicy_rounds)], weight


def record_pace(path: Path, key_info: Path, name: str) -> None:
    """Keep Stage 1's pace per teacher and pass (key information, summaries, top-k) from the run that did the
    work: a resumed run that had nothing to do leaves the measured one in place."""
    summary = json.loads(key_info.with_suffix(".summary.json").read_text())  # one teacher per Stage 1 run here
    passes = {"key_info": summary.get("this_run", {}), "teacher_summaries":
              summary.get("teacher_summaries", {}).get("this_run", {}), "topk": summary.get("topk", {})}
    kept = json.loads(path.read_text()) if path.is_file() else {}
    mine = kept.setdefault(name, {})
    for task, pace in passes.items():
        if pace.get("annotated") or pace.get("reports"):
            mine[task] = pace
    path.write_text(json.dumps(kept, indent=1) + "\n")


def eval_pace(eval_dir: Path, arm: str) -> dict:
    """The arm's generation pace in the evaluation (this machine): reports/s, tokens/s."""
    speed = next((r for r in json.loads((eval_dir / "scores.json").read_text()).get("speed", []) if r["model"] == arm),
                 None)
    return {"reports_per_s": round(speed["reports_per_s"], 4), "tokens_per_s": round(speed["tokens_per_s"], 1)} \
        if speed and "reports_per_s" in speed else {}


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
    parser.add_argument("--trained-teacher", action="store_true",
                        help="the teacher that knows more (see above): sets the defaults of --work, --out, --keep, "
                             "--unlabelled-reports, --teacher-reports and --arms to that bench's")
    parser.add_argument("--work", type=Path, help="scratch folder (default runs/quality, or runs/quality_teacher)")
    parser.add_argument("--out", type=Path, help="result (default bench/results/quality.json or quality_teacher.json)")
    parser.add_argument("--keep", type=Path,
                        help="the teacher's Stage 1 outputs and the finished arms' results (small; kept across clones; "
                             "default bench/results/quality/ or quality_teacher/)")
    parser.add_argument("--launcher", default=f"{Path(sys.executable).parent / 'deepspeed'} --num_gpus 2 "
                                              f"--master_port {free_port()}",
                        help="how Stage 2 is started (on a GPU node: deepspeed)")
    parser.add_argument("--train-reports", type=int,
                        help="first N of the train split, the student's labelled reports (default 160, with "
                             "--trained-teacher 60); 0 = all")
    parser.add_argument("--test-reports", type=int, default=0, help="first N of the test split; 0 = all (the bench)")
    parser.add_argument("--unlabelled-reports", type=int, help="trained teacher: the next N train reports, without "
                                                               "their summaries (default 200)")
    parser.add_argument("--teacher-reports", type=int, help="trained teacher: the next N train reports are its "
                                                            "training split (default 214; 0 = the self-teacher)")
    parser.add_argument("--teacher-epochs", type=float, default=4.0, help="trained teacher: its epochs")
    parser.add_argument("--teacher-summary-weight", type=float, default=1.0,
                        help="loss.teacher_summary_weight of the seqkd arms")
    parser.add_argument("--second-teacher", help="trained teacher: the other teacher of the multi_* arms (default: "
                                                 "the student's base model, model.name_or_path)")
    parser.add_argument("--arms", nargs="+", choices=ARMS + TEACHER_ARMS + tuple(MULTI_ARMS) + AFTER_ARMS + tuple(ONPOLICY_ARMS))
    parser.add_argument("--dpo-learning-rate", type=float, default=2e-6, help="align.learning_rate of the dpo arm")
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="align.beta of the dpo arm")
    parser.add_argument("--onpolicy-rounds", type=int, default=4, help="onpolicy.rounds of the onpolicy arm")
    parser.add_argument("--onpolicy-weight", type=float, default=0.5, help="onpolicy.weight (lambda) of the onpolicy arm")
    parser.add_argument("--onpolicy-beta", type=float, default=1.0, help="onpolicy.beta of the onpolicy arm (1 = reverse KL)")
    parser.add_argument("--dpo-samples", type=int, default=4,
                        help="align.samples_per_report of the dpo arm (its rejected answer is the worst of them)")
    parser.add_argument("--kd-alpha", type=float, default=1.0, help="loss.kd_alpha of the distil_kd arm")
    parser.add_argument("--kd-beta", type=float, default=0.5, help="loss.kd_beta of the distil_kd arm (0.5 = JSD)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every step, e.g. train.max_steps=2")
    args = parser.parse_args(argv)
    name = "quality_teacher" if args.trained_teacher else "quality"
    args.work = (args.work or REPO / "runs" / name).resolve()
    args.keep = (args.keep or REPO / "bench" / "results" / name).resolve()
    args.out = args.out or REPO / "bench" / "results" / f"{name}.json"
    if args.teacher_reports is None:
        args.teacher_reports = 214 if args.trained_teacher else 0
    if args.unlabelled_reports is None:
        args.unlabelled_reports = 200 if args.teacher_reports else 0
    if args.train_reports is None:
        args.train_reports = 60 if args.trained_teacher else 160
    all_arms = ARMS + TEACHER_ARMS + tuple(MULTI_ARMS) + AFTER_ARMS + tuple(ONPOLICY_ARMS) if args.teacher_reports else ARMS
    args.arms = args.arms or list(all_arms)
    if not args.teacher_reports and set(args.arms) - set(ARMS):
        raise SystemExit(f"error: arms {sorted(set(args.arms) - set(ARMS))} need a trained teacher "
                         "(--trained-teacher or --teacher-reports N)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cfg = load_config(args.config, args.overrides)
    started = time.time()

    data = prepare(args, env)
    settings = {"config": str(args.config), "train_reports": json.loads((data / "subset.json").read_text()),
                "test_reports": len(read_jsonl(data / "test.jsonl")), "overrides": args.overrides}
    if args.teacher_reports:
        settings.update(teacher_epochs=args.teacher_epochs, teacher_summary_weight=args.teacher_summary_weight)
    check_settings(args.keep / "settings.json", settings)
    key_info = args.keep / "key_info.jsonl"
    common = [f"data.prepared_dir={data}", f"data.key_info_path={key_info}", *args.overrides]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    max_new = covering_tokens(tokenizer, [r["summary"] for r in read_jsonl(data / "test.jsonl")])
    teacher = cfg.teacher.model
    if args.teacher_reports:
        teacher = train_teacher(args, common, env)
        # its summaries are decoded as the evaluation decodes every arm's (no penalty, the same budget)
        common += [f"teacher.model={teacher}", f"teacher.summary_max_new_tokens={max_new}",
                   "teacher.summary_repetition_penalty=1.0"]
    if any(arm in args.arms for arm in ("distil", "standard_matched", "distil_kd", "seqkd", "distil_seqkd")):
        if Path(teacher).is_dir() or not args.teacher_reports:  # else: the kept outputs of a teacher now gone
            splits = "[train,unlabelled]" if args.teacher_reports else "[train]"
            summarize = ["teacher.summarize=true"] if args.teacher_reports else []
            run([sys.executable, "launch/annotate.py", "--config", args.config, "--no-progress", *common,
                 f"teacher.splits={splits}", *summarize], args.work / "logs" / "annotate.log", env)
            record_pace(args.keep / "stage1_pace.json", key_info, "trained" if args.teacher_reports else "teacher")
    second = args.second_teacher or cfg.model.name_or_path
    if set(args.arms) & set(MULTI_ARMS):  # the second teacher's own Stage 1 (the trained one's is above)
        run([sys.executable, "launch/annotate.py", "--config", args.config, "--no-progress", *common,
             f"teacher.model={second}", "teacher.splits=[train,unlabelled]", "teacher.summarize=true"],
            args.work / "logs" / "annotate_second.log", env)
        record_pace(args.keep / "stage1_pace.json", key_info, "second")
    cfg = load_config(args.config, common[2:])
    epochs = cfg.train.num_epochs
    both = ["combine.name=trained", f"combine.teachers=[{{model: {second}, name: second, weight: 1.0}}]"]
    seqkd = [f"loss.teacher_summary_weight={args.teacher_summary_weight}"]
    kd = [f"loss.kd_alpha={args.kd_alpha}", f"loss.kd_beta={args.kd_beta}"]
    plan = {"base": None, "teacher": None, "standard": (1.0, []), "distil": (cfg.loss.gamma, []),
            "distil_kd": (cfg.loss.gamma, kd), "seqkd": (1.0, seqkd), "distil_seqkd": (cfg.loss.gamma, seqkd),
            "multi_each": (cfg.loss.gamma, [*both, "combine.text=each"]),
            "multi_best_grounded": (cfg.loss.gamma, [*both, "combine.text=best_grounded"]),
            "multi_mixture": (cfg.loss.gamma, [*both, "combine.text=each", *kd])}
    def arm_budget(arm: str) -> dict:
        gamma, overrides = plan[arm][:2]
        return token_budget(load_config(args.config, [*common[2:], *overrides]), data, key_info, gamma)

    budget = {"standard": arm_budget("standard")}
    if key_info.is_file():  # written by Stage 1 above; absent when only base / standard are asked for
        for arm in [a for a in ("distil", "seqkd", "distil_seqkd") if a in all_arms]:
            budget[arm] = arm_budget(arm)
        wanted = set(args.arms) & set(MULTI_ARMS)  # multi_mixture trains on multi_each's examples
        for arm in [a for a in ("multi_each", "multi_best_grounded") if a in wanted or (a == "multi_each" and wanted)]:
            budget[arm] = arm_budget(arm)
        largest = max((b for arm, b in budget.items() if not arm.startswith("multi")), key=lambda b: b["supervised"])
        plan["standard_matched"] = (1.0, [], round(epochs * largest["supervised"] / budget["standard"]["supervised"], 3))
    budget_of = {"distil_kd": "distil", "standard_matched": "standard", "multi_mixture": "multi_each"}

    results_dir = args.keep
    results_dir.mkdir(parents=True, exist_ok=True)
    for arm in args.arms:
        result_file = results_dir / f"{arm}.json"
        model = {"base": cfg.model.name_or_path, "teacher": teacher}.get(arm, str(args.work / arm / "hf"))
        if result_file.is_file():
            refresh_kept(result_file, arm, args.work / "eval" / arm,
                         lambda: evaluate_arm(args, arm, model, common, max_new, env))
            continue
        t0 = time.time()
        train_tokens = {"supervised": 0, "tokens": 0, "epochs": 0}
        parents = []
        if arm == "merged":
            parents = merge_arms(args, common, env)
        elif arm == "dpo":
            parents = align_arm(args, common, max_new, env)
        elif arm in ONPOLICY_ARMS:
            rounds, weight = onpolicy_arm(args, arm, common, kd, cfg.loss.gamma, {**env, "OMP_NUM_THREADS": "1"})
            train_tokens = {**budget["distil"], "epochs": 1.0}  # after_kd: its parent's, none of its own
            parents = [ONPOLICY_ARMS[arm]] if ONPOLICY_ARMS[arm] else []
        elif plan[arm] is not None:
            gamma, arm_overrides, *arm_epochs = plan[arm]
            arm_epochs = arm_epochs[0] if arm_epochs else epochs
            out = args.work / arm
            if not (out / "hf" / "config.json").is_file():
                run([*shlex.split(args.launcher), "launch/train.py", "--config", args.config, *common,
                     f"loss.gamma={gamma}", f"train.num_epochs={arm_epochs}", f"train.output_dir={out}", *arm_overrides],
                    args.work / "logs" / f"train_{arm}.log", {**env, "OMP_NUM_THREADS": "1"})
            per_epoch = budget[budget_of.get(arm, arm)]
            train_tokens = {k: round(per_epoch[k] * arm_epochs) for k in ("supervised", "tokens")}
            train_tokens["epochs"] = arm_epochs
        elif arm == "teacher":
            teacher_record = json.loads((args.keep / "teacher_model.json").read_text())
            train_tokens["epochs"] = teacher_record["epochs"]
        train_s = time.time() - t0
        eval_dir = evaluate_arm(args, arm, model, common, max_new, env)
        means, per_report, gold = arm_result(eval_dir, arm)
        result = {**means, "gold_summaries": gold, "n": len(per_report),
                  "train_tokens": train_tokens["supervised"],
                  "train_tokens_all": train_tokens["tokens"], "epochs": train_tokens["epochs"],
                  "wall_s": round(time.time() - t0, 1), "train_wall_s": round(train_s, 1),
                  **({"parents": parents} if parents else {}), "eval_pace": eval_pace(eval_dir, arm),
                  **({"onpolicy": {"rounds": rounds, "weight": weight, "beta": args.onpolicy_beta}}
                     if arm in ONPOLICY_ARMS else {}),
                  **({"dpo": {"learning_rate": args.dpo_learning_rate, "beta": args.dpo_beta,
                              "samples_per_report": args.dpo_samples, "pairs": pair_counts(args.work / "dpo")}}
                     if arm == "dpo" else {}),
                  **({"kd": {"alpha": args.kd_alpha, "beta": args.kd_beta, "temperature": 1.0,
                             "topk": cfg.teacher.topk_logprobs, "store": store_size(key_info)}}
                     if arm == "distil_kd" else {}),
                  "per_report": per_report}
        result_file.write_text(json.dumps(result))
        print(f"{arm}: " + ", ".join(f"{m} {means[m]:.2f}" for m in METRICS) + f" ({result['wall_s']:.0f} s)",
              flush=True)

    done = {arm: json.loads((results_dir / f"{arm}.json").read_text()) for arm in all_arms
            if (results_dir / f"{arm}.json").is_file()}
    pairs = PAIRS if not args.teacher_reports else tuple(
        (arm, "standard_matched") for arm in (*DISTILLATION_ARMS, "teacher"))
    pairs += (("onpolicy", "distil_kd"),) if args.teacher_reports else ()
    pairs += tuple((arm, parent) for arm in (*AFTER_ARMS, *ONPOLICY_ARMS) if arm in done
                   for parent in done[arm].get("parents", []))
    multi = {f"{arm}_minus_best_single": paired(done[arm]["per_report"], done[single]["per_report"],
                                                cfg.eval.bootstrap_samples, cfg.eval.seed)
             for arm, single in MULTI_ARMS.items() if arm in done and single in done}
    report = {
        "config": args.config, "model": cfg.model.name_or_path, "teacher": teacher,
        "train_reports": json.loads((data / "subset.json").read_text()), "test_reports": len(read_jsonl(data / "test.jsonl")),
        "eval_max_new_tokens": max_new, "eval_max_new_tokens_rule": "95th percentile of the test references' tokens + 1, up to x32",
        "tokens_per_epoch": budget, "gamma_distil": cfg.loss.gamma, "scale": "points (0-100)",
        "lower_is_better": list(LOWER_IS_BETTER),
        "gold_summaries": next((r["gold_summaries"] for r in done.values() if "gold_summaries" in r), None),
        "machine": f"{os.cpu_count()} CPUs" + (" + GPU" if _has_cuda() else ""), "date": time.strftime("%Y-%m-%d"),
        "this_run_wall_s": round(time.time() - started, 1),
        **({"teacher_model": json.loads((args.keep / "teacher_model.json").read_text()),
            "teacher_summary_weight": args.teacher_summary_weight} if args.teacher_reports else {}),
        **{arm: {k: v for k, v in r.items() if k != "per_report"} for arm, r in done.items()},
        "paired": {f"{a}_minus_{b}": paired(done[a]["per_report"], done[b]["per_report"],
                                            cfg.eval.bootstrap_samples, cfg.eval.seed)
                   for a, b in pairs if a in done and b in done} | multi,
        **({"second_teacher": second} if set(done) & set(MULTI_ARMS) else {}),
        **({"stage1_pace": json.loads((args.keep / "stage1_pace.json").read_text())}
           if (args.keep / "stage1_pace.json").is_file() else {}),
    }
    if args.teacher_reports and "teacher" in done and "standard_matched" in done:
        report["gap_closed"] = gap_closed(done, "standard_matched", "teacher", METRICS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("paired", "gap_closed") if k in report}, indent=1))
    return 0


def gap_closed(done: dict[str, dict], floor: str, teacher: str, metrics) -> dict[str, dict[str, float]]:
    """Per distillation arm and metric, (arm - floor) / (teacher - floor) of the means: 1 = as good as the
    teacher, 0 = no better than the floor; null where the teacher is not better than the floor."""
    out = {}
    for arm in (*DISTILLATION_ARMS, *MULTI_ARMS, *AFTER_ARMS):
        if arm in done:
            out[arm] = {}
            for m in (m for m in metrics if all(m in done[a] for a in (arm, floor, teacher))):
                gap = done[teacher][m] - done[floor][m]
                gain = done[arm][m] - done[floor][m]
                better = gap < 0 if m in LOWER_IS_BETTER else gap > 0
                out[arm][m] = round(gain / gap, 3) if better else None
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
