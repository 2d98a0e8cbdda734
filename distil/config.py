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
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = _help(
        "auto = flash_attention_2 on GPU when flash-attn is installed, else sdpa.", "auto"
    )
    gradient_checkpointing: bool = _help("Recompute activations in backward to fit long contexts.", False)
    tiny: dict[str, int] | None = _help(
        "Build a tiny random Qwen2 at name_or_path first if absent (CPU demo and tests): "
        "{hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size}.",
        None,
    )


@dataclass
class LossConfig:
    gamma: float = _help("L = gamma*L_sum + (1-gamma)*L_ext; 1.0 = standard fine-tuning baseline.", 0.8)
    lm_head_chunk_tokens: int = _help("Labelled positions projected through lm_head per chunk.", 2048)
    use_liger: Literal["auto", "never"] = _help(
        "auto = Liger fused linear cross-entropy on GPU when liger-kernel is installed.", "auto"
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _require(p, 0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        _require(p, self.lm_head_chunk_tokens > 0, "lm_head_chunk_tokens", "must be positive")
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

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("max_length", "pack_length", "micro_batch_rows", "gradient_accumulation_steps",
                    "logging_steps", "save_steps"):
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
    tensor_parallel_size: int = _help("GPUs per replica (tensor parallel).", 8)
    pipeline_parallel_size: int = _help("Nodes per replica (pipeline parallel) for multi-node teachers.", 1)
    num_replicas: int | None = _help("Engine replicas; null = as many as the cluster's GPUs hold.", None)
    max_model_len: int = _help("Context of the teacher engine.", 32768)
    max_new_tokens: int = _help("Longest key-information answer.", 1024)
    temperature: float = _help("Sampling temperature; 0 = greedy.", 0.0)
    key_info_format: Literal["text", "json"] = _help("text = the paper's free text; json = fixed schema.", "text")


@dataclass
class EvalConfig:
    output_dir: str = _help("Predictions, scores, tables and plots.", "runs/eval")
    max_new_tokens: int = _help("Longest generated summary.", 512)


@dataclass
class SlurmConfig:
    partition: str | None = _help("sbatch --partition.", None)
    account: str | None = _help("sbatch --account.", None)


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
            problems.append(f"{section}.{key}: unknown key; known keys: {sorted(names)}")
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
