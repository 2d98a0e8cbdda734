"""Prepared records -> encoded examples of every kind (gold summary, key information, teacher summary; in an
on-policy round also the student's own samples, distil/onpolicy.py) -> packed rows for the Trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from distil.config import ExperimentConfig
from distil.data import (UNLABELLED, DataError, combined_answers, load_key_info, load_teacher_summaries, read_prepared,
                         teacher_summaries_path, teacher_summary_examples, training_examples)
from distil.fingerprint import model_identity
from distil.packing import pack_best_fit
from distil.teacher_config import Teacher, annotation_key
from distil.teacher_topk import TopkStore, store_dir, token_count
from distil.tokenization import answer_length, encode_example

log = logging.getLogger(__name__)


@dataclass
class PackingStats:
    reports: int
    examples: int
    extract_examples: int
    missing_key_info: int
    truncated: int
    dropped_answer_too_long: int
    rows: int
    tokens: int
    labelled_tokens: int
    row_fill: float  # tokens / (rows * pack_length)
    teacher_topk: int = 0  # examples with the teacher's top-k (token-level distillation)
    missing_teacher_topk: int = 0  # examples trained without them (KD on, Stage 1 wrote none)
    teacher_summary_examples: int = 0  # reports without a gold summary, answered by the teacher
    missing_teacher_summary: int = 0  # such reports without a usable teacher summary (not trained on)
    student_samples: int = 0  # on-policy round: the student's own answers, with the teacher's top-k
    unscored_samples: int = 0  # such answers the teacher did not score (not trained on)


class PackedRows(Dataset):
    """Row i = a list of encoded examples whose lengths sum to at most pack_length."""

    def __init__(self, rows: list[list[dict]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return self.rows[i]


def build_packed_rows(tokenizer, records: list[dict], key_info: dict[str, str], gamma: float,
                      max_length: int, pack_length: int, topk: TopkStore | None = None,
                      unlabelled: list[dict] = (), teacher_summaries: dict[str, str] | None = None,
                      share: Callable[[int], list[int]] | None = None, own: tuple[list[dict], int] = ((), 0),
                      ) -> tuple[PackedRows, PackingStats]:
    """`unlabelled` with `teacher_summaries`: the reports without a gold summary, trained on as the third kind.
    An on-policy round keeps `share(n)` of the n encoded supervised examples and adds `own`: the student's
    samples, already encoded with the teacher's top-k, and how many were left unscored."""
    examples, counts = training_examples(records, key_info, gamma)
    extra, missing_summary = teacher_summary_examples(list(unlabelled), teacher_summaries or {})
    examples += extra
    encoded = [encode_example(tokenizer, ex, max_length) for ex in examples]
    kept = [e for e in encoded if e is not None]
    dropped = len(encoded) - len(kept)  # before a round's share: the share is not a drop
    if share is not None:
        kept = [kept[i] for i in share(len(kept))]
    if topk is not None:
        for e in kept:
            e["teacher_topk"] = topk.lookup(e)
    kept += list(own[0])
    rows = [[kept[i] for i in row] for row in pack_best_fit([len(e["input_ids"]) for e in kept], pack_length)]
    tokens = sum(len(e["input_ids"]) for e in kept)
    stats = PackingStats(
        reports=counts["reports"], examples=len(kept), extract_examples=sum(e["task"] == "extract" for e in kept),
        missing_key_info=counts["missing_key_info"], truncated=sum(e["truncated"] for e in kept),
        dropped_answer_too_long=dropped, rows=len(rows), tokens=tokens,
        labelled_tokens=sum(answer_length(e["labels"]) for e in kept),
        row_fill=tokens / max(1, len(rows) * pack_length),
        teacher_topk=sum(e.get("teacher_topk") is not None for e in kept),
        missing_teacher_topk=sum(e.get("teacher_topk") is None for e in kept
                                 if not e["task"].startswith("student_")) if topk is not None else 0,
        teacher_summary_examples=sum(e["task"] == "teacher_summary" for e in kept),
        missing_teacher_summary=missing_summary,
        student_samples=len(own[0]), unscored_samples=own[1],
    )
    return PackedRows(rows), stats


def load_train_rows(tokenizer, prepared_dir: str, key_info_path: str | None, gamma: float,
                    max_length: int, pack_length: int, kd: bool = False, student: str = "the student",
                    teachers: list[Teacher] = (), text_rule: str = "each", teacher_summary_weight: float = 0.0,
                    onpolicy: ExperimentConfig | None = None) -> tuple[PackedRows, PackingStats]:
    """Packed rows of train.jsonl; the extraction answers are the ledger records of `teachers`
    (distil.config.teachers of the config: one, or several combined by `text_rule`, distil/combine.py). With
    teacher_summary_weight > 0 the reports of unlabelled.jsonl come too, answered by the teachers' summaries
    (the third kind). With `kd`, each example carries the top-k that Stage 1 stored beside key_info_path (a
    student with another tokenizer is refused here, before any step), less the ids no token of the tokenizer
    has (a teacher's padded vocabulary): its author's, or for a gold summary the teachers' mixture. `onpolicy`
    (a config with onpolicy.round >= 0) makes it that round's rows: its share of the supervised examples and the
    student's samples with the teacher's top-k (distil/onpolicy.py)."""
    records = read_prepared(Path(prepared_dir) / "train.jsonl")
    seqkd = teacher_summary_weight > 0
    if (gamma < 1.0 or kd or seqkd) and key_info_path is None:
        raise ValueError("loss.gamma < 1 trains the extraction task, loss.kd_alpha > 0 distils the teacher's "
                         "top-k and loss.teacher_summary_weight > 0 its summaries; they need data.key_info_path (the "
                         "Stage 1 ledger; the top-k store and the summaries lie beside it); set it, or set loss.gamma: "
                         "1.0, loss.kd_alpha: 0 and loss.teacher_summary_weight: 0 for the summary-only baseline")
    if (gamma < 1.0 or kd or seqkd) and not teachers:
        raise ValueError("load_train_rows: the teacher's answers need the config's teachers (distil.config.teachers)")

    def answers(path, task: str) -> dict:
        if len(teachers) == 1:  # one teacher: its text as it is
            load = load_key_info if task == "extract" else load_teacher_summaries
            return load(key_info_path, annotation_key(teachers[0].config, task))
        return combined_answers(path, list(teachers), text_rule, task)

    key_info = answers(key_info_path, "extract") if gamma < 1.0 else {}
    unlabelled, summaries = [], None
    if seqkd:
        unlabelled_path = Path(prepared_dir) / f"{UNLABELLED}.jsonl"
        if not unlabelled_path.is_file():
            raise DataError(f"{unlabelled_path}: not found; loss.teacher_summary_weight > 0 trains on the teacher's "
                            "summaries of the reports without a gold one: prepare them (launch/prepare_data.py with "
                            "sources without summaries), or set loss.teacher_summary_weight: 0")
        unlabelled = read_prepared(unlabelled_path)
        summaries = answers(teacher_summaries_path(key_info_path), "summarize")
    topk = None
    if kd:
        weights = {model_identity(t.config.model): t.weight for t in teachers}
        topk = TopkStore(store_dir(key_info_path), vocab_size=token_count(tokenizer), teachers=weights)
        topk.check_tokenizer(tokenizer, student)
    share, own = None, ((), 0)
    if onpolicy is not None:
        from distil.onpolicy import student_examples, supervised_share

        o = onpolicy.onpolicy
        share = lambda n: supervised_share(n, o.rounds, o.round, o.seed, o.weight)  # noqa: E731
        own = student_examples(onpolicy, tokenizer)
    rows, stats = build_packed_rows(tokenizer, records, key_info, gamma, max_length, pack_length, topk,
                                    unlabelled, summaries, share, own)
    log.info("training data: %s", stats)
    if stats.missing_key_info:
        log.warning("%d of %d reports have no key information in %s: trained on the summary task only",
                    stats.missing_key_info, stats.reports, key_info_path)
    if stats.truncated:
        log.warning("%d examples longer than train.max_length=%d had their report truncated (answers kept whole)",
                    stats.truncated, max_length)
    if stats.missing_teacher_summary:
        log.warning("%d of %d reports without a gold summary have no usable teacher summary in %s: not trained on "
                    "(a record cut at max_new_tokens or empty keeps its status there; a report without a record gets "
                    "one when Stage 1 runs again with teacher.summarize=true)", stats.missing_teacher_summary,
                    len(unlabelled), teacher_summaries_path(key_info_path))
    if stats.missing_teacher_topk:
        log.warning("%d of %d examples have no teacher top-k in %s: trained without the KD term (rerun Stage 1 "
                    "to score them)", stats.missing_teacher_topk, stats.examples, store_dir(key_info_path))
    if stats.unscored_samples:
        log.warning("%d of %d of the student's samples have no teacher top-k: not trained on (a rerun of "
                    "launch/onpolicy.py scores them before training)", stats.unscored_samples,
                    stats.student_samples + stats.unscored_samples)
    if stats.dropped_answer_too_long:
        log.warning("%d examples dropped: their answer alone exceeds train.max_length=%d",
                    stats.dropped_answer_too_long, max_length)
    if not len(rows):
        raise DataError(f"{prepared_dir}/train.jsonl gives no training example ({stats.reports} reports, "
                        f"{stats.dropped_answer_too_long} examples dropped for train.max_length={max_length}): "
                        "prepare a train split with reports (launch/prepare_data.py), or raise train.max_length")
    return rows, stats
