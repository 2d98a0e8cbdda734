"""On-policy distillation, step 1 of a round (distil/onpolicy.py): the round's student answers its share of the
reports with vLLM (eval.backend) at onpolicy.temperature; the exact token ids go to round-NNN/samples.jsonl, a
distil.ledger.Ledger keyed by task and report (a rerun samples only what is missing; another student is refused
through the file's meta)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from distil.config import ExperimentConfig
from distil.fingerprint import model_identity
from distil.ledger import Ledger
from distil.onpolicy import (SAMPLES, answer_tokens, end_of_turn_id, policy_of, round_dir, round_reports, sample_key,
                             sampled_tasks)
from distil.prompts import PROMPT_VERSION
from eval.generate import Decoding, check_meta, open_engine, prompt_ids

log = logging.getLogger(__name__)


def sample_round(cfg: ExperimentConfig, r: int) -> dict:
    """Step 1: the student's answers for round r (only those not in samples.jsonl yet); counts, never text."""
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
        todo = [(rec, task) for rec, task in wanted if sample_key({"task": task, "id": rec["id"]}) not in ledger.done]
        stats = {"samples": len(wanted), "already_done": len(wanted) - len(todo), "sampled": 0, "cut": 0,
                 "truncated": 0, "answer_tokens": 0, "engine_start_s": 0.0, "generate_s": 0.0}
        if not todo:
            return stats
        started = time.perf_counter()
        engine = open_engine(policy, e)
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
