"""The key-information ledger: one JSONL file that Stage 1 appends to and Stage 2 reads.

A record is final once it is in the file. Appends are one write of whole lines followed by
fsync, so a job killed at any moment leaves every finished record on disk and at most one torn
last line, which the next open cuts off. A record is done for a run when its key
(id, teacher, prompt_version, sampling) is in the file; a restarted job skips those, so every
report ends with exactly one record per key. An exclusive lock (released by the kernel even on
SIGKILL) keeps two jobs from writing the same ledger. Pure Python: no Ray, no vLLM.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


def record_key(record_id: str, teacher: str, prompt_version: str, sampling: dict) -> str:
    """The identity of an annotation: same report, same teacher, same prompt text, same sampling."""
    return json.dumps([record_id, teacher, prompt_version, sampling], sort_keys=True, ensure_ascii=False)


def key_of(record: dict) -> str:
    return record_key(record["id"], record["teacher"], record["prompt_version"], record["sampling"])


class LedgerLockedError(RuntimeError):
    pass


class Ledger:
    """Append-only, fsync'd JSONL with resume by record key. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise LedgerLockedError(f"{self.path}: another annotation job is writing this ledger; wait for it "
                                    "to finish or stop it (ray job stop), or set data.key_info_path elsewhere") from None
        self.records = self._read_and_repair()
        self.done = {key_of(r) for r in self.records}
        self._file = open(self.path, "a", encoding="utf-8")

    def _read_and_repair(self) -> list[dict]:
        """Records on disk; a torn last line (the job died mid-write) is cut off."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, good_end = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                lineno = len(records) + 1
                raise ValueError(f"{self.path}:{lineno}: not valid JSON in the middle of the ledger; the file was "
                                 "edited by hand or by another program; restore it or move it aside") from None
            good_end += len(line)
        if good_end < len(data):
            log.warning("%s: cutting off a torn last line (%d bytes) left by a killed job", self.path,
                        len(data) - good_end)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Write records durably; skip any whose key is already in the ledger."""
        fresh = []
        for record in records:
            key = key_of(record)
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

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
