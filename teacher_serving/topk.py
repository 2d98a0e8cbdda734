"""Stage 1, second pass: the teacher's top-k next-token distributions for token-level distillation.

For every training report that has its key-information record, the teacher scores by prefill the two
sequences Stage 2 will train on (distil.tokenization.encode_example with train.max_length): the
summarization example (its gold summary) and, when the record is usable (status ok), the extraction
example (its own key information). Its top-k (teacher.topk_logprobs) over each answer token go to
the store beside the ledger (distil/teacher_topk.py): arrays first, fsync'd, then the index line,
through a distil.ledger.Ledger, so a rerun skips what is stored and never writes a report twice. Prefill, not the
log-probs of the generation: the stored rows then match Stage 2's token sequence exactly, even where
the generated text does not re-tokenize to the generated ids, and the gold summary needs one anyway.
Only what Stage 2 trains on: the train split, and (teacher.summarize) the teacher's summaries of the
unlabelled split, scored under the task `teacher_summary` (the summarization prompt, the teacher's answer).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distil.config import ExperimentConfig
from distil.data import read_prepared
from distil.ledger import Ledger
from distil.teacher_config import annotation_key, is_annotation_of, key_of, record_key
from distil.teacher_topk import INDEX, sequence_fingerprint, store_dir, to_bytes, tokenizer_fingerprint
from distil.tokenization import IGNORE, encode_example
from teacher_serving.pool import ScoreRequest, StartOnFirstUse, drive

log = logging.getLogger(__name__)


@dataclass
class ScoreJob:
    """One report's sequences on their way through the teacher."""
    record: dict
    sequences: dict[str, dict]  # task -> {prompt_token_ids, first}
    engine_failures: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)


def score_key(cfg: ExperimentConfig) -> dict:
    """What makes two stored distributions of a report the same: the annotation's key, with k and the
    length cut added to its sampling."""
    annotation = annotation_key(cfg.teacher)
    sampling = {**annotation["sampling"], "topk": cfg.teacher.topk_logprobs, "max_length": cfg.train.max_length}
    return {**annotation, "sampling": sampling}


def usable(records: list[dict], wanted: dict, field: str) -> dict[str, str]:
    """The answers (`field`) of this teacher's records with status ok, by report id."""
    return {r["id"]: r[field] for r in records
            if is_annotation_of(r, wanted) and r["status"] == "ok" and (r.get(field) or "").strip()}


def score_jobs(cfg: ExperimentConfig, annotations: list[dict], done: set[str],
               tokenizer, teacher_summaries: list[dict] = ()) -> tuple[list[ScoreJob], Counter]:
    """A job per train report of teacher.splits with this teacher's annotation, and per unlabelled report with
    its summary (teacher_summaries: the records of Stage 1's summaries ledger), without stored distributions."""
    t = cfg.teacher
    wanted = annotation_key(t)
    mine = {r["id"] for r in annotations if is_annotation_of(r, wanted)}
    key_info = usable(annotations, wanted, "key_info")
    prepared = Path(cfg.data.prepared_dir)
    todo = []
    if "train" in t.splits:
        for record in read_prepared(prepared / "train.jsonl"):
            if record["id"] in mine:
                answers = {"summarize": record["summary"]}
                if record["id"] in key_info:
                    answers["extract"] = key_info[record["id"]]
                todo.append((record, answers))
    summaries = usable(list(teacher_summaries), annotation_key(t, "summarize"), "summary")
    if summaries:
        todo += [(r, {"teacher_summary": summaries[r["id"]]}) for r in read_prepared(prepared / "unlabelled.jsonl")
                 if r["id"] in summaries]
    key = score_key(cfg)
    jobs, counts = [], Counter()
    for record, answers in todo:
        if record_key(record["id"], key) in done:
            continue
        job = ScoreJob(record, {})
        for task, answer in answers.items():
            example = encode_example(tokenizer, {"id": record["id"], "lang": record["lang"], "report": record["report"],
                                                 "task": task, "answer": answer}, cfg.train.max_length)
            if example is None or len(example["input_ids"]) >= t.max_model_len:  # the engine adds one token
                counts["too_long"] += 1
                continue
            first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
            job.sequences[task] = {"prompt_token_ids": example["input_ids"], "first": first}
            job.fingerprints[task] = sequence_fingerprint(example["input_ids"])
        if job.sequences:
            jobs.append(job)
    return jobs, counts


class TopkWriter:
    """Appends arrays to a new part file and index lines to the store's index (see distil/teacher_topk.py)."""

    def __init__(self, folder: Path, tokenizer_id: str, key: dict, teacher_model: str | None = None):
        self.folder, self.tokenizer_id, self.key = folder, tokenizer_id, key
        self.teacher_model = teacher_model  # teacher.model as the user wrote it (key["teacher"] is its fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        self.index = Ledger(folder / INDEX, key=key_of)  # also the lock: one writer per store
        self.part = folder / f"part-{len(list(folder.glob('part-*.bin'))):05d}.bin"
        self._file = None
        self.bytes, self.write_s = 0, 0.0

    def append(self, scored: list[tuple[ScoreJob, dict]]) -> None:
        started = time.perf_counter()
        if self._file is None:
            self._file = open(self.part, "ab")
        lines = []
        for job, arrays in scored:
            tasks = {}
            for task, (ids, log_probs) in arrays.items():
                data = to_bytes(ids, log_probs)
                tasks[task] = {"offset": self._file.tell(), "tokens": len(ids), "sequence": job.fingerprints[task]}
                self._file.write(data)
                self.bytes += len(data)
            lines.append({"id": job.record["id"], **self.key, "tokenizer": self.tokenizer_id,
                          "k": self.key["sampling"]["topk"], **({"teacher_model": self.teacher_model}
                                                                 if self.teacher_model else {}),
                          "file": self.part.name, "tasks": tasks})
        self._file.flush()
        os.fsync(self._file.fileno())  # the arrays are on disk before any line points at them
        self.index.append(lines)
        self.write_s += time.perf_counter() - started

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self.index.close()


def score(cfg: ExperimentConfig, pool: StartOnFirstUse, annotations: list[dict], tokenizer,
          teacher_summaries: list[dict] = ()) -> dict:
    """Store the teacher's top-k for every train report (and teacher summary) still without them; the counts
    and the storage of this pass."""
    t = cfg.teacher
    folder = store_dir(cfg.data.key_info_path)
    writer = TopkWriter(folder, tokenizer_fingerprint(tokenizer), score_key(cfg), t.model)
    try:
        jobs, counts = score_jobs(cfg, annotations, writer.index.done, tokenizer, teacher_summaries)
        log.info("teacher top-k (k=%d): %d report(s) to score, %d already in %s", t.topk_logprobs, len(jobs),
                 len(writer.index.records), folder)
        if counts["too_long"]:
            log.warning("%d sequence(s) of train.max_length do not fit teacher.max_model_len=%d: no top-k for them "
                        "(raise teacher.max_model_len above train.max_length)", counts["too_long"], t.max_model_len)
        tokens = 0

        def accept(answered: list[tuple[ScoreJob, dict]]) -> list:
            nonlocal tokens
            writer.append(answered)
            tokens += sum(len(ids) for _, arrays in answered for ids, _ in arrays.values())
            counts["scored"] += len(answered)
            return []

        if jobs:
            pool.start()  # before the clock: no engine start or stop in this pass's time
        started = time.perf_counter()
        if jobs:
            counts += drive(pool, jobs, lambda job: ScoreRequest(t.topk_logprobs, job.sequences), accept,
                            t.max_attempts)
        return {"reports": counts["scored"], "failed": counts["failed"], "too_long": counts["too_long"],
                "answer_tokens": tokens, "bytes": writer.bytes, "seconds": round(time.perf_counter() - started, 3),
                "write_seconds": round(writer.write_s, 3),
                "bytes_per_token": round(writer.bytes / tokens, 1) if tokens else None}
    finally:
        writer.close()
