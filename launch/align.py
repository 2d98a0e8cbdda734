"""Align a distil-tuned student with DPO (TRL) on DeepSpeed ZeRO: its own worst samples rejected, the gold
(or teacher) summaries chosen. A step after Stage 2 and launch/make_pairs.py (docs/align.md).

    python launch/make_pairs.py --config CONFIG.yaml
    deepspeed --num_gpus N launch/align.py --config CONFIG.yaml [--deepspeed ds_configs/zero3.json]

Resumes from the newest complete checkpoint in align.output_dir (a finished run there is an error:
nothing would be trained); writes the aligned Hugging Face model to align.output_dir/hf. On CPU export
OMP_NUM_THREADS=1. Exit status 0 = aligned and the exported model checked, 2 = bad input (config, policy
or reference folder, pairs, a finished run) before any step, 1 = a failure a rerun resumes from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distil.align_config import policy_key, policy_path
from distil.atomic import blocking_file
from distil.checkpoints import FinishedRunError
from distil.config import ConfigError, check_training, load_config
from distil.data import DataError
from distil.ledger import LedgerError
from distil.logs import route_libraries
from distil.model_check import ModelInputError, check_model_dir
from distil.ranks import exit_now, log_per_rank, recipe_arguments, run_together


def main(argv: list[str] | None = None) -> int:
    parsed = recipe_arguments(__doc__, argv, "launch/align.py", "align.beta=0.2", "zero3")
    if parsed is None:
        return 2
    args, overrides = parsed
    try:
        cfg = load_config(args.config, overrides)
        check_training(without_ledger(cfg))  # the DeepSpeed JSON
        if blocker := blocking_file(cfg.align.output_dir):
            raise ConfigError(f"{cfg.source}: align.output_dir={cfg.align.output_dir}: {blocker} is a file; pass a "
                              "folder for the checkpoints and the aligned model")
        policy = policy_path(cfg.align, cfg.train.output_dir)
        check_model_dir(policy, "policy to align", policy_key(cfg.align))
        if cfg.align.reference:
            check_model_dir(cfg.align.reference, "DPO reference", "align.reference")
    except (ConfigError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_per_rank(Path(cfg.align.output_dir) / "align.log", args.verbose)
    from distil.align import align

    route_libraries()
    return run_together(lambda: align(cfg), (ConfigError, DataError, FinishedRunError, LedgerError))


def without_ledger(cfg):
    """The config as check_training sees an alignment run: no Stage 1 ledger is read."""
    from dataclasses import replace

    return replace(cfg, loss=replace(cfg.loss, gamma=1.0, kd_alpha=0.0, teacher_summary_weight=0.0))


if __name__ == "__main__":
    exit_now(main())
