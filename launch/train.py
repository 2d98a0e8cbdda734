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

import sys
from pathlib import Path

from distil.checkpoints import FinishedRunError
from distil.config import ConfigError, check_training, load_config
from distil.data import DataError
from distil.ledger import LedgerError
from distil.logs import route_libraries
from distil.model_check import ModelInputError, check_model_dir
from distil.ranks import exit_now, log_per_rank, recipe_arguments, run_together
from distil.teacher_topk import TopkStoreError


def main(argv: list[str] | None = None) -> int:
    parsed = recipe_arguments(__doc__, argv, "launch/train.py", "loss.gamma=1.0")
    if parsed is None:
        return 2
    args, overrides = parsed
    try:
        cfg = load_config(args.config, overrides)
        check_training(cfg)
        check_model_dir(cfg.model.name_or_path, "student", "model.name_or_path")
    except (ConfigError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_per_rank(Path(cfg.train.output_dir) / "train.log", args.verbose)
    from distil.trainer import train

    route_libraries()  # DeepSpeed and transformers log through handlers of their own

    def work():
        callbacks = []
        if cfg.eval.callback_steps > 0:  # summaries of a validation subset every N steps (rank 0 generates)
            from eval.callback import GenerationEvalCallback

            callbacks.append(GenerationEvalCallback(cfg))
        return train(cfg, callbacks)

    return run_together(work, (ConfigError, DataError, FinishedRunError, TopkStoreError, LedgerError))


if __name__ == "__main__":
    exit_now(main())
