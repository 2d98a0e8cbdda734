"""Export a training checkpoint (any ZeRO stage) as a Hugging Face model folder, fp32.

    python launch/export.py --checkpoint runs/tiny/checkpoint-40 --output runs/tiny/hf-step40

launch/train.py already exports the final model to train.output_dir/hf; use this for an
intermediate checkpoint, or for fp32 master weights of a bf16 run.
"""

from __future__ import annotations

import argparse
import sys

from distil.checkpoints import check_checkpoint, export_checkpoint
from distil.model_check import ModelInputError, check_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="output_dir/checkpoint-N written by launch/train.py")
    parser.add_argument("--output", required=True, help="folder for config, safetensors, tokenizer")
    args = parser.parse_args(argv)
    try:
        check_checkpoint(args.checkpoint)
        check_model_dir(args.checkpoint, "checkpoint to export", "--checkpoint", weights=False)  # its tokenizer
        out = export_checkpoint(args.checkpoint, args.output)
    except (FileNotFoundError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
