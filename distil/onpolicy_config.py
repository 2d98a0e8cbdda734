"""The `onpolicy` config section: on-policy distillation in rounds (distil/onpolicy.py, launch/onpolicy.py)."""

from __future__ import annotations

from dataclasses import dataclass

from distil.options import option, raise_if, require

SAMPLED_TASKS = ("summarize", "extract")


@dataclass
class OnPolicyConfig:
    rounds: int = option(
        "Rounds of (sample, score, train). The reports of onpolicy.splits are cut into this many shares, one "
        "sampled per round, and the supervised examples likewise: together the rounds train one pass over both.", 4)
    splits: list[str] = option(
        "Prepared splits whose reports the student answers ('unlabelled' too: no gold answer is needed).",
        factory=lambda: ["train"])
    tasks: list[str] = option(
        "Prompts the student answers (summarize, extract); a task whose weight is 0 (extract at loss.gamma 1) "
        "is skipped.", factory=lambda: list(SAMPLED_TASKS))
    weight: float = option(
        "lambda: L = (1 - lambda) * the supervised loss + lambda * the KD on the student's own samples; at 1 the "
        "samples alone (no supervised example is packed: after SFT, model.name_or_path the fine-tuned student).", 0.5)
    beta: float = option(
        "The divergence on the student's samples (distil/kd_loss.py): 1 = reverse KL(student || teacher), the "
        "published default of on-policy distillation; 0 = forward KL; between: generalized JSD.", 1.0)
    temperature: float = option("Sampling temperature of the student's answers.", 1.0)
    max_new_tokens: int = option("Longest answer the student samples (tokens).", 256)
    seed: int = option("Seed of the shares and of the sampling (round r samples with seed + r).", 0)
    output_dir: str = option(
        "The rounds (round-NNN/: samples.jsonl, the teacher's top-k store topk/, train/ with its checkpoints and "
        "hf/ export, round.json with the seconds of each phase) and the final student (hf/).", "runs/onpolicy")
    round: int = option("Set by launch/onpolicy.py on each round's training run; -1 = not an on-policy run.", -1)

    def __post_init__(self) -> None:
        p: list[str] = []
        require(p, self.rounds > 0, "rounds", f"must be positive, got {self.rounds}")
        require(p, -1 <= self.round < max(self.rounds, 1), "round", f"must be -1 or below rounds, got {self.round}")
        require(p, bool(self.splits), "splits", "at least one split is needed, e.g. [train]")
        bad = [t for t in self.tasks if t not in SAMPLED_TASKS]
        require(p, bool(self.tasks) and not bad, "tasks", f"must be a non-empty list of {list(SAMPLED_TASKS)}, "
                f"got {self.tasks}")
        require(p, 0.0 < self.weight <= 1.0, "weight", f"must be in (0, 1], got {self.weight}")
        require(p, 0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        require(p, self.temperature > 0, "temperature", f"must be positive (greedy answers are one sample, always "
                f"the same), got {self.temperature}")
        require(p, self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        require(p, self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        raise_if(p)
