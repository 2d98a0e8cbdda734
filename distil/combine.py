"""Several teachers, one student: how their answers and their distributions become one training signal.

Text (key information, teacher summaries), per report, among the teachers whose answer has status ok:
  each           every teacher's answer is an example of its own, weighted by its teacher's weight
  best_grounded  the answer whose numbers, units, dates and drug names the report supports best
                 (Stage 1's grounding score, teacher_serving/grounding.py)
  consensus      minimum Bayes risk: the answer with the highest weighted mean ROUGE-L F1 against the
                 other teachers' answers (the text analogue of a vote). With two teachers both answers
                 score alike and the tie rule decides.
Ties go to the heavier teacher, then to the one named first in the config.

Distributions (the top-k of teachers that share the student's tokenizer), per answer token: the weighted
mixture sum_t w_t p_t over the union of the teachers' top-k ids, plus one rest bucket. A teacher says
nothing about an id outside its own top-k, so that id gets none of its mass there; its mass outside its
top-k (1 - sum of its top-k) goes to the rest bucket, weighted like the rest. The mixture's top-k part and
rest bucket then sum to sum_t w_t = 1, and a single teacher's table comes back as it was.

Pure functions (numpy and rouge-score), tested against hand-computed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer, tokenizers

TEXT_RULES = ("each", "best_grounded", "consensus")
MISSING_ID = -1  # distil.teacher_topk.MISSING_ID: an empty column (log-prob -inf)


@dataclass(frozen=True)
class Answer:
    """One teacher's answer to one report."""
    teacher: str  # the teacher's name in the config
    text: str
    weight: float  # the teacher's weight (combine.teachers[].weight)
    grounding: float | None = None  # Stage 1's grounding score; None when the answer has nothing to check
    order: int = 0  # the teacher's place in the config (ties)


def _winner(answers: list[Answer], score) -> Answer:
    return max(answers, key=lambda a: (score(a), a.weight, -a.order))


def best_grounded(answers: list[Answer]) -> Answer:
    """The answer with the highest grounding score (an answer with no score counts as fully grounded:
    it states nothing the report could contradict)."""
    return _winner(answers, lambda a: 1.0 if a.grounding is None else a.grounding)


def consensus(answers: list[Answer], similarity) -> Answer:
    """The answer closest to the others: argmax_i sum_{j != i} w_j sim(i, j) / sum_{j != i} w_j."""
    if len(answers) == 1:
        return answers[0]

    def agreement(a: Answer) -> float:
        others = [b for b in answers if b is not a]
        return sum(b.weight * similarity(a.text, b.text) for b in others) / sum(b.weight for b in others)

    return _winner(answers, agreement)


def select(rule: str, answers: list[Answer], similarity=None) -> list[Answer]:
    """The answers a report trains on under `rule`, each with the weight its example gets: under `each`
    every answer with its teacher's weight divided by the weights of the teachers that answered (so a
    report weighs the same however many teachers answered it), else the one chosen, at weight 1."""
    if not answers:
        return []
    if rule == "each":
        total = sum(a.weight for a in answers)
        return [Answer(a.teacher, a.text, a.weight / total, a.grounding, a.order) for a in answers]
    if rule == "best_grounded":
        chosen = best_grounded(answers)
    elif rule == "consensus":
        chosen = consensus(answers, similarity or rouge_l)
    else:
        raise ValueError(f"unknown text rule {rule!r}; expected one of {list(TEXT_RULES)}")
    return [Answer(chosen.teacher, chosen.text, 1.0, chosen.grounding, chosen.order)]


class _Words(tokenizers.Tokenizer):
    """Lower-cased Unicode words: accents kept (rouge-score's default tokenizer drops them)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric), over lower-cased words."""
    return _ROUGE_L.score(a, b)["rougeL"].fmeasure


def mix_topk(tables: list[tuple[np.ndarray, np.ndarray]], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The weighted mixture of several teachers' top-k tables of the same answer tokens.

    tables:  per teacher (ids int [n, k_t], log-probs float [n, k_t]); a MISSING_ID column holds no mass
    weights: per teacher, > 0 (normalized here)
    Returns (ids [n, K], log-probs [n, K]) with K = sum of the k_t: per row the union of the ids, most
    probable first, padded with MISSING_ID at log-prob -inf. The rest bucket is implicit, 1 - sum(exp).
    """
    if len(tables) != len(weights) or not tables:
        raise ValueError(f"mix_topk: {len(tables)} tables for {len(weights)} weights")
    n = tables[0][0].shape[0]
    if any(ids.shape[0] != n or lp.shape != ids.shape for ids, lp in tables):
        raise ValueError("mix_topk: the teachers' tables cover different numbers of answer tokens")
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError(f"mix_topk: weights must be positive, got {weights}")
    w = w / w.sum()
    ids = np.concatenate([t[0] for t in tables], axis=1).astype(np.int64)
    probs = np.concatenate([np.exp(t[1].astype(np.float64)) * wt for t, wt in zip(tables, w)], axis=1)
    probs[ids == MISSING_ID] = 0.0
    width = ids.shape[1]
    out_ids = np.full((n, width), MISSING_ID, dtype=np.int64)
    out_lp = np.full((n, width), -np.inf, dtype=np.float64)
    for row in range(n):
        keep = ids[row] != MISSING_ID
        unique, inverse = np.unique(ids[row][keep], return_inverse=True)
        mass = np.zeros(len(unique))
        np.add.at(mass, inverse, probs[row][keep])
        order = np.argsort(-mass, kind="stable")
        out_ids[row, :len(unique)] = unique[order]
        with np.errstate(divide="ignore"):
            out_lp[row, :len(unique)] = np.log(mass[order])
    return out_ids, out_lp
