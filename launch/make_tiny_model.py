"""Build the tiny random Qwen2 student named by a config (CPU demo and tests; no hub needed).

    python launch/make_tiny_model.py --config launch/configs/tiny_cpu.yaml

Writes model.name_or_path with the shape in model.tiny and a tokenizer trained on the
prepared training reports and summaries (run launch/prepare_data.py first). The folder is built
beside its place, checked like any model input (distil/model_check.py) and swapped in whole; a folder
already there counts as done only when it passes that check, else it is built again (e.g. a run
killed half way through saving left config.json alone).
Exit status 0 = the folder is there and checked, 2 = bad input (config, no prepared data, a path
under a file, a folder holding more than a model), 1 = the built folder failed its check (rerun).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from distil.atomic import blocking_file, foreign_files, publish_dir, staging_dir
from distil.config import ConfigError, load_config
from distil.data import DataError, read_prepared
from distil.model_check import MODEL_FILE, ModelInputError, check_model_dir
from distil.tiny import make_tiny_model

KEY = "model.name_or_path"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists and is whole")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.tiny is None:
            raise ConfigError(f"{args.config}: model.tiny is not set; this config names a real model")
        out = Path(cfg.model.name_or_path)
        blocker = blocking_file(out)
        if blocker:
            raise ConfigError(f"{KEY}={out}: {blocker} is a file; name a folder for the tiny model")
        if out.is_dir() and not args.force:
            try:
                check_model_dir(out, "tiny model", KEY)
                print(f"model: {out} (exists, checked)")
                return 0
            except ModelInputError as exc:
                print(f"{out} is not a whole model, building it again: {exc}", file=sys.stderr)
        foreign = foreign_files(out, MODEL_FILE.match)
        if foreign:  # building replaces the folder as a whole: these would be deleted
            raise ConfigError(f"{KEY}={out} holds more than a model ({foreign[:4]}), and building the tiny "
                              "model replaces the folder as a whole; name a new folder, e.g. "
                              "model.name_or_path=runs/tiny/init")
        records = read_prepared(Path(cfg.data.prepared_dir) / "train.jsonl")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = [r["report"] for r in records] + [r["summary"] for r in records]
    staged = staging_dir(out)
    make_tiny_model(staged, texts, cfg.model.tiny, seed=cfg.train.seed)
    try:
        check_model_dir(staged, "tiny model", KEY)
    except ModelInputError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        print(f"error: the tiny model built for {out} fails the model check ({exc}); rerun", file=sys.stderr)
        return 1
    publish_dir(staged, out)
    print(f"model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
