"""Stage 2: distil-tune a student on summarization + teacher key information.

    deepspeed --num_gpus 2 launch/train.py --config launch/configs/tiny_cpu.yaml --deepspeed ds_configs/zero3.json
    deepspeed --num_gpus 8 launch/train.py --config launch/configs/paper_qwen25_05b.yaml train.learning_rate=2e-5

Resumes from the newest complete checkpoint in train.output_dir (a finished run there is an error:
nothing would be trained); writes the consolidated Hugging Face model to train.output_dir/hf at the
end. eval.callback_steps > 0 adds the generation eval (eval/callback.py). On CPU export
OMP_NUM_THREADS=1. Exit status 0 = trained and (train.export) the exported model checked, 2 = bad
input (config, student model, ledger, finished run) before any step, 1 = a failure a rerun resumes from.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distil.checkpoints import FinishedRunError
from distil.config import ConfigError, check_training, load_config
from distil.data import DataError
from distil.ledger import LedgerError
from distil.logs import route_libraries, setup
from distil.model_check import ModelInputError, check_model_dir
from distil.ranks import close_process_groups, enable_stack_dumps, exit_now, leave_together
from distil.teacher_topk import TopkStoreError

LAUNCH_HINT = "deepspeed --num_gpus N launch/train.py --config CONFIG.yaml [--deepspeed ds_configs/zero2.json]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (overrides train.deepspeed)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--verbose", action="store_true", help="print DeepSpeed's and transformers' logs too")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. loss.gamma=1.0")
    args = parser.parse_args(argv)
    enable_stack_dumps()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(f"error: launch/train.py runs under the DeepSpeed launcher:\n  {LAUNCH_HINT}", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ([f"train.deepspeed={args.deepspeed}"] if args.deepspeed else [])
    try:
        cfg = load_config(args.config, overrides)
        check_training(cfg)
        check_model_dir(cfg.model.name_or_path, "student", "model.name_or_path")
    except (ConfigError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ["RANK"])
    # other ranks print errors only (their warnings repeat rank 0's); train.log holds every rank's lines
    setup(Path(cfg.train.output_dir) / "train.log", args.verbose, logging.INFO if rank == 0 else logging.ERROR,
          f"%(asctime)s rank{rank} %(name)s: %(message)s")
    from distil.trainer import train

    route_libraries()  # DeepSpeed and transformers log through handlers of their own

    try:
        callbacks = []
        if cfg.eval.callback_steps > 0:  # summaries of a validation subset every N steps (rank 0 generates)
            from eval.callback import GenerationEvalCallback

            callbacks.append(GenerationEvalCallback(cfg))
        hf_dir = train(cfg, callbacks)
        leave_together()
    except (ConfigError, DataError, FinishedRunError, TopkStoreError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_process_groups()
    if hf_dir:
        print(f"model: {hf_dir}")
    return 0


if __name__ == "__main__":
    exit_now(main())
