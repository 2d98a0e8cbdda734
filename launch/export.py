"""Export a training checkpoint (any ZeRO stage) as a Hugging Face model folder, fp32.

    python launch/export.py --checkpoint runs/tiny/checkpoint-40 --output runs/tiny/hf-step40

launch/train.py already exports the final model to train.output_dir/hf; use this for an
intermediate checkpoint, or for fp32 master weights of a bf16 run. The folder is built beside
--output and swapped in whole; "model: <folder>" is printed only after it passes the same check as
any model input. Exit status 0 = exported and checked, 2 = bad input, 1 = the export failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distil.atomic import blocking_file, foreign_files
from distil.checkpoints import check_checkpoint, export_checkpoint
from distil.model_check import MODEL_FILE, ModelInputError, check_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="output_dir/checkpoint-N written by launch/train.py")
    parser.add_argument("--output", required=True, help="folder for config, safetensors, tokenizer")
    args = parser.parse_args(argv)
    try:
        output = Path(args.output)
        blocker = blocking_file(output)
        if blocker == output:
            raise ModelInputError(f"--output {output} is a file; pass a folder for the model (created, or replaced "
                                  "as a whole)")
        if blocker:
            raise ModelInputError(f"--output {output}: {blocker} is a file; pass a folder that is not under a file, "
                                  "e.g. --output <train.output_dir>/hf-step<N>")
        foreign = foreign_files(output, MODEL_FILE.match)
        if foreign:  # e.g. the checkpoint itself, or a whole train.output_dir: replacing it would delete them
            raise ModelInputError(f"--output {output} holds more than a model ({foreign[:4]}), and the export replaces "
                                  "the folder as a whole; pass a new folder, e.g. <train.output_dir>/hf-step<N>")
        check_checkpoint(args.checkpoint)
        check_model_dir(args.checkpoint, "checkpoint to export", "--checkpoint", weights=False)  # its tokenizer
    except (FileNotFoundError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = export_checkpoint(args.checkpoint, output)
    check_model_dir(out, "exported model", "--output")  # announced only once it loads like any model input
    print(f"model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
