"""Merge students of one base model into one (mergekit: linear soup, task arithmetic, TIES), a step after
Stage 2 (docs/align.md).

    python launch/merge.py --config CONFIG.yaml merge.output_dir=runs/merged \
        'merge.models=[{path: runs/gamma08/hf}, {path: runs/gamma10/hf}]'

The merged folder (with merge.yaml, the recipe) evaluates, exports and serves like any student. Runs on
CPU; the memory it needs is printed first (Qwen2.5-7B, two students and a base in bfloat16: about 6.4 GB).
Exit status 0 = merged and the result checked, 2 = bad input (config, a folder that is no model, models
of another architecture or tokenizer), 1 = the merge failed (rerun it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from distil.config import ConfigError, load_config
from distil.merge import MergeError, merge
from distil.model_check import ModelInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML with a merge section")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. merge.method=ties")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        out = merge(cfg.merge, cfg.model.name_or_path)
    except (ConfigError, MergeError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
