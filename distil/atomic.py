"""Outputs a kill cannot leave half-written: a file is written beside its place and renamed over it;
a folder of several files (prepared splits, an exported model) is built beside its place and swapped
in with one rename, so a reader sees the whole old folder or the whole new one, never a mix.

A folder swap over an existing folder uses Linux's renameat2(RENAME_EXCHANGE) (one atomic step);
where that call is missing the old folder is renamed aside first, leaving a window of one rename
in which the output is absent (never mixed). Leftovers of a killed build (`.<name>.new-*`,
`.<name>.old-*`) are removed by the next publish.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def blocking_file(folder: str | Path) -> Path | None:
    """The file that stands where `folder` or one of its parents must be a folder, or None: checked before
    a job starts, so it ends in one message instead of a traceback at its first write."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def foreign_files(folder: str | Path, own: Callable[[str], bool]) -> list[str]:
    """Names in `folder` that its writer does not own (`own(name)` False): publish_dir would delete them."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if not own(p.name)) if folder.is_dir() else []


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `path` through a temporary file, fsync'd, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=False))


def staging_dir(final: str | Path) -> Path:
    """An empty folder beside `final` (same file system, so the swap is a rename); stale ones are removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.new-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the call is not available."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def publish_dir(staged: str | Path, final: str | Path) -> None:
    """Put the folder `staged` (from staging_dir) at `final`, replacing a folder there as a whole."""
    staged, final = Path(staged), Path(final)
    if not final.exists():
        os.rename(staged, final)
        return
    if _exchange(staged, final):
        shutil.rmtree(staged)  # now the old folder
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    os.rename(final, old)
    os.rename(staged, final)
    shutil.rmtree(old)
