"""Will a run fit? Per-GPU memory of the student under each ZeRO stage, and the teacher's layout.

Pure arithmetic over a model's config.json (no torch, no DeepSpeed), so a plan costs nothing
and runs on a laptop. Bytes are counted for bf16 training with AdamW:

- model states (DeepSpeed's accounting, as in its estimate_zero*_model_states_mem_needs):
  16-bit weights 2, 16-bit grads 2, fp32 grads 4, fp32 master weights 4, Adam moments 8 bytes
  per parameter. ZeRO-2 keeps the 16-bit weights on every GPU and shards the other 18 bytes;
  ZeRO-3 shards all 18 and gathers one layer at a time (its 16-bit weights and grads: 4 bytes
  per parameter of the largest layer); ZeRO-3 + offload keeps only that gathered layer on the GPU.
- activations: the tensors each decoder layer saves for backward (sdpa/FlashAttention keep no
  seq x seq matrix); with gradient checkpointing only each layer's input plus one layer being
  recomputed. tests/test_plan.py checks the count against the tensors a real Qwen2 saves.
- logits of the labelled tokens (the trainer never builds logits for the prompt) and their
  gradient, plus the fp32 chunk of the cross-entropy.
- DeepSpeed's communication buckets, read from the ds_config ("auto" resolved as the Hugging Face
  integration does).

The teacher needs its 16-bit weights split over tensor_parallel_size GPUs plus a KV cache that
holds `min_sequences` prompts of the longest report at once (vLLM will not start below one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from distil.architecture import Architecture, PlanError

GiB = 1024**3
DS_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
BF16 = 2
STATE_BYTES_SHARDED = 18   # 16-bit grads 2 + fp32 grads 4 + fp32 master weights 4 + Adam m, v 8
OVERLAP_COMM_FACTOR = 4.5  # ZeRO-2 overlap_comm holds 4.5x its buckets (DeepSpeed/HF docs)
STRATEGIES = ("zero2", "zero3", "zero3_offload")


def gpu_hours_per_1000_reports(seconds: float, reports: int, gpus: int) -> float | None:
    """What 1,000 reports cost at a measured pace: GPUs held x hours; None without GPUs or reports (on CPU a
    GPU-hour means nothing)."""
    if not gpus or not reports or seconds <= 0:
        return None
    return gpus * seconds / reports * 1000 / 3600


# ---------------------------------------------------------------------------------------------
# Student: parameters, model states, activations.


def parameter_counts(a: Architecture) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module).

    Per layer: q, k, v projections with bias, o projection without, gate/up/down without bias,
    two RMSNorm weights. Embedding (and lm_head when not tied), final RMSNorm. The largest module
    is what ZeRO-3 must gather at once: the embedding for every Qwen size.
    """
    h, i, kv = a.hidden_size, a.intermediate_size, a.kv_dim
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    mlp = 3 * h * i
    layer = attention + mlp + 2 * h
    embedding = a.vocab_size * h
    total = a.num_layers * layer + embedding * (1 if a.tie_word_embeddings else 2) + h
    largest = max(embedding, h * i, h * h + h)
    return total, largest


@dataclass(frozen=True)
class ModelStates:
    gpu_bytes: int          # per GPU
    cpu_bytes: int          # per node (offload only; 0 otherwise)


def model_states(total_params: int, largest_layer_params: int, strategy: str, gpus_per_node: int,
                 nodes: int) -> ModelStates:
    """Per-GPU (and per-node CPU) bytes of weights, gradients and optimizer states."""
    world = gpus_per_node * nodes
    sharded = STATE_BYTES_SHARDED * total_params // world
    gathered = 2 * BF16 * largest_layer_params  # one layer's 16-bit weights and 16-bit grads
    if strategy == "zero2":
        return ModelStates(BF16 * total_params + sharded, 0)
    if strategy == "zero3":
        return ModelStates(gathered + sharded, 0)
    if strategy == "zero3_offload":
        # the 18 bytes live in pinned CPU memory, sharded over nodes; DeepSpeed adds 50% for buffers
        return ModelStates(gathered, int(1.5 * STATE_BYTES_SHARDED * total_params / nodes))
    raise PlanError(f"unknown strategy {strategy!r}; one of {list(STRATEGIES)}")


def layer_activation_bytes_per_token(a: Architecture) -> int:
    """Bytes one decoder layer saves for backward per token (bf16; sdpa or FlashAttention).

    Each RMSNorm saves its fp32 input (4h), its fp32 1/rms (4), the bf16 normalized value (2h)
    and the bf16 weighted output that the next projection reads (2h). Attention saves q, k, v
    after RoPE, its output (2*(2h + 2*kv)) and a fp32 log-sum-exp per head. The SwiGLU MLP
    saves gate, silu(gate), up and their product (4 x 2i).
    """
    h, kv, i = a.hidden_size, a.kv_dim, a.intermediate_size
    norms = 2 * (4 * h + 4 + BF16 * h + BF16 * h)
    attention = BF16 * (2 * h + 2 * kv) + 4 * a.num_heads
    mlp = 4 * BF16 * i
    return norms + attention + mlp


def activation_bytes(a: Architecture, tokens: int, checkpointing: bool) -> int:
    """Saved activations of one micro-batch of `tokens` tokens (packed rows x pack_length).

    Outside the layers: the int64 token ids, RoPE's bf16 cos and sin, and the final RMSNorm
    (its weighted output is kept only for the labelled tokens, counted in logits_bytes). With
    gradient checkpointing a layer keeps only its bf16 input, and backward recomputes one layer
    at a time.
    """
    outside = 8 + 2 * BF16 * a.head_dim + (4 * a.hidden_size + 4 + BF16 * a.hidden_size)
    per_layer = layer_activation_bytes_per_token(a)
    if not checkpointing:
        return tokens * (a.num_layers * per_layer + outside)
    return tokens * (a.num_layers * BF16 * a.hidden_size + per_layer + outside)


def logits_bytes(a: Architecture, labelled_tokens: int, chunk_tokens: int) -> int:
    """bf16 logits of the labelled tokens and their gradient, plus one checkpointed fp32 chunk
    of the cross-entropy (its upcast logits and their gradient); see distil/loss.py."""
    chunk = min(chunk_tokens, labelled_tokens)
    return 2 * BF16 * labelled_tokens * a.vocab_size + 2 * 4 * chunk * a.vocab_size


def _resolve(value, auto: float) -> float:
    return auto if value == "auto" else float(value)


def buffer_bytes(a: Architecture, strategy: str, ds_config: dict) -> int:
    """DeepSpeed's communication buckets (16-bit), with "auto" resolved as transformers does:
    reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2."""
    zero = ds_config.get("zero_optimization", {})
    h2 = a.hidden_size * a.hidden_size
    reduce_bucket = _resolve(zero.get("reduce_bucket_size", 5e8), h2)
    if strategy == "zero2":
        allgather_bucket = _resolve(zero.get("allgather_bucket_size", 5e8), h2)
        factor = OVERLAP_COMM_FACTOR if zero.get("overlap_comm", False) else 1.0
        return int(factor * BF16 * (reduce_bucket + allgather_bucket))
    prefetch_bucket = _resolve(zero.get("stage3_prefetch_bucket_size", 5e7), 0.9 * h2)
    return int(BF16 * (reduce_bucket + prefetch_bucket))


@dataclass(frozen=True)
class StudentOption:
    strategy: str
    checkpointing: bool
    states: ModelStates
    activations: int
    logits: int
    buffers: int
    usable: int             # GPU bytes available after the headroom

    @property
    def total(self) -> int:
        return self.states.gpu_bytes + self.activations + self.logits + self.buffers

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


@dataclass(frozen=True)
class StudentPlan:
    arch: Architecture
    total_params: int
    largest_layer_params: int
    tokens: int
    labelled_tokens: int
    options: tuple[StudentOption, ...]   # fastest first

    @property
    def recommended(self) -> StudentOption | None:
        return next((o for o in self.options if o.fits), None)


# ZeRO-2 before ZeRO-3 (ZeRO-3 gathers every layer in forward and backward: 1.5x the traffic),
# no checkpointing before checkpointing (recomputing the forward costs about a third more).
PREFERENCE = (("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True),
              ("zero3_offload", False), ("zero3_offload", True))


def check_context(a: Architecture, context: int, flag: str) -> None:
    """A plan for more positions than the model was configured for would be one it cannot run."""
    if a.max_position_embeddings and context > a.max_position_embeddings:
        raise PlanError(f"{flag} {context}: more tokens than {a.name} handles (max_position_embeddings "
                        f"{a.max_position_embeddings} in its config.json); plan for at most that, or extend its "
                        "context first (rope_scaling, e.g. YaRN, in config.json)")


def plan_student(a: Architecture, context: int, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                 micro_batch_rows: int = 1, answer_fraction: float = 0.25, chunk_tokens: int = 2048,
                 headroom: float = 0.10, ds_configs: dict[str, dict] | None = None) -> StudentPlan:
    """Every (ZeRO stage, checkpointing) option for packed rows of `context` tokens, fastest first.

    answer_fraction: share of a row's tokens that carry a label (summary or key information);
    headroom: share of GPU memory kept for the CUDA context, NCCL and allocator fragmentation.
    """
    if min(context, nodes, gpus_per_node, micro_batch_rows, chunk_tokens) <= 0 or gpu_memory_gib <= 0:
        raise PlanError("context, nodes, gpus per node, GPU memory, micro-batch rows and chunk tokens must be positive")
    if not 0 < answer_fraction <= 1 or not 0 <= headroom < 1:
        raise PlanError(f"answer_fraction must be in (0, 1] (got {answer_fraction}) and headroom in [0, 1) "
                        f"(got {headroom})")
    check_context(a, context, "--context (train.pack_length)")
    ds_configs = ds_configs if ds_configs is not None else load_ds_configs()
    total, largest = parameter_counts(a)
    tokens = context * micro_batch_rows
    labelled = math.ceil(tokens * answer_fraction)
    usable = int(gpu_memory_gib * GiB * (1 - headroom))
    options = []
    for strategy, ckpt in PREFERENCE:
        options.append(StudentOption(
            strategy=strategy, checkpointing=ckpt,
            states=model_states(total, largest, strategy, gpus_per_node, nodes),
            activations=activation_bytes(a, tokens, ckpt), logits=logits_bytes(a, labelled, chunk_tokens),
            buffers=buffer_bytes(a, strategy, ds_configs.get(strategy, {})), usable=usable))
    return StudentPlan(a, total, largest, tokens, labelled, tuple(options))


def load_ds_configs(folder: Path = DS_CONFIGS_DIR) -> dict[str, dict]:
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in STRATEGIES
            if (folder / f"{name}.json").is_file()}


# ---------------------------------------------------------------------------------------------
# Teacher: tensor-parallel size and replicas.


def kv_bytes_per_token(a: Architecture) -> int:
    """K and V of every layer, bf16."""
    return 2 * a.num_layers * a.kv_dim * BF16


@dataclass(frozen=True)
class TeacherOption:
    tensor_parallel_size: int
    weights_per_gpu: int
    kv_budget_per_replica: int     # bytes left for the KV cache on the replica's GPUs
    sequences: int                 # longest-report sequences the KV cache holds at once
    replicas: int

    def fits(self, min_sequences: int) -> bool:
        return self.sequences >= min_sequences


@dataclass(frozen=True)
class TeacherPlan:
    arch: Architecture
    total_params: int
    context: int
    min_sequences: int
    options: tuple[TeacherOption, ...]

    @property
    def recommended(self) -> TeacherOption | None:
        """The smallest TP that fits: more replicas, and less all-reduce per token."""
        return next((o for o in self.options if o.fits(self.min_sequences)), None)


def plan_teacher(a: Architecture, context: int, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                 memory_fraction: float = 0.9, runtime_gib: float = 3.0, min_sequences: int = 8) -> TeacherPlan:
    """Each tensor-parallel size that divides the attention heads and fits in a node.

    memory_fraction: vLLM's gpu_memory_utilization; runtime_gib: per-GPU memory vLLM keeps for
    activations of its profiling batch and CUDA graphs (outside the KV cache).
    """
    if min(context, nodes, gpus_per_node, min_sequences) <= 0 or gpu_memory_gib <= 0:
        raise PlanError("teacher context, nodes, GPUs per node, GPU memory and sequences must be positive")
    check_context(a, context, "--teacher-context (teacher.max_model_len)")
    total, _ = parameter_counts(a)
    per_sequence = kv_bytes_per_token(a) * context
    options = []
    for tp in (1, 2, 4, 8, 16):
        if tp > gpus_per_node or a.num_heads % tp or (a.num_kv_heads % tp and tp % a.num_kv_heads):
            continue
        weights = math.ceil(BF16 * total / tp)
        free = gpu_memory_gib * GiB * memory_fraction - runtime_gib * GiB - weights
        budget = max(0, int(free)) * tp
        options.append(TeacherOption(tp, weights, budget, budget // per_sequence, nodes * (gpus_per_node // tp)))
    return TeacherPlan(a, total, context, min_sequences, tuple(options))
