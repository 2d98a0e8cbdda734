"""An append-only JSONL file that a killed job resumes: Stage 1's key-information ledger and its
top-k index, and the evaluation's predictions. One implementation, one error type.

A record is final once it is in the file. Appends are one write of whole lines followed by fsync,
so a job killed at any moment leaves every finished record on disk and at most one torn last line:
the next writer cuts it off if it does not parse (a complete last record that only lacks its
newline is kept). Each record has a key (`key(record) -> str`); a key already in the file is never
written again, so a restarted job skips what is done and every key ends with exactly one record.
An exclusive lock (released by the kernel even on SIGKILL) keeps two jobs from writing one file.
Pure Python.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class LedgerError(ValueError):
    """The file cannot be read as this program wrote it, or another job holds it; the message says what to do."""


class LedgerLockedError(LedgerError):
    pass


def _parse(path: Path, data: bytes) -> tuple[list[dict], int]:
    """(records, bytes of the file they span); an unparsable last line is left out, one in the middle is an error."""
    records, end = [], 0
    lines = data.splitlines(keepends=True)
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if lineno == len(lines) and not line.endswith(b"\n"):
                    break  # torn: the job died in the middle of this write
                raise LedgerError(f"{path}:{lineno}: not valid JSON in the middle of the file; it was edited by hand "
                                  "or by another program; restore it or move it aside") from None
        end += len(line)
    return records, end


def read_ledger(path: str | Path) -> list[dict]:
    """The records of a ledger without writing to it (a torn last line is skipped, not cut); [] if absent."""
    path = _not_a_folder(Path(path))
    return _parse(path, path.read_bytes())[0] if path.is_file() else []


def _not_a_folder(path: Path) -> Path:
    if path.is_dir():
        raise LedgerError(f"{path} is a folder, but it names a ledger file (JSONL), e.g. runs/key_info.jsonl; set "
                          "data.key_info_path (or eval.output_dir) to a file path")
    return path


class Ledger:
    """Append-only, fsync'd JSONL with resume by `key`. Use as a context manager."""

    def __init__(self, path: str | Path, key: Callable[[dict], str]):
        self.path, self.key = _not_a_folder(Path(path)), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise LedgerLockedError(f"{self.path}: another annotation job or evaluation is writing this file; wait for "
                                    "it to finish or stop it (ray job stop, scancel), or write elsewhere "
                                    "(data.key_info_path, eval.output_dir)") from None
        self.records = self._read_and_repair()
        self.done: set[str] = set()
        for lineno, record in enumerate(self.records, 1):
            if key(record) in self.done:
                raise LedgerError(f"{self.path}: record {lineno} (id {record.get('id')!r}) is written twice; the file "
                                  "was merged or edited by another program; keep one of the two and rerun")
            self.done.add(key(record))
        self._file = open(self.path, "a", encoding="utf-8")

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, end = _parse(self.path, data)
        with open(self.path, "r+b") as f:
            if end < len(data):
                log.warning("%s: cutting off a torn last line (%d bytes) left by a killed job", self.path,
                            len(data) - end)
                f.truncate(end)
            elif data and not data.endswith(b"\n"):  # a whole last record: keep it, end its line
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                return records
            f.flush()
            os.fsync(f.fileno())
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Write records durably; skip any whose key is already in the file."""
        fresh = []
        for record in records:
            key = self.key(record)
            if key not in self.done:
                self.done.add(key)
                fresh.append(record)
        if not fresh:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.extend(fresh)

    def close(self) -> None:
        self._file.close()
        self._lock.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
