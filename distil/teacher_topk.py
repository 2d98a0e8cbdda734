"""The teacher's top-k next-token distributions: what Stage 1 stores and Stage 2 distils from.

A store is a folder next to the key-information ledger (`<data.key_info_path>` with `.topk` in place
of `.jsonl`), laid out like Megatron's indexed datasets:

    index.jsonl   one line per report: teacher, prompt version, sampling (with k), the teacher
                  tokenizer's fingerprint, and per task where its arrays are and which token
                  sequence they were computed on
    part-N.bin    the arrays, appended: per task top-k ids (int32 [n, k]) then log-probs (fp16 [n, k]),
                  n = the task's answer tokens (answer + end-of-turn, the tokens that carry a label)

Row j of a task's arrays is the teacher's distribution over the answer's token j, computed by
prefill over exactly the token sequence Stage 2 trains on (distil.tokenization.encode_example), so
the rows line up with the labelled positions of the packed rows one for one. Each answer token costs
6 * k bytes (120 at k = 20), plus its report's share of an index line.

An index line is written (fsync'd, through Stage 1's ledger) only after its arrays are on disk, so a
killed job leaves at most unreferenced bytes at the end of a part file, never a line without data.

The ids are stored as the teacher's engine gave them, over the teacher's whole vocabulary, which can be
wider than any tokenizer's: Qwen2.5-72B pads its embedding to 152,064 rows, its 0.5B-7B students to
151,936, for a tokenizer of 151,665. Stage 2 reads them through `keep_student_ids` (a store opened with
`vocab_size`): a column whose id no token has is dropped there, once per example on the host, and its
mass counts in the rest bucket of the KD term (distil/kd_loss.py). Pure Python + numpy: no Ray, no vLLM.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from distil.ledger import read_ledger
from distil.tokenization import answer_length

INDEX = "index.jsonl"
ID_DTYPE, LOGPROB_DTYPE = np.dtype("<i4"), np.dtype("<f2")
MISSING_ID = -1  # distil.kd_loss.MISSING_ID (kept equal by a test; this module imports no torch)


class TopkStoreError(ValueError):
    """A store that cannot serve this training run; the message names the file or record and the fix."""


def store_dir(key_info_path: str | Path) -> Path:
    """Where the top-k store of a key-information ledger lives."""
    return Path(key_info_path).with_suffix(".topk")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the token -> id map (added tokens included): two tokenizers with the same fingerprint
    give the same ids the same meaning."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def sequence_fingerprint(input_ids: list[int]) -> str:
    """Identity of the exact token sequence a task's distributions were computed on."""
    return hashlib.sha256(np.asarray(input_ids, dtype=ID_DTYPE).tobytes()).hexdigest()[:16]


def token_count(tokenizer) -> int:
    """Ids a tokenizer can produce: 0 .. its largest id (added tokens included)."""
    return max(tokenizer.get_vocab().values()) + 1


def keep_student_ids(ids: np.ndarray, log_probs: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One task's [n, k] arrays with every id >= vocab_size (a padded row of the teacher's embedding, no
    token of the shared tokenizer) made MISSING_ID with log-prob -inf: the top-k among the ids below
    vocab_size, the rest of the mass left to the rest bucket. Arrays without such ids come back as they are."""
    outside = ids >= vocab_size
    if not outside.any():
        return ids, log_probs
    return (np.where(outside, MISSING_ID, ids).astype(ID_DTYPE),
            np.where(outside, -np.inf, log_probs).astype(LOGPROB_DTYPE))


def to_bytes(ids: np.ndarray, log_probs: np.ndarray) -> bytes:
    """One task's arrays [n, k] as stored."""
    return np.ascontiguousarray(ids, dtype=ID_DTYPE).tobytes() + np.ascontiguousarray(log_probs, dtype=LOGPROB_DTYPE).tobytes()


@lru_cache(maxsize=64)
def _part(path: str) -> np.memmap:
    return np.memmap(path, dtype=np.uint8, mode="r")


@dataclass(frozen=True)
class TopkEntry:
    """Where one task's arrays of one report are; `read` maps them from disk (the page cache is
    shared by the ranks of a node) and, with `vocab_size`, keeps the ids below it (keep_student_ids)."""
    path: str
    offset: int
    tokens: int
    k: int
    sequence: str
    vocab_size: int | None = None

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.tokens * self.k
        data = _part(self.path)
        ids_end = self.offset + n * ID_DTYPE.itemsize
        ids = np.frombuffer(data[self.offset:ids_end], dtype=ID_DTYPE).reshape(self.tokens, self.k)
        log_probs = np.frombuffer(data[ids_end:ids_end + n * LOGPROB_DTYPE.itemsize], dtype=LOGPROB_DTYPE)
        log_probs = log_probs.reshape(self.tokens, self.k)
        if ids.size and ids.min() < 0:
            raise TopkStoreError(f"{self.path}: negative token id {int(ids.min())} in the arrays at byte {self.offset}: "
                                 "the store is damaged; rerun Stage 1 into a fresh data.key_info_path")
        return keep_student_ids(ids, log_probs, self.vocab_size) if self.vocab_size else (ids, log_probs)


@dataclass(frozen=True)
class MixedEntry:
    """Several teachers' entries of one token sequence (the gold summary every teacher scored), read as their
    weighted mixture (distil.combine.mix_topk): k = the sum of their k, MISSING_ID where a row has fewer ids."""
    entries: tuple[TopkEntry, ...]
    weights: tuple[float, ...]
    vocab_size: int | None = None

    @property
    def k(self) -> int:
        return sum(e.k for e in self.entries)

    @property
    def tokens(self) -> int:
        return self.entries[0].tokens

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        from distil.combine import mix_topk

        ids, log_probs = mix_topk([e.read() for e in self.entries], list(self.weights))
        ids, log_probs = ids.astype(ID_DTYPE), log_probs.astype(np.float32)
        return keep_student_ids(ids, log_probs, self.vocab_size) if self.vocab_size else (ids, log_probs)


class TopkStore:
    """The index of a store: (teacher, report id, task) -> TopkEntry, plus each teacher tokenizer's fingerprint.
    `vocab_size` (Stage 2: token_count of the student's tokenizer, which check_tokenizer proves is the
    teacher's) makes every entry read only the ids below it. Several teachers share a store (their index
    lines are keyed by teacher); `teachers` (identity -> weight; distil.fingerprint) keeps the ones a run
    trains with, None keeps all."""

    def __init__(self, folder: str | Path, vocab_size: int | None = None, teachers: dict[str, float] | None = None):
        self.folder = Path(folder)
        self.vocab_size = vocab_size
        index = self.folder / INDEX
        if not index.is_file():
            raise TopkStoreError(f"{index}: no teacher top-k store; run Stage 1 (launch/annotate.py) with "
                                 "teacher.topk_logprobs > 0 and the same data.key_info_path, or set loss.kd_alpha: 0")
        self.entries: dict[tuple[str, str, str], TopkEntry] = {}
        self.tokenizers: dict[str, set[str]] = {}  # teacher -> tokenizer fingerprints
        self.k: dict[str, set[int]] = {}  # teacher -> top-k sizes
        self.names: dict[str, str] = {}  # teacher -> teacher.model as written
        for row in read_ledger(index):  # a torn last line of a killed job is skipped (Stage 1 cuts it on resume)
            teacher = row["teacher"]
            if teachers is not None and teacher not in teachers:
                continue
            self.names.setdefault(teacher, row.get("teacher_model", teacher))
            self.tokenizers.setdefault(teacher, set()).add(row["tokenizer"])
            self.k.setdefault(teacher, set()).add(row["k"])
            for task, place in row["tasks"].items():
                self.entries[(teacher, row["id"], task)] = TopkEntry(
                    str(self.folder / row["file"]), place["offset"], place["tokens"], row["k"], place["sequence"],
                    vocab_size)
        self.weights = teachers if teachers is not None else {t: 1.0 for t in self.names}
        for teacher in self.names:
            if len(self.tokenizers[teacher]) > 1 or len(self.k[teacher]) > 1:
                raise TopkStoreError(f"{index}: holds distributions of teacher {self.names[teacher]} with several "
                                     f"tokenizers {sorted(self.tokenizers[teacher])} or top-k sizes "
                                     f"{sorted(self.k[teacher])}; Stage 2 needs one per teacher: rerun Stage 1 for it "
                                     "into a fresh data.key_info_path")

    @property
    def teachers(self) -> dict[str, str]:
        """tokenizer fingerprint -> teacher (teacher.model as written), one per tokenizer."""
        return {next(iter(fps)): self.names[t] for t, fps in self.tokenizers.items()}

    def check_tokenizer(self, tokenizer, student: str) -> None:
        """Refuse a student whose tokenizer is not every teacher's: the stored ids would mean other tokens."""
        mine = tokenizer_fingerprint(tokenizer)
        for teacher, fingerprints in self.tokenizers.items():
            theirs, teacher = next(iter(fingerprints)), self.names[teacher]
            if theirs != mine:
                raise TopkStoreError(
                    f"{self.folder}: the teacher's top-k were written with the tokenizer of {teacher} (fingerprint "
                    f"{theirs}), but the student {student} has another tokenizer (fingerprint {mine}); token-level "
                    "distillation needs a student with the teacher's vocabulary (cross-tokenizer KD is not supported): "
                    "pick such a student (e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-72B-Instruct) or set loss.kd_alpha: 0")

    def lookup(self, example: dict) -> TopkEntry | MixedEntry | None:
        """The entry of an encoded example (distil.tokenization.encode_example), None when Stage 1 wrote
        none; an entry computed on another token sequence is an error (another prompt, chat template or
        train.max_length than Stage 1's). An answer one teacher wrote (example["teacher"]) has that teacher's
        distributions; a gold summary has those of every teacher that scored it, mixed by weight."""
        record_id, task = example["id"], example["task"]
        authors = [example["teacher"]] if example.get("teacher") else list(self.weights)
        found = [(t, self.entries[(t, record_id, task)]) for t in authors if (t, record_id, task) in self.entries]
        if not found:
            return None
        fingerprint = sequence_fingerprint(example["input_ids"])
        for _, entry in found:
            if entry.sequence != fingerprint or entry.tokens != answer_length(example["labels"]):
                raise TopkStoreError(
                    f"{self.folder}: the teacher's distributions for report {record_id!r} ({task}) were computed on "
                    "another token sequence than the one Stage 2 trains on (a different prompt version, chat "
                    "template, train.max_length, key information or prepared data than Stage 1 used); rerun Stage 1 "
                    "with this config into a fresh data.key_info_path, or set loss.kd_alpha: 0")
        if len(found) == 1:
            return found[0][1]
        return MixedEntry(tuple(e for _, e in found), tuple(self.weights[t] for t, _ in found), self.vocab_size)
