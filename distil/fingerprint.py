"""What a model is, not how its path is spelled: a short hash of its folder's contents.

Saved predictions and the teacher's ledger records carry it, so `./runs/x/` and `runs/x` are one
model, and a folder retrained or re-exported in place is a new one. Cheap enough to compute at
every start, even for a 72B teacher: the small files (config, tokenizer, chat template) are hashed
whole; each weights file by its size, its header (tensor names, shapes, dtypes) and a 64 KiB
sample every 64 MiB plus its last 64 KiB. Training moves every weight, so the samples see it.
A hub name that is not a local folder is its own identity.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SAMPLE_BYTES = 64 * 1024
SAMPLE_STRIDE = 64 * 1024 * 1024
HEADER_BYTES = 1024 * 1024


def model_identity(name_or_path: str) -> str:
    """`sha256:<hex>` of a local model folder, or the name itself (a hub model)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name in SMALL_FILES or p.suffix in WEIGHT_SUFFIXES
                                                                   or p.name.endswith(".index.json")))
    signature = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(folder.resolve()), signature)


@lru_cache(maxsize=16)
def _fingerprint(folder: str, signature: tuple) -> str:  # signature: cache key (names, sizes, mtimes)
    digest = hashlib.sha256()
    for name, size, _ in signature:
        path = Path(folder) / name
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if not name.endswith(WEIGHT_SUFFIXES):
                digest.update(f.read())
                continue
            digest.update(f.read(min(size, HEADER_BYTES)))
            for offset in [*range(HEADER_BYTES, size, SAMPLE_STRIDE), max(0, size - SAMPLE_BYTES)]:
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()[:20]
