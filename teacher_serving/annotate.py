"""Stage 1: the teacher writes the clinical key information of every prepared report.

For each report of the splits in teacher.splits the teacher answers (S: P_ext in the report's
language, U: report). Answers are appended to the ledger (data.key_info_path) as they come;
a restarted job skips what the ledger already holds for the same (id, teacher, prompt_version,
sampling) and finishes the rest. Bad rows never stop the job:
  - a prompt longer than max_model_len - max_new_tokens keeps the report's first tokens that
    fit (teacher.too_long: truncate; the record says how many were dropped) or is recorded as
    skipped_too_long (teacher.too_long: skip);
  - an empty, cut (finish_reason "length") or unparsable JSON answer is retried at
    teacher.retry_temperature up to teacher.max_attempts tries, then recorded with its status;
  - an engine failure restarts the replica and re-queues its requests; a report whose request
    failed max_attempts times is left out of the ledger (a rerun retries it) and counted.
Requests go one report at a time, as many in flight as the replicas have slots (continuous
batching in each engine); a failure costs that request only.
Logs carry ids and counts only, never report text.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

from distil.config import ExperimentConfig, TeacherConfig
from distil.data import read_jsonl
from distil.prompts import PROMPT_VERSION, build_messages
from teacher_serving.answers import RETRYABLE, classify, key_info_schema
from teacher_serving.grounding import grounding_score, summarize_grounding
from teacher_serving.ledger import Ledger, record_key

log = logging.getLogger(__name__)


def sampling_key(t: TeacherConfig) -> dict:
    """The sampling settings that make two annotations of a report the same annotation."""
    key = {"temperature": t.temperature, "top_p": t.top_p, "max_new_tokens": t.max_new_tokens, "seed": t.seed,
           "stop": list(t.stop), "key_info_format": t.key_info_format}
    if t.repetition_penalty != 1.0:  # only when set: ledgers written before the option keep their keys
        key["repetition_penalty"] = t.repetition_penalty
    return key


@dataclass
class Item:
    """One report on its way through the teacher."""
    record: dict
    messages: list[dict]
    report_tokens_dropped: int = 0
    attempts: int = 0
    engine_failures: int = 0
    outputs: list[dict] = field(default_factory=list)


def fit_prompts(records: list[dict], tokenizer, budget: int) -> tuple[list[Item], list[dict]]:
    """Extraction prompts that fit `budget` tokens; the report is cut to its first tokens when needed.

    Returns the items and the records whose prompt cannot fit even with an empty report.
    """
    def render(lang: str, report: str) -> tuple[list[dict], str]:
        messages = build_messages("extract", lang, report)
        return messages, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    rendered = [render(r["lang"], r["report"]) for r in records]
    lengths = [len(ids) for ids in tokenizer([text for _, text in rendered], add_special_tokens=False)["input_ids"]]
    items, impossible = [], []
    for record, (messages, _), n in zip(records, rendered, lengths):
        if n <= budget:
            items.append(Item(record, messages))
            continue
        ids = tokenizer(record["report"], add_special_tokens=False)["input_ids"]
        keep = len(ids) - (n - budget)
        while keep > 0:  # decoding a cut can merge tokens differently: re-measure until it fits
            messages, text = render(record["lang"], tokenizer.decode(ids[:keep]))
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n <= budget:
                items.append(Item(record, messages, report_tokens_dropped=len(ids) - keep))
                break
            keep -= n - budget
        else:
            impossible.append(record)
    return items, impossible


def request(item: Item, t: TeacherConfig, schema: dict | None) -> dict:
    """The engine request of the item's next try: configured sampling first, retry_temperature after."""
    retry = item.attempts > 0
    sampling = {"temperature": t.retry_temperature if retry else t.temperature, "top_p": t.top_p,
                "max_tokens": t.max_new_tokens, "seed": t.seed + item.attempts, "stop": list(t.stop)}
    if t.repetition_penalty != 1.0:
        sampling["repetition_penalty"] = t.repetition_penalty
    return {"messages": item.messages, "sampling": sampling, "json_schema": schema}


def ledger_record(item: Item, t: TeacherConfig, status: str, output: dict | None) -> dict:
    output = output or {}
    report = item.record["report"]
    score = grounding_score(output["text"], report) if status == "ok" else None
    if status == "ok" and t.grounding_threshold is not None and score is not None and score < t.grounding_threshold:
        status = "ungrounded"
    return {"id": item.record["id"], "lang": item.record["lang"], "split": item.record.get("split"),
            "key_info": output.get("text"), "status": status, "teacher": t.model, "prompt_version": PROMPT_VERSION,
            "sampling": sampling_key(t), "finish_reason": output.get("finish_reason"),
            "prompt_tokens": output.get("prompt_tokens"), "completion_tokens": output.get("completion_tokens"),
            "attempts": item.attempts, "report_tokens_dropped": item.report_tokens_dropped, "grounding": score}


def load_pending(cfg: ExperimentConfig, ledger: Ledger, limit: int | None) -> tuple[list[dict], int]:
    t = cfg.teacher
    records = []
    for split in t.splits:
        records += read_jsonl(Path(cfg.data.prepared_dir) / f"{split}.jsonl")
    if limit is not None:
        records = records[:limit]
    sampling = sampling_key(t)
    pending = [r for r in records if record_key(r["id"], t.model, PROMPT_VERSION, sampling) not in ledger.done]
    return pending, len(records)


def make_pool(cfg: ExperimentConfig):
    """The vLLM replicas on Ray (default) or the remote endpoint (teacher.backend: openai)."""
    t = cfg.teacher
    if t.backend == "openai":
        from teacher_serving.remote import RemotePool

        return RemotePool(t.api_base, t.model, t.api_key_env, t.max_concurrency, t.api_retries, t.request_timeout_s)
    import ray

    from teacher_serving.placement import plan_replicas
    from teacher_serving.replica import EngineSpec, ReplicaPool

    if not ray.is_initialized():
        ray.init(log_to_driver=True)  # joins RAY_ADDRESS (set by `ray job submit`), else starts a local Ray
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    plan = plan_replicas(nodes, t.tensor_parallel_size, t.pipeline_parallel_size, t.num_replicas, t.cpus_per_replica)
    log.info("teacher %s: %d replica(s), bundles %s, %s, executor %s", t.model, plan.num_replicas,
             list(plan.bundles), plan.strategy, plan.executor_backend or "vLLM default")
    spec = EngineSpec(model=t.model, tensor_parallel_size=t.tensor_parallel_size,
                      pipeline_parallel_size=t.pipeline_parallel_size, max_model_len=t.max_model_len, dtype=t.dtype,
                      seed=t.seed, kv_cache_gib=t.kv_cache_gib, enforce_eager=t.enforce_eager,
                      json_mode=t.key_info_format == "json", executor_backend=plan.executor_backend,
                      cpu_threads=None if plan.on_gpu else t.cpus_per_replica, max_num_seqs=t.max_num_seqs,
                      max_logprobs=max(20, t.topk_logprobs))
    return ReplicaPool(spec, plan, t.max_replica_restarts)


def drive(pool, items: list, make_request, accept, max_failures: int) -> Counter:
    """Feed `pool` single requests, as many as it has free slots, until every item is accepted.

    `accept(answered)` gets the (item, output) pairs that came back together and returns the items to
    send again. A failed request (engine, endpoint) goes back to the front of the queue; an item whose
    requests failed `max_failures` times is dropped and counted as "failed" (a rerun retries it).
    """
    queue, inflight, counts = deque(items), {}, Counter()
    while queue or inflight:
        for _ in range(min(len(queue), pool.free_slots)):
            item = queue.popleft()
            inflight[pool.submit(make_request(item))] = item
        finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        answered = []
        for future in finished:
            item = inflight.pop(future)
            try:
                output = future.result()
            except Exception as exc:  # engine, endpoint or request failure: the pool recovers, the item goes back
                pool.failed(future, exc)
                item.engine_failures += 1
                if item.engine_failures < max_failures:
                    queue.appendleft(item)
                else:
                    counts["failed"] += 1
                    log.error("report %s: its request failed %d times (%s); not recorded, a rerun retries it",
                              item.record["id"], item.engine_failures, type(exc).__name__)
                continue
            pool.done(future)
            answered.append((item, output))
        if answered:
            queue.extend(accept(answered))
    return counts


def run(pool, items: list[Item], t: TeacherConfig, ledger: Ledger, progress=None) -> Counter:
    """Annotate `items`; each answer is written the moment it returns (retrying an empty, cut or
    invalid one up to teacher.max_attempts). Counts of this run."""
    schema = key_info_schema(t.json_max_field_chars) if t.key_info_format == "json" else None
    counts: Counter = Counter()

    def accept(answered: list[tuple[Item, dict]]) -> list[Item]:
        retry, final = [], []
        for item, output in answered:
            item.attempts += 1
            status = classify(output["text"], output["finish_reason"], t.key_info_format)
            if status in RETRYABLE and item.attempts < t.max_attempts:
                retry.append(item)
            else:
                final.append(ledger_record(item, t, status, output))
        if final:  # one fsync for everything that finished together
            ledger.append(final)
            counts.update(r["status"] for r in final)
            if progress is not None:
                progress(final)
        return retry

    counts += drive(pool, items, lambda item: request(item, t, schema), accept, t.max_attempts)
    return counts


def summarize(ledger: Ledger, t: TeacherConfig) -> dict:
    """Counts per status and grounding per language over this teacher's records in the whole ledger."""
    sampling = sampling_key(t)
    mine = [r for r in ledger.records
            if r["teacher"] == t.model and r["prompt_version"] == PROMPT_VERSION and r["sampling"] == sampling]
    return {"records": len(mine), "status": dict(Counter(r["status"] for r in mine)),
            "grounding": summarize_grounding(mine, t.grounding_threshold)}


def annotate_pending(cfg: ExperimentConfig, ledger: Ledger, pending: list[dict], tokenizer, get_pool,
                     show_progress: bool) -> dict:
    """The key information of `pending` into the ledger (`get_pool()` starts the replicas); this pass's counts."""
    from tqdm import tqdm

    t = cfg.teacher
    counts: Counter = Counter()
    tokens, seconds, items = 0, 0.0, []
    if pending:
        items, impossible = fit_prompts(pending, tokenizer, t.max_model_len - t.max_new_tokens)
        too_long = [i for i in items if i.report_tokens_dropped]
        if t.too_long == "skip":
            impossible += [i.record for i in too_long]
            items = [i for i in items if not i.report_tokens_dropped]
        elif too_long:
            log.info("%d report(s) cut to fit max_model_len - max_new_tokens = %d tokens (teacher.too_long)",
                     len(too_long), t.max_model_len - t.max_new_tokens)
        skipped = [ledger_record(Item(r, []), t, "skipped_too_long", None) for r in impossible]
        ledger.append(skipped)
        counts.update(r["status"] for r in skipped)
    if items:
        pool = get_pool()
        bar = tqdm(total=len(items), unit="report", disable=not show_progress, mininterval=2.0)
        started = time.perf_counter()

        def progress(final: list[dict]) -> None:
            nonlocal tokens
            tokens += sum(r["completion_tokens"] or 0 for r in final)
            bar.update(len(final))
            bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")

        try:
            counts += run(pool, items, t, ledger, progress)
        finally:
            bar.close()
        seconds = time.perf_counter() - started  # first request to last answer: no engine start or stop
    done = sum(n for s, n in counts.items() if s != "failed")
    return {"annotated": done, "failed": counts.get("failed", 0), "seconds": round(seconds, 3),
            "reports_per_s": round(done / seconds, 3) if done and seconds else None,
            "completion_tokens_per_s": round(tokens / seconds, 1) if done and seconds else None}


def annotate(cfg: ExperimentConfig, limit: int | None = None, show_progress: bool = True) -> dict:
    """Annotate every pending report of teacher.splits into data.key_info_path, then (teacher.topk_logprobs)
    store the teacher's top-k for the train reports; returns the summary."""
    from transformers import AutoTokenizer

    t = cfg.teacher
    if not cfg.data.key_info_path:
        raise ValueError(f"{cfg.source}: data.key_info_path is null; set it to the ledger file Stage 1 writes "
                         "(e.g. data.key_info_path=runs/key_info.jsonl)")
    pool = None

    def get_pool():  # started once, by the first pass that has work for it
        nonlocal pool
        pool = pool or make_pool(cfg)
        return pool

    with Ledger(cfg.data.key_info_path) as ledger:
        pending, total = load_pending(cfg, ledger, limit)
        log.info("%d reports in %s, %d already in %s, %d to annotate", total, t.splits, total - len(pending),
                 ledger.path, len(pending))
        tokenizer = AutoTokenizer.from_pretrained(t.tokenizer or t.model) if pending or t.topk_logprobs else None
        try:
            this_run = annotate_pending(cfg, ledger, pending, tokenizer, get_pool, show_progress)
            summary = {**summarize(ledger, t), "this_run": this_run}
            if t.topk_logprobs:  # the second pass: distributions for token-level distillation
                from teacher_serving.topk import score

                summary["topk"] = score(cfg, get_pool, ledger.records, tokenizer, sampling_key(t))
        finally:
            if pool is not None:
                pool.close()
    summary_path = Path(cfg.data.key_info_path).with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    log.info("ledger %s: %s; grounding per language: %s; this run: %s", cfg.data.key_info_path, summary["status"],
             summary["grounding"], summary["this_run"])
    if "topk" in summary:
        log.info("teacher top-k this run: %s", summary["topk"])
    return summary
