"""The numbers of a decoder-only model that decide its memory, read from its config.json (a bundled
model of launch/configs/models/, a model folder or the file itself): what the planner counts with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "launch" / "configs" / "models"


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
