"""On-policy distillation in rounds: the student writes, the teacher grades every token, the student learns.

Offline distillation trains on the teacher's text; at inference the student conditions on its own tokens,
which it never trained on, and its errors compound. Here (GKD, Agarwal et al. 2024) each round r, in its
folder onpolicy.output_dir/round-NNN/:

  1. sample  the current student (round 0: model.name_or_path, then round r-1's export) answers its share of
             the reports of onpolicy.splits (round_share) to each prompt of onpolicy.tasks, with vLLM at
             onpolicy.temperature -> samples.jsonl: {id, task, lang, input_ids = prompt + the sampled answer,
             prompt_tokens, finish_reason, truncated}, a distil.ledger.Ledger keyed by task and id.
  2. score   the teacher (Stage 1's pool: vLLM replicas on Ray, kept up across rounds) scores exactly those
             token sequences by prefill: its top-k (teacher.topk_logprobs) at every sampled token -> topk/, a
             store like Stage 1's (distil/teacher_topk.py), its index a ledger keyed by report.
  3. train   launch/train.py under DeepSpeed with onpolicy.round=r: the round's share of the supervised
             examples (distil/dataset.py) plus the samples as two more kinds (student_summary,
             student_extract), KD only with onpolicy.beta, weighted by onpolicy.weight (distil/loss.py)
             -> train/hf, the next round's student. round.json keeps each phase's seconds.

Every step writes a ledger or checkpoints, so a kill anywhere resumes where it stopped: no report is sampled
or scored twice, none is lost, and the round trains on exactly its samples. The last round's export is
published at onpolicy.output_dir/hf.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

from distil.atomic import write_json
from distil.config import ExperimentConfig
from distil.data import DataError, read_prepared
from distil.fingerprint import model_identity
from distil.ledger import Ledger, read_ledger
from distil.loss import kind_weights
from distil.prompts import PROMPT_VERSION, STUDENT_KIND, TASK_IDS
from distil.teacher_config import record_key
from distil.teacher_topk import TopkStore, TopkStoreError, sequence_fingerprint, token_count, tokenizer_fingerprint
from distil.tokenization import IGNORE

log = logging.getLogger(__name__)

SAMPLES, STORE, TRAIN, ROUND = "samples.jsonl", "topk", "train", "round.json"


def round_share(n: int, rounds: int, r: int, seed: int) -> list[int]:
    """Indices (of n items) that round r of `rounds` takes: a seeded shuffle cut into `rounds` near-equal
    contiguous shares, so the rounds together take every item once."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[r * n // rounds:(r + 1) * n // rounds])


def round_dir(output_dir: str | Path, r: int) -> Path:
    return Path(output_dir) / f"round-{r:03d}"


def sampled_tasks(cfg: ExperimentConfig) -> list[str]:
    """The prompts the student answers: onpolicy.tasks less those whose kind weighs 0 (extract at gamma 1)."""
    weights = kind_weights(cfg.loss.gamma, 0.0, 1.0)
    return [t for t in cfg.onpolicy.tasks if weights[TASK_IDS[STUDENT_KIND[t]]] > 0]


def round_reports(cfg: ExperimentConfig, r: int) -> list[dict]:
    """The reports round r samples: its share of onpolicy.splits, read in split order."""
    records = []
    for split in cfg.onpolicy.splits:
        records += read_prepared(Path(cfg.data.prepared_dir) / f"{split}.jsonl")
    if not records:
        raise DataError(f"onpolicy.splits={cfg.onpolicy.splits}: no reports in {cfg.data.prepared_dir}")
    return [records[i] for i in round_share(len(records), cfg.onpolicy.rounds, r, cfg.onpolicy.seed)]


def policy_of(cfg: ExperimentConfig, r: int) -> str:
    """The student that samples round r: model.name_or_path first, then the previous round's export."""
    return cfg.model.name_or_path if r == 0 else str(round_dir(cfg.onpolicy.output_dir, r - 1) / TRAIN / "hf")


def sample_key(row: dict) -> str:
    return f"{row['task']}:{row['id']}"


def answer_tokens(ids: list[int], finish_reason: str, end_of_turn: int, stop_ids: set[int]) -> list[int]:
    """The sampled answer as it is trained on: an answer that ended by itself ends with its stop token (the
    engine may leave it out), one cut at max_new_tokens has none."""
    ids = list(ids)
    if finish_reason == "stop" and (not ids or ids[-1] not in stop_ids):
        ids.append(end_of_turn)
    return ids


def end_of_turn_id(tokenizer, task: str = "summarize") -> int:
    """The token that closes an assistant turn in the tokenizer's chat template."""
    from distil.tokenization import answer_ids

    return answer_ids(tokenizer, task, "en", "x")[-1]


def sample_round(cfg: ExperimentConfig, r: int, engine_for: Callable[[str, object], object] | None = None) -> dict:
    """Step 1: the student's answers for round r (only those not in samples.jsonl yet); counts, never text."""
    from eval.generate import Decoding, check_meta, open_engine, prompt_ids

    o = cfg.onpolicy
    folder = round_dir(o.output_dir, r)
    policy, tasks = policy_of(cfg, r), sampled_tasks(cfg)
    e = replace(cfg.eval, temperature=o.temperature, max_new_tokens=o.max_new_tokens)
    path = folder / SAMPLES
    path.parent.mkdir(parents=True, exist_ok=True)
    check_meta(path, {"model": model_identity(policy), "tasks": tasks, "temperature": o.temperature,
                      "seed": o.seed + r, "max_new_tokens": o.max_new_tokens, "max_length": cfg.train.max_length,
                      "prompt_version": PROMPT_VERSION}, "samples", "onpolicy.output_dir")
    wanted = [(record, task) for record in round_reports(cfg, r) for task in tasks]
    with Ledger(path, key=sample_key) as ledger:
        todo = [(rec, task) for rec, task in wanted if f"{task}:{rec['id']}" not in ledger.done]
        stats = {"samples": len(wanted), "already_done": len(wanted) - len(todo), "sampled": 0, "cut": 0,
                 "truncated": 0, "answer_tokens": 0, "engine_start_s": 0.0, "generate_s": 0.0}
        if not todo:
            return stats
        started = time.perf_counter()
        engine = (engine_for or open_engine)(policy, e)
        stats["engine_start_s"] = round(time.perf_counter() - started, 3)
        try:
            end, stops = end_of_turn_id(engine.tokenizer), set(engine.tokenizer.all_special_ids)
            budget = min(e.max_model_len, cfg.train.max_length) - o.max_new_tokens
            for start in range(0, len(todo), e.batch_size):
                batch = todo[start:start + e.batch_size]
                prompts = [prompt_ids(engine.tokenizer, rec, task, budget) for rec, task in batch]
                started = time.perf_counter()
                completions = engine.generate([p for p, _ in prompts], Decoding(o.max_new_tokens, o.temperature,
                                                                                o.seed + r))
                stats["generate_s"] = round(stats["generate_s"] + time.perf_counter() - started, 3)
                rows = []
                for (rec, task), (prompt, cut), c in zip(batch, prompts, completions):
                    answer = answer_tokens(c.token_ids, c.finish_reason, end, stops)
                    rows.append({"id": rec["id"], "task": task, "lang": rec["lang"], "input_ids": prompt + answer,
                                 "prompt_tokens": len(prompt), "finish_reason": c.finish_reason, "truncated": cut})
                ledger.append(rows)
                stats["sampled"] += len(rows)
                stats["cut"] += sum(row["finish_reason"] == "length" for row in rows)
                stats["truncated"] += sum(row["truncated"] for row in rows)
                stats["answer_tokens"] += sum(len(row["input_ids"]) - row["prompt_tokens"] for row in rows)
                log.info("round %d: %d/%d answers sampled", r, stats["already_done"] + stats["sampled"], len(wanted))
        finally:
            engine.close()
    return stats


def score_round(cfg: ExperimentConfig, r: int, pool) -> dict:
    """Step 2: the teacher's top-k over every sampled answer of round r not yet in its store; counts."""
    from transformers import AutoTokenizer

    from teacher_serving.pool import ScoreRequest, drive
    from teacher_serving.topk import ScoreJob, TopkWriter, score_key

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


def student_examples(cfg: ExperimentConfig, tokenizer) -> tuple[list[dict], int]:
    """Step 3's on-policy examples of round onpolicy.round: each sample of samples.jsonl as it was sampled
    (labels over its answer), with the teacher's top-k of the round's store; and how many samples have
    none (their scoring failed: left out, counted)."""
    folder = round_dir(cfg.onpolicy.output_dir, cfg.onpolicy.round)
    samples = read_ledger(folder / SAMPLES)
    if not samples:
        raise DataError(f"{folder / SAMPLES}: no samples of round {cfg.onpolicy.round}; launch/onpolicy.py samples "
                        "and scores a round before it trains it (run that, not launch/train.py, for on-policy rounds)")
    store = TopkStore(folder / STORE, vocab_size=token_count(tokenizer))
    store.check_tokenizer(tokenizer, cfg.model.name_or_path)
    examples, missing = [], 0
    for row in samples:
        n = row["prompt_tokens"]
        example = {"id": row["id"], "task": STUDENT_KIND[row["task"]], "input_ids": row["input_ids"],
                   "labels": [IGNORE] * n + row["input_ids"][n:], "truncated": row["truncated"]}
        try:
            example["teacher_topk"] = store.lookup(example)
        except TopkStoreError as exc:
            raise DataError(f"{folder}: {exc}") from None
        if example["teacher_topk"] is None:
            missing += 1
            continue
        examples.append(example)
    return examples, missing


def publish_final(cfg: ExperimentConfig) -> Path:
    """The last round's export, copied whole to onpolicy.output_dir/hf."""
    import shutil

    from distil.atomic import publish_dir

    last = round_dir(cfg.onpolicy.output_dir, cfg.onpolicy.rounds - 1) / TRAIN / "hf"
    final = Path(cfg.onpolicy.output_dir) / "hf"
    staged = final.with_name(".hf.new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(last, staged)
    publish_dir(staged, final)
    return final


def run_rounds(cfg: ExperimentConfig, pool, train_round: Callable[[int, str], float],
               engine_for: Callable | None = None) -> dict:
    """Every round not yet exported: sample, score (on `pool`, kept up across the rounds), then
    `train_round(r, policy)` (returns its export's seconds); each round's seconds per phase go to round.json,
    added up over the runs a kill split it into. Returns {round: its round.json}."""
    done = {}
    for r in range(cfg.onpolicy.rounds):
        folder = round_dir(cfg.onpolicy.output_dir, r)
        record_path = folder / ROUND
        record = json.loads(record_path.read_text()) if record_path.is_file() else {
            "round": r, "policy": policy_of(cfg, r), "seconds": {"sample": 0.0, "score": 0.0, "train": 0.0,
                                                                 "export": 0.0}}
        if (folder / TRAIN / "hf" / "config.json").is_file():
            done[r] = record
            continue
        phases = []
        t0 = time.perf_counter()
        record["sample"] = sample_round(cfg, r, engine_for)
        phases.append(("sample", time.perf_counter() - t0))
        t0 = time.perf_counter()
        record["score"] = score_round(cfg, r, pool)
        if record["score"]["failed"]:
            raise RuntimeError(f"round {r}: the teacher failed to score {record['score']['failed']} report(s) "
                               f"({folder / STORE}); rerun to retry them (nothing done is lost)")
        phases.append(("score", time.perf_counter() - t0))
        for name, seconds in phases:
            record["seconds"][name] = round(record["seconds"][name] + seconds, 3)
        write_json(record_path, record, indent=1)
        t0 = time.perf_counter()
        export_s = train_round(r, policy_of(cfg, r))
        record["seconds"]["train"] = round(record["seconds"]["train"] + time.perf_counter() - t0 - export_s, 3)
        record["seconds"]["export"] = round(record["seconds"]["export"] + export_s, 3)
        write_json(record_path, record, indent=1)
        log.info("round %d of %d done: %s", r + 1, cfg.onpolicy.rounds, record["seconds"])
        done[r] = record
    publish_final(cfg)
    return done
