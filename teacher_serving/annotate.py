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
With teacher.summarize the teacher also summarizes every report without a gold summary (S: P_sum,
U: report) into a ledger of its own beside this one (distil.data.teacher_summaries_path), with the
same keys, retries and guarantees: Stage 2's third kind of example (loss.teacher_summary_weight).
Logs carry ids and counts only, never report text.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from distil.atomic import write_json
from distil.config import ExperimentConfig, TeacherConfig, teachers
from distil.data import DataError, read_prepared, teacher_summaries_path
from distil.ledger import Ledger
from distil.logs import verbose
from distil.plan import gpu_hours_per_1000_reports
from distil.prompts import build_messages
from distil.teacher_config import annotation_key, is_annotation_of, key_of, record_key, sampling_params
from teacher_serving.answers import RETRYABLE, classify, key_info_schema
from teacher_serving.grounding import grounding_score, summarize_grounding
from teacher_serving.placement import PlacementError
from teacher_serving.pool import GenerateRequest, StartOnFirstUse, TeacherPool, drive
from teacher_serving.topk import score

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One report on its way through the teacher."""
    record: dict
    messages: list[dict]
    task: str = "extract"  # or "summarize" (teacher.summarize: reports without a gold summary)
    report_tokens_dropped: int = 0
    attempts: int = 0
    engine_failures: int = 0
    outputs: list[dict] = field(default_factory=list)


def fit_prompts(records: list[dict], tokenizer, budget: int, task: str = "extract") -> tuple[list[Item], list[dict]]:
    """Prompts of `task` that fit `budget` tokens; the report is cut to its first tokens when needed.

    Returns the items and the records whose prompt cannot fit even with an empty report.
    """
    def render(lang: str, report: str) -> tuple[list[dict], str]:
        messages = build_messages(task, lang, report)
        return messages, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    rendered = [render(r["lang"], r["report"]) for r in records]
    lengths = [len(ids) for ids in tokenizer([text for _, text in rendered], add_special_tokens=False)["input_ids"]]
    items, impossible = [], []
    for record, (messages, _), n in zip(records, rendered, lengths):
        if n <= budget:
            items.append(Item(record, messages, task=task))
            continue
        ids = tokenizer(record["report"], add_special_tokens=False)["input_ids"]
        keep = len(ids) - (n - budget)
        while keep > 0:  # decoding a cut can merge tokens differently: re-measure until it fits
            messages, text = render(record["lang"], tokenizer.decode(ids[:keep]))
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n <= budget:
                items.append(Item(record, messages, task=task, report_tokens_dropped=len(ids) - keep))
                break
            keep -= n - budget
        else:
            impossible.append(record)
    return items, impossible


def request(item: Item, t: TeacherConfig, schema: dict | None) -> GenerateRequest:
    """The engine request of the item's next try: configured sampling first, retry_temperature after."""
    return GenerateRequest(item.messages, sampling_params(t, item.attempts, item.task), schema)


def ledger_record(item: Item, t: TeacherConfig, status: str, output: dict | None) -> dict:
    output = output or {}
    report = item.record["report"]
    score = grounding_score(output["text"], report, lang=item.record["lang"]) if status == "ok" else None
    if status == "ok" and t.grounding_threshold is not None and score is not None and score < t.grounding_threshold:
        status = "ungrounded"
    answer = "key_info" if item.task == "extract" else "summary"
    return {"id": item.record["id"], "lang": item.record["lang"], "split": item.record.get("split"),
            answer: output.get("text"), "status": status, **annotation_key(t, item.task), "teacher_model": t.model,
            "finish_reason": output.get("finish_reason"),
            "prompt_tokens": output.get("prompt_tokens"), "completion_tokens": output.get("completion_tokens"),
            "attempts": item.attempts, "report_tokens_dropped": item.report_tokens_dropped, "grounding": score}


def annotation_ledger(path: str | Path) -> Ledger:
    """The key-information ledger: one record per (report, teacher, prompt version, sampling)."""
    return Ledger(path, key=key_of)


def load_pending(cfg: ExperimentConfig, ledger: Ledger, limit: int | None,
                 task: str = "extract") -> tuple[list[dict], int]:
    """The reports of teacher.splits (the first `limit`; for "summarize" those without a gold summary) whose
    answer to `task` `ledger` lacks, and how many there are in all."""
    t = cfg.teacher
    records = []
    for split in t.splits:
        records += read_prepared(Path(cfg.data.prepared_dir) / f"{split}.jsonl")
    if limit is not None:
        records = records[:limit]
    if task == "summarize":
        records = [r for r in records if r["summary"] is None]
    wanted = annotation_key(t, task)
    pending = [r for r in records if record_key(r["id"], wanted) not in ledger.done]
    return pending, len(records)


def open_pool(cfg: ExperimentConfig) -> TeacherPool:
    """The vLLM replicas on Ray (default) or the remote endpoint (teacher.backend: openai)."""
    t = cfg.teacher
    if t.backend == "openai":
        from teacher_serving.remote import RemotePool

        return RemotePool(t)
    import ray

    from teacher_serving.placement import plan_replicas
    from teacher_serving.replica import ReplicaPool

    if not ray.is_initialized():  # joins RAY_ADDRESS (set by `ray job submit`), else starts a local Ray
        job = "RAY_ADDRESS" in os.environ  # a cluster job's log is where its users look for the engines' lines
        ray.init(log_to_driver=job or verbose(), logging_level=logging.INFO if job or verbose() else logging.WARNING)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    plan = plan_replicas(nodes, t.tensor_parallel_size, t.pipeline_parallel_size, t.num_replicas, t.cpus_per_replica)
    log.info("teacher %s: %d replica(s), bundles %s, %s, executor %s", t.model, plan.num_replicas,
             list(plan.bundles), plan.strategy, plan.executor_backend or "vLLM default")
    return ReplicaPool(t, plan)


def run(pool: TeacherPool, items: list[Item], t: TeacherConfig, ledger: Ledger, progress=None) -> Counter:
    """Annotate `items`; each answer is written the moment it returns (retrying an empty, cut or
    invalid one up to teacher.max_attempts). Counts of this run. Summaries are free text whatever
    teacher.key_info_format says."""
    json_format = t.key_info_format == "json" and all(item.task == "extract" for item in items)
    schema = key_info_schema(t.json_max_field_chars) if json_format else None
    counts: Counter = Counter()

    def accept(answered: list[tuple[Item, dict]]) -> list[Item]:
        retry, final = [], []
        for item, output in answered:
            item.attempts += 1
            status = classify(output["text"], output["finish_reason"], "json" if json_format else "text")
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


def summarize(ledger: Ledger, t: TeacherConfig, task: str = "extract") -> dict:
    """Counts per status and grounding per language over this teacher's records in the whole ledger."""
    wanted = annotation_key(t, task)
    mine = [r for r in ledger.records if is_annotation_of(r, wanted)]
    return {"records": len(mine), "status": dict(Counter(r["status"] for r in mine)),
            "grounding": summarize_grounding(mine, t.grounding_threshold)}


def annotate_pending(cfg: ExperimentConfig, ledger: Ledger, pending: list[dict], tokenizer, pool: StartOnFirstUse,
                     show_progress: bool, task: str = "extract") -> dict:
    """The teacher's answers to `task` (key information, or summaries) for `pending` into `ledger`; this
    pass's counts."""
    from tqdm import tqdm

    t = cfg.teacher
    counts: Counter = Counter()
    tokens, seconds, items = 0, 0.0, []
    if pending:
        budget = t.max_model_len - sampling_params(t, 0, task)["max_tokens"]
        items, impossible = fit_prompts(pending, tokenizer, budget, task)
        too_long = [i for i in items if i.report_tokens_dropped]
        if t.too_long == "skip":
            impossible += [i.record for i in too_long]
            items = [i for i in items if not i.report_tokens_dropped]
        elif too_long:
            log.info("%d report(s) cut to fit max_model_len - max_new_tokens = %d tokens (teacher.too_long)",
                     len(too_long), budget)
        skipped = [ledger_record(Item(r, [], task=task), t, "skipped_too_long", None) for r in impossible]
        ledger.append(skipped)
        counts.update(r["status"] for r in skipped)
    if items:
        pool.start()  # before the clock: engine start-up is not annotation time
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
    cost = gpu_hours_per_1000_reports(seconds, done, pool.gpus if items else 0)
    return {"annotated": done, "failed": counts.get("failed", 0), "seconds": round(seconds, 3),
            "reports_per_s": round(done / seconds, 3) if done and seconds else None,
            "completion_tokens_per_s": round(tokens / seconds, 1) if done and seconds else None,
            "gpus": pool.gpus if items else 0,
            "gpu_hours_per_1000_reports": round(cost, 3) if cost is not None else None}


def annotate(cfg: ExperimentConfig, limit: int | None = None, show_progress: bool = True) -> dict:
    """Annotate every pending report of teacher.splits into data.key_info_path, (teacher.summarize) summarize
    the ones without a gold summary, then (teacher.topk_logprobs) store the teacher's top-k for the answers
    Stage 2 trains on; returns the summary. With several teachers (combine.teachers) each does all of it in
    turn, on the whole cluster, into the same ledgers; one that fails costs its own answers only (the summary
    holds its error, the next teacher goes on) and the summary has one entry per teacher."""
    if not cfg.data.key_info_path:
        raise ValueError(f"{cfg.source}: data.key_info_path is null; set it to the ledger file Stage 1 writes "
                         "(e.g. data.key_info_path=runs/key_info.jsonl)")
    every = teachers(cfg)
    if len(every) == 1:
        summary = annotate_teacher(cfg, limit, show_progress)
    else:
        summary = {"teachers": {}}
        for n, teacher in enumerate(every, 1):
            log.info("teacher %d of %d: %s (%s)", n, len(every), teacher.name, teacher.config.model)
            try:
                summary["teachers"][teacher.name] = annotate_teacher(replace(cfg, teacher=teacher.config), limit,
                                                                     show_progress)
            except (DataError, PlacementError, ValueError):
                raise  # bad input (the same reports for every teacher), or a teacher the cluster cannot hold
            except Exception as exc:  # noqa: BLE001 - an engine that cannot start or dies: this teacher only
                log.error("teacher %s failed: %s: %s; the other teachers go on, a rerun retries it", teacher.name,
                          type(exc).__name__, exc)
                summary["teachers"][teacher.name] = {"error": f"{type(exc).__name__}: {exc}"}
    write_json(Path(cfg.data.key_info_path).with_suffix(".summary.json"), summary)
    return summary


def failed(summary: dict) -> bool:
    """Whether a rerun has work to retry: a report, summary or top-k that failed, or a teacher that did."""
    if "teachers" in summary:
        return any("error" in one or failed(one) for one in summary["teachers"].values())
    return bool(summary["this_run"]["failed"] or summary.get("teacher_summaries", {}).get("this_run", {}).get("failed")
                or summary.get("topk", {}).get("failed"))


def annotate_teacher(cfg: ExperimentConfig, limit: int | None, show_progress: bool) -> dict:
    """Stage 1 for the teacher section's teacher (see annotate)."""
    from transformers import AutoTokenizer

    t = cfg.teacher
    pool = StartOnFirstUse(lambda: open_pool(cfg))  # started by the first pass with work for it
    with annotation_ledger(cfg.data.key_info_path) as ledger:
        pending, total = load_pending(cfg, ledger, limit)
        if not total:
            raise DataError(f"no reports in {cfg.data.prepared_dir} for teacher.splits {t.splits}: nothing to "
                            "annotate; run launch/prepare_data.py, or set teacher.splits to splits that have reports")
        log.info("%d reports in %s, %d already in %s, %d to annotate", total, t.splits, total - len(pending),
                 ledger.path, len(pending))
        summaries = annotation_ledger(teacher_summaries_path(cfg.data.key_info_path)) if t.summarize else None
        try:
            to_summarize = load_pending(cfg, summaries, limit, "summarize")[0] if summaries else []
            needed = pending or to_summarize or t.topk_logprobs
            tokenizer = AutoTokenizer.from_pretrained(t.tokenizer or t.model) if needed else None
            this_run = annotate_pending(cfg, ledger, pending, tokenizer, pool, show_progress)
            summary = {**summarize(ledger, t), "this_run": this_run}
            if summaries is not None:  # the teacher's summaries of the reports without a gold one
                log.info("%d report(s) without a gold summary to summarize, %d in %s", len(to_summarize),
                         len(summaries.records), summaries.path)
                this_run = annotate_pending(cfg, summaries, to_summarize, tokenizer, pool, show_progress, "summarize")
                summary["teacher_summaries"] = {**summarize(summaries, t, "summarize"), "this_run": this_run}
            if t.topk_logprobs:  # the last pass: distributions for token-level distillation
                summary["topk"] = score(cfg, pool, ledger.records, tokenizer,
                                        summaries.records if summaries is not None else [])
        finally:
            if summaries is not None:
                summaries.close()
            pool.close()
    log.info("ledger %s: %s; grounding per language: %s; this run: %s", cfg.data.key_info_path, summary["status"],
             summary["grounding"], summary["this_run"])
    if "topk" in summary:
        log.info("teacher top-k this run: %s", summary["topk"])
    return summary
