"""One experiment = one YAML file. Each top-level section maps to one dataclass (`teacher` and `combine` in
distil/teacher_config.py, `eval` in distil/eval_config.py, `merge` and `align` in distil/align_config.py,
`onpolicy` in distil/onpolicy_config.py, the others here).

Defaults live only in those files. Loading is strict: an unknown key, a value of the wrong type
or out of range is an error naming the file and the dotted key, and all errors are reported
together (one ConfigError), so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distil.align_config import AlignConfig, MergeConfig
from distil.atomic import blocking_file
from distil.eval_config import EvalConfig
from distil.onpolicy_config import OnPolicyConfig
from distil.options import LANGUAGES, ConfigError, option, raise_if, require
from distil.teacher_config import CombineConfig, Teacher, TeacherConfig, annotation_key

__all__ = ["ConfigError", "LANGUAGES", "DataConfig", "ModelConfig", "LossConfig", "TrainConfig", "TeacherConfig",
           "EvalConfig", "SlurmConfig", "CombineConfig", "MergeConfig", "AlignConfig", "OnPolicyConfig",
           "ExperimentConfig", "Teacher",
           "load_config", "teachers", "check_training", "dump_config", "reference_table"]


@dataclass
class DataConfig:
    sources: list[str] = option(
        "Inputs of prepare_data: MultiClinSum release folders (<name>_<lang>/fulltext, summaries) "
        "or JSON/JSONL files of {id, lang, report, summary}.",
        factory=lambda: ["data/sample"],
    )
    prepared_dir: str = option("Where prepare_data writes train/valid/test JSONL.", "data/prepared")
    languages: list[str] = option("Languages kept; others are an error.", factory=lambda: list(LANGUAGES))
    split_fractions: list[float] = option("train/valid/test fractions per language.", factory=lambda: [0.80, 0.01, 0.19])
    split_seed: int = option("Seed of the per-language shuffle before splitting.", 42)
    crop_report_chars: int | None = option("Crop reports to this many characters (train and valid only).", None)
    crop_summary_chars: int | None = option("Crop summaries to this many characters (train and valid only).", None)
    key_info_path: str | None = option(
        "Stage 1 ledger (JSONL keyed by id) with the teacher's key information; null = summary task only.",
        None,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, len(self.split_fractions) == 3 and abs(sum(self.split_fractions) - 1) < 1e-6
                 and all(f >= 0 for f in self.split_fractions),
                 "split_fractions", f"need three non-negative fractions summing to 1, got {self.split_fractions}")
        bad = [lang for lang in self.languages if lang not in LANGUAGES]
        require(p, not bad, "languages", f"unknown {bad}; supported: {list(LANGUAGES)}")
        for key in ("crop_report_chars", "crop_summary_chars"):
            value = getattr(self, key)
            require(p, value is None or value > 0, key, f"must be positive or null, got {value}")
        require(p, bool(self.sources), "sources", "at least one input folder or file is needed")
        require(p, self.split_seed >= 0, "split_seed", f"must be >= 0, got {self.split_seed}")
        raise_if(p)


@dataclass
class ModelConfig:
    name_or_path: str = option("Student: a Hugging Face model folder or hub name.", "runs/tiny-model")
    attn_implementation: Literal["auto", "flash_attention_2", "torch_varlen", "sdpa_varlen", "sdpa", "eager"] = option(
        "auto = on GPU in bf16/fp16: flash_attention_2 when flash-attn is installed, else torch_varlen (torch's own "
        "varlen_attn, torch >= 2.10, sm80+), else sdpa; on GPU in fp32: sdpa (the FlashAttention kernels compute in "
        "16 bits only); on CPU: sdpa_varlen (sdpa per packed example). distil/backend.py logs the choice and why.",
        "auto"
    )
    gradient_checkpointing: bool = option("Recompute activations in backward to fit long contexts.", False)
    tiny: dict[str, int] | None = option(
        "Shape of the tiny random Qwen2 that launch/make_tiny_model.py builds at name_or_path (CPU demo, tests): "
        "{hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size}.",
        None,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "vocab_size")
        unknown = sorted(set(self.tiny or {}) - set(shape))
        require(p, not unknown, "tiny", f"unknown keys {unknown}; known: {list(shape)}")
        bad = {k: v for k, v in (self.tiny or {}).items() if v <= 0}
        require(p, not bad, "tiny", f"sizes must be positive, got {bad}")
        raise_if(p)


@dataclass
class LossConfig:
    gamma: float = option("L = gamma*L_sum + (1-gamma)*L_ext; 1.0 = standard fine-tuning baseline.", 0.8)
    lm_head_chunk_tokens: int = option(
        "Labelled positions whose logits are upcast to fp32 for cross-entropy at a time (bounds memory).", 2048)
    kd_alpha: float = option(
        "Weight of token-level distillation: L = gamma*(L_sum + a*KD_sum) + (1-gamma)*(L_ext + a*KD_ext), KD = the "
        "divergence from the teacher's top-k that Stage 1 stored (teacher.topk_logprobs) next to data.key_info_path; "
        "0 = off (the teacher's text only).", 0.0)
    kd_beta: float = option("KD divergence: 0 = forward KL(teacher||student), 1 = reverse KL, between = generalized "
                           "Jensen-Shannon (0.5 = symmetric JSD).", 0.5)
    kd_temperature: float = option("KD temperature, applied to the top-k + rest buckets of both sides (1 = none).", 1.0)
    teacher_summary_weight: float = option(
        "Weight w of the third kind of example, the teacher's summaries of the reports without a gold summary "
        "(data.prepared_dir/unlabelled.jsonl; Stage 1 writes them with teacher.summarize: true): L += w * L_teacher, "
        "its own mean over its tokens (sequence-level distillation); 0 = off.", 0.0)

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, 0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        require(p, self.lm_head_chunk_tokens > 0, "lm_head_chunk_tokens", "must be positive")
        require(p, self.kd_alpha >= 0.0, "kd_alpha", f"must be >= 0 (0 = off), got {self.kd_alpha}")
        require(p, 0.0 <= self.kd_beta <= 1.0, "kd_beta", f"must be in [0, 1], got {self.kd_beta}")
        require(p, self.kd_temperature > 0.0, "kd_temperature", f"must be positive, got {self.kd_temperature}")
        require(p, self.teacher_summary_weight >= 0.0, "teacher_summary_weight",
                f"must be >= 0 (0 = off), got {self.teacher_summary_weight}")
        raise_if(p)


@dataclass
class TrainConfig:
    output_dir: str = option("Checkpoints, TensorBoard logs and the exported model (output_dir/hf).", "runs/tiny")
    deepspeed: str | None = option("DeepSpeed JSON; the --deepspeed flag overrides it.", "ds_configs/zero2.json")
    max_length: int = option("Tokens per example; longer reports are truncated, never the answer.", 3072)
    pack_length: int = option("Token budget of one packed row (several examples, no padding).", 8192)
    micro_batch_rows: int = option("Packed rows per device per micro-batch.", 1)
    gradient_accumulation_steps: int = option("Micro-batches per optimizer step.", 1)
    learning_rate: float = option("Peak learning rate.", 1e-5)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("Schedule.", "cosine")
    warmup_ratio: float = option("Share of steps spent warming up.", 0.03)
    weight_decay: float = option("AdamW weight decay.", 0.01)
    max_grad_norm: float = option("Gradient clipping.", 1.0)
    num_epochs: float = option("Passes over the training rows.", 3.0)
    max_steps: int = option("Stop after this many optimizer steps; -1 = num_epochs decides.", -1)
    precision: Literal["bf16", "fp16", "fp32"] = option("Training precision (fp32 on CPU).", "bf16")
    seed: int = option("Seed of weights init, packing order and sampling.", 42)
    logging_steps: int = option("Log L, L_sum, L_ext, tokens/s every N steps.", 10)
    save_steps: int = option("Checkpoint every N optimizer steps.", 500)
    save_total_limit: int | None = option("Keep at most N checkpoints (null = all).", 3)
    resume: Literal["auto", "never"] = option("auto = resume from the newest complete checkpoint in output_dir.", "auto")
    export: bool = option("Write a consolidated Hugging Face model to output_dir/hf at the end.", True)
    report_to: list[str] = option("Trainer loggers.", factory=lambda: ["tensorboard"])
    trace_data: bool = option("Write the example ids each rank trains on to output_dir/data_trace/ (tests).", False)
    dataloader_workers: int = option("DataLoader worker processes per rank.", 0)
    collective_timeout_s: int = option(
        "Seconds a rank waits in a collective (all-reduce, barrier) for its peers before it fails: a node that "
        "died without closing its connections ends the job after this, instead of a hang. Leave room for the "
        "longest checkpoint save or export (other ranks wait for rank 0).", 1800)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("max_length", "pack_length", "micro_batch_rows", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "collective_timeout_s"):
            require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(p, self.pack_length >= self.max_length, "pack_length",
                 f"must be >= max_length ({self.max_length}) so every example fits in a row, got {self.pack_length}")
        require(p, self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        require(p, self.weight_decay >= 0, "weight_decay", f"must be >= 0 (0 = none), got {self.weight_decay}")
        require(p, self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        require(p, self.num_epochs >= 0, "num_epochs", f"must be >= 0, got {self.num_epochs}")
        require(p, self.max_steps == -1 or self.max_steps > 0, "max_steps",
                f"must be positive, or -1 (num_epochs decides), got {self.max_steps}")
        require(p, self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(p, self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit",
                f"must be positive or null (keep all), got {self.save_total_limit}")
        require(p, self.dataloader_workers >= 0, "dataloader_workers", f"must be >= 0, got {self.dataloader_workers}")
        require(p, 0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(p, self.max_steps > 0 or self.num_epochs > 0, "num_epochs",
                 "either num_epochs > 0 or max_steps > 0 is needed")
        raise_if(p)


@dataclass
class SlurmConfig:
    """What slurm/pipeline.sh turns into sbatch options; DISTIL_SLURM_<KEY> variables override it."""

    partition: str | None = option("sbatch --partition; null = the cluster's default partition.", None)
    account: str | None = option("sbatch --account; null = your default account.", None)
    qos: str | None = option("sbatch --qos; null = the default QOS.", None)
    gpus_per_node: int = option("GPUs per node of Stage 1 and Stage 2 (--gpus-per-node); 0 = a CPU-only cluster.", 8)
    cpus_per_node: int = option("CPUs per node (--cpus-per-task of the one task per node): Ray, data loaders.", 64)
    mem: str | None = option("sbatch --mem per node, e.g. 0 (the whole node) or 500G; null = the cluster's default.",
                            None)
    stage1_nodes: int = option("Nodes of the Ray cluster that serves the teacher (Stage 1).", 1)
    stage2_nodes: int = option("Nodes of the DeepSpeed run (Stage 2).", 1)
    ranks_per_node: int | None = option(
        "DeepSpeed ranks per node in Stage 2; null = one per GPU the job got (a CPU-only cluster must set it).", None)
    eval_gpus: int = option("GPUs of the one-node evaluation job; must be 0 on a CPU-only cluster.", 1)
    stage1_minutes: int = option("Time limit of Stage 1 in minutes (sbatch --time).", 1440)
    stage2_minutes: int = option("Time limit of one Stage 2 run in minutes; it saves, requeues and resumes past it.",
                                2880)
    eval_minutes: int = option("Time limit of the evaluation job in minutes.", 720)
    save_before_timeout_s: int = option(
        "Stage 2 saves a checkpoint and requeues itself this many seconds before its time limit "
        "(--signal=B:USR1@N); leave more than one optimizer step plus a checkpoint save.", 300)
    ray_start_timeout_s: int = option("Seconds Stage 1 waits for every node and GPU to join the Ray cluster.", 600)
    env_setup: str | None = option(
        "Shell line each job runs first to get the Python environment, e.g. 'source .venv/bin/activate' or "
        "'module load cuda/12.4 && conda activate distil'; null = the environment sbatch was called from.", None)
    log_dir: str = option("Job logs (--output=<log_dir>/%x-%j.out); slurm/pipeline.sh creates it.", "runs/slurm")
    extra_args: list[str] = option("More sbatch options for every job, e.g. ['--exclusive', '--constraint=a100'].",
                                  factory=list)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("cpus_per_node", "stage1_nodes", "stage2_nodes", "stage1_minutes", "stage2_minutes", "eval_minutes",
                    "save_before_timeout_s", "ray_start_timeout_s"):
            require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        for key in ("gpus_per_node", "eval_gpus"):
            require(p, getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(p, self.eval_gpus <= self.gpus_per_node, "eval_gpus",
                 f"must be <= gpus_per_node ({self.gpus_per_node}), got {self.eval_gpus}; "
                 "on a CPU-only cluster set slurm.eval_gpus=0")
        require(p, self.ranks_per_node is None or self.ranks_per_node > 0, "ranks_per_node",
                 f"must be positive or null (= gpus_per_node), got {self.ranks_per_node}")
        require(p, self.gpus_per_node > 0 or self.ranks_per_node is not None, "ranks_per_node",
                 "a CPU-only cluster (gpus_per_node 0) needs the DeepSpeed ranks per node, e.g. slurm.ranks_per_node=2")
        require(p, self.save_before_timeout_s <= min(65535, self.stage2_minutes * 60 - 60), "save_before_timeout_s",
                 f"must leave Stage 2 at least a minute of its {self.stage2_minutes * 60} s (stage2_minutes) and "
                 f"SLURM signals at most 65535 s ahead; got {self.save_before_timeout_s}")
        bad = [a for a in self.extra_args if not a.startswith("-")]
        require(p, not bad, "extra_args", f"sbatch options start with '-', got {bad}, e.g. ['--exclusive']")
        raise_if(p)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
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
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # .inf, .nan: no setting means them
            problems.append(f"{key}: must be a finite number, got {value!r}")
        return float(value)
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


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML (None: the defaults), apply `section.key=value` overrides, validate everything."""
    raw: Any = {}
    if path is not None:
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
    path = path if path is not None else "the default config"
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
    if not problems:
        _teachers(ExperimentConfig(**built), problems)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))
    return ExperimentConfig(**built, source=str(path))


def teachers(cfg: ExperimentConfig) -> list[Teacher]:
    """Every teacher of the experiment, the teacher section's first; each entry of combine.teachers is that
    section with the entry's keys on top (load_config has checked them)."""
    problems: list[str] = []
    found = _teachers(cfg, problems)
    if problems:
        raise ConfigError(f"{cfg.source}: {len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems))
    return found


def _teachers(cfg: ExperimentConfig, problems: list[str]) -> list[Teacher]:
    found = [Teacher(cfg.combine.name, cfg.combine.weight, cfg.teacher, 0)]
    base = dataclasses.asdict(cfg.teacher)
    for i, entry in enumerate(cfg.combine.teachers):
        entry = dict(entry)
        name, weight = entry.pop("name", f"teacher{i + 2}"), float(entry.pop("weight", 1.0))
        before = len(problems)
        built = _build_section(TeacherConfig, {**base, **entry}, f"combine.teachers[{i}]", problems)
        if len(problems) == before:
            found.append(Teacher(name, weight, built, i + 1))
    keys: dict[str, str] = {}
    for t in found if len(found) > 1 else ():
        key = json.dumps(annotation_key(t.config), sort_keys=True)
        if key in keys:
            problems.append(f"combine.teachers: {t.name!r} has the model and sampling of {keys[key]!r}; its answers "
                            "would be the same ledger records: give it another model or sampling, or remove it")
        keys[key] = t.name
    return found


def check_training(cfg: ExperimentConfig) -> None:
    """What Stage 2 needs across sections (each section checks its own ranges): the Stage 1 ledger, a file,
    when the extraction task (loss.gamma < 1), token-level distillation (loss.kd_alpha > 0) or the teacher's
    summaries (loss.teacher_summary_weight > 0) are on."""
    p: list[str] = []
    key_info = cfg.data.key_info_path
    loss = cfg.loss
    needs = ([f"loss.gamma={loss.gamma} < 1 trains the extraction task on the teacher's key information"]
             if loss.gamma < 1 else []) + ([f"loss.kd_alpha={loss.kd_alpha} > 0 distils the teacher's top-k"]
                                           if loss.kd_alpha > 0 else []) + (
        [f"loss.teacher_summary_weight={loss.teacher_summary_weight} > 0 trains on the teacher's summaries"]
        if loss.teacher_summary_weight > 0 else [])
    if needs and not key_info:
        p.append(f"data.key_info_path is null, but {' and '.join(needs)}: set it to the Stage 1 ledger "
                 "(launch/annotate.py writes it), or loss.gamma=1.0 loss.kd_alpha=0 loss.teacher_summary_weight=0 for "
                 "summary-only training")
    elif key_info and Path(key_info).is_dir():
        p.append(f"data.key_info_path={key_info} is a folder; it names the Stage 1 ledger file, e.g. runs/key_info.jsonl")
    if blocker := blocking_file(cfg.train.output_dir):
        p.append(f"train.output_dir={cfg.train.output_dir}: {blocker} is a file; pass a "
                 "folder for the checkpoints and the model")
    ds = cfg.train.deepspeed
    if ds:
        try:
            json.loads(Path(ds).read_text())
        except OSError as exc:
            p.append(f"train.deepspeed={ds}: cannot read it ({exc.strerror}); pass a DeepSpeed JSON, e.g. "
                     "ds_configs/zero2.json (--deepspeed sets it too)")
        except ValueError as exc:
            p.append(f"train.deepspeed={ds}: not valid JSON ({exc})")
    if p:
        raise ConfigError(f"{cfg.source}: {len(p)} problem(s) in the config:\n  " + "\n  ".join(p))


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def reference_table() -> str:
    """Markdown table of every config key, its default and help text (docs/config.md; tests/test_config.py keeps it current)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(ExperimentConfig):
        if section.name == "source":
            continue
        for f in dataclasses.fields(typing.get_type_hints(ExperimentConfig)[section.name]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section.name}.{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)
