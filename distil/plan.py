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

GiB = 1024**3
MODELS_DIR = Path(__file__).resolve().parents[1] / "launch" / "configs" / "models"
DS_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
BF16 = 2
STATE_BYTES_SHARDED = 18   # 16-bit grads 2 + fp32 grads 4 + fp32 master weights 4 + Adam m, v 8
OVERLAP_COMM_FACTOR = 4.5  # ZeRO-2 overlap_comm holds 4.5x its buckets (DeepSpeed/HF docs)
STRATEGIES = ("zero2", "zero3", "zero3_offload")


class PlanError(ValueError):
    """A plan cannot be made from these inputs; the message says what to change."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that decide its memory (Qwen2 layout)."""
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def architecture_from_config(config: dict, name: str) -> Architecture:
    """An Architecture from the fields of a Hugging Face config.json."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in keys if k not in config]
    if missing:
        raise PlanError(f"{name}: config.json lacks {missing}; the planner needs a decoder config like Qwen2's")
    return Architecture(
        name=name, hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        vocab_size=config["vocab_size"], tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings", 0))


def bundled_models() -> list[str]:
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/config.json"))


def load_architecture(name_or_path: str) -> Architecture:
    """A bundled model by name ("Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"), a model folder or a config.json."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        short = name_or_path.split("/")[-1].removesuffix("-Instruct")
        path = MODELS_DIR / short / "config.json"
    if not path.is_file():
        raise PlanError(f"unknown model {name_or_path!r}: not a folder with config.json, not a config.json, and "
                        f"not bundled ({', '.join(bundled_models())}); pass the model's config.json")
    return architecture_from_config(json.loads(path.read_text()), name_or_path)


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


# ---------------------------------------------------------------------------------------------
# The printed report.


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_plan(student: StudentPlan, teacher: TeacherPlan, nodes: int, gpus_per_node: int,
                gpu_memory_gib: float, teacher_nodes: int) -> str:
    s, a = student, student.arch
    lines = [
        f"Student {a.name}: {s.total_params / 1e9:.2f} B parameters "
        f"(largest layer {s.largest_layer_params / 1e6:.1f} M), "
        f"{s.tokens} tokens per micro-batch, {nodes} node(s) x {gpus_per_node} GPU(s) x {gpu_memory_gib:g} GiB",
        "",
        "  per GPU, GiB            model states  activations  logits  buffers   total  fits",
    ]
    usable = s.options[0].usable
    for o in s.options:
        name = o.strategy + (" + ckpt" if o.checkpointing else "")
        lines.append(f"  {name:<22} {_gib(o.states.gpu_bytes):>13} {_gib(o.activations):>12} {_gib(o.logits):>7} "
                     f"{_gib(o.buffers):>8} {_gib(o.total):>7}  {'yes' if o.fits else 'no'}")
    offload = next(o for o in s.options if o.strategy == "zero3_offload")
    headroom = 1 - usable / (gpu_memory_gib * GiB)
    lines += [f"  (usable per GPU: {_gib(usable)} GiB after {headroom:.0%} headroom; zero3_offload needs "
              f"{_gib(offload.states.cpu_bytes)} GiB of CPU memory per node; "
              f"logits: {s.labelled_tokens} labelled tokens)",
              ""]
    t = teacher
    lines.append(f"Teacher {t.arch.name}: {t.total_params / 1e9:.2f} B parameters, "
                 f"{_gib(kv_bytes_per_token(t.arch) * t.context)}"
                 f" GiB of KV cache per {t.context}-token sequence, {teacher_nodes} node(s) x {gpus_per_node} GPU(s)")
    lines.append("  TP  weights/GPU GiB  KV budget/replica GiB  sequences  replicas")
    for o in t.options:
        mark = "" if o.fits(t.min_sequences) else f"  (< {t.min_sequences} sequences)"
        lines.append(f"  {o.tensor_parallel_size:>2} {_gib(o.weights_per_gpu):>16} {_gib(o.kv_budget_per_replica):>22} "
                     f"{o.sequences:>10} {o.replicas:>9}{mark}")
    lines.append("")
    lines += recommendation(student, teacher, nodes, gpus_per_node, teacher_nodes)
    return "\n".join(lines)


def recommendation(student: StudentPlan, teacher: TeacherPlan, nodes: int, gpus_per_node: int,
                   teacher_nodes: int) -> list[str]:
    """The YAML and sbatch lines to use, or what to change when nothing fits."""
    best, tbest = student.recommended, teacher.recommended
    lines = ["Recommended:"]
    if best is None:
        lines.append(f"  student: nothing fits {student.tokens} tokens on {nodes} x {gpus_per_node} GPUs; "
                     "add nodes, use GPUs with more memory or lower train.pack_length")
    else:
        lines.append(f"  student: ds_configs/{best.strategy}.json"
                     f"{' with gradient checkpointing' if best.checkpointing else ''} ({_gib(best.total)} GiB per GPU)")
    if tbest is None:
        lines.append(f"  teacher: no tensor-parallel size holds {teacher.min_sequences} sequences of {teacher.context} "
                     "tokens; lower teacher.max_model_len or use GPUs with more memory")
    else:
        lines.append(f"  teacher: TP {tbest.tensor_parallel_size}, {tbest.replicas} replica(s) of "
                     f"{tbest.sequences} concurrent {teacher.context}-token sequences")
    lines += ["", "  # experiment YAML"]
    if best is not None:
        lines += ["  model:", f"    gradient_checkpointing: {str(best.checkpointing).lower()}",
                  "  train:", f"    deepspeed: ds_configs/{best.strategy}.json", f"    pack_length: {student.tokens}"]
    if tbest is not None:
        lines += ["  teacher:", f"    tensor_parallel_size: {tbest.tensor_parallel_size}",
                  f"    max_model_len: {teacher.context}"]
    lines += ["  slurm:", f"    gpus_per_node: {gpus_per_node}", f"    stage1_nodes: {teacher_nodes}",
              f"    stage2_nodes: {nodes}", "",
              "  # sbatch (slurm/pipeline.sh CONFIG passes these from the YAML)",
              f"  sbatch --nodes={teacher_nodes} --gpus-per-node={gpus_per_node} slurm/stage1.sbatch CONFIG",
              f"  sbatch --nodes={nodes} --gpus-per-node={gpus_per_node} slurm/stage2.sbatch CONFIG"]
    return lines
