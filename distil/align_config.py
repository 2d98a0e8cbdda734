"""The two steps after Stage 2, as config sections: `merge` (students into one model, launch/merge.py)
and `align` (DPO against the student's own worst samples, launch/make_pairs.py then launch/align.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from distil.options import option, raise_if, require

MERGE_METHODS = ("linear", "task_arithmetic", "ties")


def policy_path(align: "AlignConfig", train_output_dir: str) -> str:
    """The student alignment starts from: align.policy, else Stage 2's export."""
    return align.policy or f"{train_output_dir.rstrip('/')}/hf"


def policy_key(align: "AlignConfig") -> str:
    """Where policy_path came from, for errors."""
    return "align.policy" if align.policy else "train.output_dir (its hf/ export; or set align.policy)"


@dataclass
class MergeConfig:
    method: Literal["linear", "task_arithmetic", "ties"] = option(
        "mergekit method: linear = the weighted average of the students (model soup); task_arithmetic = base + the "
        "weighted sum of each student's difference from base; ties = the same differences, each trimmed to its "
        "largest `density` share, signs elected per parameter, then averaged.", "linear")
    models: list[dict[str, Any]] = option(
        "The students merged: each {path, weight (default 1.0), density (ties; default merge.density)}; Hugging Face "
        "folders of one architecture and tokenizer (e.g. train.output_dir/hf of several runs).", factory=list)
    base: str | None = option(
        "The model every student started from (task_arithmetic, ties); null = model.name_or_path.", None)
    density: float = option("ties: share of each difference kept (its largest magnitudes).", 0.5)
    normalize: bool = option("linear, ties: divide by the sum of the weights (weights need not sum to 1).", True)
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "dtype of the arithmetic and the merged weights.", "float32")
    output_dir: str = option("Where the merged Hugging Face model goes (with its recipe, merge.yaml).",
                             "runs/merged")

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, 0.0 < self.density <= 1.0, "density", f"must be in (0, 1], got {self.density}")
        for i, m in enumerate(self.models):
            if not isinstance(m, dict) or not isinstance(m.get("path"), str):
                p.append(f"models[{i}]: expected a mapping with `path` (a model folder), got {m!r}")
                continue
            unknown = sorted(set(m) - {"path", "weight", "density"})
            require(p, not unknown, f"models[{i}]", f"unknown keys {unknown}; known: ['path', 'weight', 'density']")
            weight, density = m.get("weight", 1.0), m.get("density", self.density)
            require(p, isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
                    f"models[{i}].weight", f"must be a positive number, got {weight!r}")
            require(p, isinstance(density, (int, float)) and 0 < density <= 1, f"models[{i}].density",
                    f"must be in (0, 1], got {density!r}")
        raise_if(p)


@dataclass
class AlignConfig:
    policy: str | None = option("The student to align; null = train.output_dir/hf (Stage 2's export).", None)
    reference: str | None = option(
        "DPO's frozen reference model; null = the policy as it was before alignment.", None)
    splits: list[str] = option(
        "Prepared splits whose reports become preference pairs: a labelled split's chosen answer is its gold "
        "summary, 'unlabelled' takes the teacher's ok summary (Stage 1, teacher.summarize).",
        factory=lambda: ["train"])
    pairs_path: str = option(
        "The preference pairs (JSONL keyed by report id; launch/make_pairs.py appends, a rerun resumes).",
        "runs/pairs.jsonl")
    samples_per_report: int = option(
        "Summaries the policy samples per report; the worst becomes the rejected answer (most unsupported numbers, "
        "then most repeated 4-grams, then lowest ROUGE-L against the chosen one).", 4)
    temperature: float = option("Sampling temperature of those summaries (eval.max_new_tokens bounds them).", 1.0)
    beta: float = option("DPO beta: how far from the reference the policy may move (higher = less).", 0.1)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = option(
        "TRL's DPO loss: sigmoid = DPO; ipo, hinge, robust as TRL defines them.", "sigmoid")
    learning_rate: float = option("Peak learning rate of alignment (DPO moves a trained model: keep it small).",
                                  1e-6)
    num_epochs: float = option("Passes over the pairs.", 1.0)
    max_steps: int = option("Stop after this many optimizer steps; -1 = num_epochs decides.", -1)
    pairs_per_device: int = option("Preference pairs per device per micro-batch (each is two sequences).", 1)
    gradient_accumulation_steps: int = option("Micro-batches per optimizer step.", 4)
    output_dir: str = option("Checkpoints and the aligned model (output_dir/hf). The optimizer, precision, "
                             "DeepSpeed config, schedule and saving follow the train section.", "runs/aligned")

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("samples_per_report", "pairs_per_device", "gradient_accumulation_steps"):
            require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(p, self.temperature > 0, "temperature",
                f"must be positive (greedy decoding would sample the same summary every time), got {self.temperature}")
        require(p, self.beta > 0, "beta", f"must be positive, got {self.beta}")
        require(p, self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        require(p, self.num_epochs >= 0, "num_epochs", f"must be >= 0, got {self.num_epochs}")
        require(p, self.max_steps == -1 or self.max_steps > 0, "max_steps",
                f"must be positive, or -1 (num_epochs decides), got {self.max_steps}")
        require(p, self.max_steps > 0 or self.num_epochs > 0, "num_epochs",
                "either num_epochs > 0 or max_steps > 0 is needed")
        require(p, bool(self.splits), "splits", "at least one split is needed, e.g. [train]")
        raise_if(p)
