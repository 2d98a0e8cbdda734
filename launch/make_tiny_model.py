"""Build the tiny random Qwen2 student named by a config (CPU demo and tests; no hub needed).

    python launch/make_tiny_model.py --config launch/configs/tiny_cpu.yaml

Writes model.name_or_path with the shape in model.tiny and a tokenizer trained on the
prepared training reports and summaries (run launch/prepare_data.py first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distil.config import ConfigError, load_config
from distil.data import DataError, read_prepared
from distil.tiny import make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.tiny is None:
            raise ConfigError(f"{args.config}: model.tiny is not set; this config names a real model")
        out = Path(cfg.model.name_or_path)
        if (out / "config.json").is_file() and not args.force:
            print(f"model: {out} (exists)")
            return 0
        records = read_prepared(Path(cfg.data.prepared_dir) / "train.jsonl")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = [r["report"] for r in records] + [r["summary"] for r in records]
    make_tiny_model(out, texts, cfg.model.tiny, seed=cfg.train.seed)
    print(f"model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
