"""On-policy distillation, step 2 of a round (distil/onpolicy.py): the teacher scores the student's samples by
prefill, its top-k at every sampled token, into the round's store (distil/teacher_topk.py layout, written by
teacher_serving.topk.TopkWriter: arrays fsync'd before their index line; a rerun scores only what is missing).
The pool is Stage 1's (vLLM replicas on Ray), started by the first round with work and kept up across rounds."""

from __future__ import annotations

import time
from collections import Counter

from transformers import AutoTokenizer

from distil.config import ExperimentConfig
from distil.ledger import read_ledger
from distil.onpolicy import SAMPLES, STORE, round_dir
from distil.prompts import STUDENT_KIND
from distil.teacher_config import record_key
from distil.teacher_topk import sequence_fingerprint, tokenizer_fingerprint
from teacher_serving.pool import ScoreRequest, drive
from teacher_serving.topk import ScoreJob, TopkWriter, score_key


def score_round(cfg: ExperimentConfig, r: int, pool) -> dict:
    """Step 2: the teacher's top-k over every sampled answer of round r not yet in its store; counts."""
    t = cfg.teacher
    folder = round_dir(cfg.onpolicy.output_dir, r)
    samples = read_ledger(folder / SAMPLES)
    tokenizer = AutoTokenizer.from_pretrained(t.tokenizer or t.model)
    key = score_key(cfg)
    writer = TopkWriter(folder / STORE, tokenizer_fingerprint(tokenizer), key, t.model)
    try:
        by_report: dict[str, ScoreJob] = {}
        counts = Counter()
        for row in samples:
            if record_key(row["id"], key) in writer.index.done:
                continue
            if len(row["input_ids"]) >= t.max_model_len:  # the engine adds one token
                counts["too_long"] += 1
                continue
            job = by_report.setdefault(row["id"], ScoreJob({"id": row["id"]}, {}))
            kind = STUDENT_KIND[row["task"]]
            job.sequences[kind] = {"prompt_token_ids": row["input_ids"], "first": row["prompt_tokens"]}
            job.fingerprints[kind] = sequence_fingerprint(row["input_ids"])
        jobs = list(by_report.values())
        tokens = 0

        def accept(answered: list) -> list:
            nonlocal tokens
            writer.append(answered)
            tokens += sum(len(ids) for _, arrays in answered for ids, _ in arrays.values())
            counts["scored"] += len(answered)
            return []

        started = time.perf_counter()
        if jobs:
            pool.start()  # the engines start once, in the first round with work; later rounds find them up
        teacher_start = time.perf_counter() - started
        started = time.perf_counter()
        if jobs:
            counts += drive(pool, jobs, lambda job: ScoreRequest(t.topk_logprobs, job.sequences), accept,
                            t.max_attempts)
        return {"reports": counts["scored"], "failed": counts["failed"], "too_long": counts["too_long"],
                "answer_tokens": tokens, "teacher_start_s": round(teacher_start, 3),
                "seconds": round(time.perf_counter() - started, 3)}
    finally:
        writer.close()
