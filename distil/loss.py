"""The distil-tuning loss: L = gamma * L_sum + (1 - gamma) * L_ext + w * L_teacher, in one forward
pass. All of it is here: the trainer computes the per-token terms (cross-entropy, and the KD
divergence of distil/kd_loss.py), gathers the step's token counts and calls `step_loss`.

Three kinds of example (distil.prompts.TASKS): the gold summary (L_sum), the teacher's key
information (L_ext) and the teacher's summary of a report without a gold one (L_teacher,
sequence-level distillation, weight w = loss.teacher_summary_weight, 0 = off). Each kind's loss is
the mean cross-entropy over its assistant tokens, where the token counts are those of the whole
optimizer step (every micro-batch on every rank). A micro-batch then contributes sum(ce) / step_count
per kind, and the contributions add up to the same loss however the step is split into micro-batches
and ranks. Pure torch, no distributed code here.

With token-level distillation (loss.kd_alpha = alpha > 0, distil/kd_loss.py) a token's loss is
ce + alpha * kd, normalized by the same counts: L = gamma * (L_sum + alpha * KD_sum)
+ (1 - gamma) * (L_ext + alpha * KD_ext) + w * (L_teacher + alpha * KD_teacher).

On-policy distillation (distil/onpolicy.py, weight lambda = onpolicy.weight) adds two kinds, the student's own
samples of either prompt: no gold answer, so no cross-entropy; their tokens carry the KD divergence alone
(onpolicy.beta), and L = (1 - lambda) * [the supervised L above] + lambda * (gamma * KD_student_sum
+ (1 - gamma) * KD_student_ext), each mean again over the step's tokens of its kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distil.prompts import TASK_IDS
from distil.tokenization import IGNORE

SUMMARIZE, EXTRACT, TEACHER_SUMMARY = TASK_IDS["summarize"], TASK_IDS["extract"], TASK_IDS["teacher_summary"]
STUDENT_SUMMARY, STUDENT_EXTRACT = TASK_IDS["student_summary"], TASK_IDS["student_extract"]
KINDS = len(TASK_IDS)


def _cross_entropy_fp32(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def chunked(fn, chunk_tokens: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*rows) -> [rows] fp32, applied to `chunk_tokens` rows of every tensor at a time.

    Each chunk is checkpointed, so its fp32 copy of the logits exists for one chunk only, in forward
    and in backward; with a 152k vocabulary a full fp32 copy would dwarf the model's activations.
    """
    if tensors[0].shape[0] == 0:
        return tensors[0].new_zeros(0, dtype=torch.float32)
    pieces = []
    for start in range(0, tensors[0].shape[0], chunk_tokens):
        part = [t[start:start + chunk_tokens] for t in tensors]
        if torch.is_grad_enabled() and part[0].requires_grad:
            pieces.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            pieces.append(fn(*part))
    return torch.cat(pieces)


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Per-token cross-entropy [N] of logits [N, V], upcast to fp32 one chunk at a time."""
    return chunked(_cross_entropy_fp32, chunk_tokens, logits, targets)


def kind_weights(gamma: float, teacher_summary_weight: float = 0.0, onpolicy_weight: float = 0.0) -> list[float]:
    """Weight of each kind's mean loss: the supervised kinds [gamma, 1 - gamma, teacher_summary_weight] times
    (1 - onpolicy_weight), then the student's own samples [gamma, 1 - gamma] times onpolicy_weight."""
    keep = 1.0 - onpolicy_weight
    return [keep * gamma, keep * (1.0 - gamma), keep * teacher_summary_weight,
            onpolicy_weight * gamma, onpolicy_weight * (1.0 - gamma)]


def is_onpolicy(token_task: torch.Tensor) -> torch.Tensor:
    """Which tokens are the student's own samples: KD only, they have no answer to imitate."""
    return (token_task == STUDENT_SUMMARY) | (token_task == STUDENT_EXTRACT)


def task_token_counts(target_ids: torch.Tensor, task_ids: torch.Tensor,
                      token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Labelled tokens per kind (distil.prompts.TASKS); with token_weights (the same shape:
    several teachers' answers, distil/combine.py) the sum of their weights."""
    labelled = target_ids != IGNORE
    if token_weights is None:
        return torch.stack([(labelled & (task_ids == kind)).sum() for kind in range(KINDS)])
    return torch.stack([(token_weights * (labelled & (task_ids == kind))).sum() for kind in range(KINDS)])


def task_sums(values: torch.Tensor, token_task: torch.Tensor) -> torch.Tensor:
    """Sums of per-token values [N] per kind (distil.prompts.TASKS)."""
    return torch.stack([values[token_task == kind].sum() for kind in range(KINDS)])


def distil_loss(token_loss: torch.Tensor, token_task: torch.Tensor, weights: list[float],
                step_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of sum over kinds of weight * (the kind's mean loss over the step).

    token_loss:  [N] fp32 loss of the labelled tokens of this micro-batch: the cross-entropy, plus
                 kd_alpha * the KD divergence where the teacher's top-k are used (the KD term is then
                 normalized, and weighted per kind, exactly like the cross-entropy)
    token_task:  [N] kind of each token (distil.prompts.TASK_IDS)
    weights:     [KINDS] per kind (kind_weights)
    step_counts: [KINDS] labelled tokens per kind over the whole optimizer step (all micro-batches,
                 all ranks). A kind with no token in the step contributes 0, never NaN.
    Returns (loss, per-kind sums of token_loss [KINDS], for logging).
    """
    sums = task_sums(token_loss, token_task)
    w = torch.tensor(weights, dtype=sums.dtype, device=sums.device)
    counts = step_counts.to(sums.device, sums.dtype)
    denominators = torch.where(counts > 0, counts, torch.ones_like(counts))  # weighted counts may be below 1
    return (w * sums / denominators).sum(), sums.detach()


def step_loss(token_ce: torch.Tensor, token_kd: torch.Tensor | None, token_task: torch.Tensor, weights: list[float],
              kd_alpha: float, step_counts: torch.Tensor, world_size: int,
              token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to backpropagate for one micro-batch, and its parts for the log.

    token_ce:    [N] cross-entropy of the labelled tokens
    token_kd:    [N] KD divergence from the teacher's top-k (0 where a token has none), or None (KD off);
                 a token's loss is then ce + kd_alpha * kd, and kd alone for the student's own samples (is_onpolicy)
    weights:     [KINDS] per kind (kind_weights)
    step_counts: [KINDS] labelled tokens per kind over the whole step, all ranks (see distil_loss)
    world_size:  ranks averaging the gradients: DeepSpeed divides by it, while the counts already span
                 every rank, so the loss is multiplied back
    token_weights: [N] per labelled token (its example's weight), or None (all 1); each kind's loss is then
                 the weighted mean, step_counts the step's sums of weights (task_token_counts)
    Returns (loss, parts [2 * KINDS]: cross-entropy summed per kind, then KD summed per kind, weighted alike).
    """
    if token_weights is not None:
        token_ce = token_ce * token_weights
        token_kd = token_kd * token_weights if token_kd is not None else None
    if token_kd is None:
        token_loss = token_ce.masked_fill(is_onpolicy(token_task), 0.0)  # no teacher: the student's samples teach nothing
    else:
        token_loss = torch.where(is_onpolicy(token_task), token_kd, token_ce + kd_alpha * token_kd)
    loss, _ = distil_loss(token_loss, token_task, weights, step_counts)
    kd_sums = task_sums(token_kd, token_task) if token_kd is not None else token_ce.new_zeros(KINDS)
    parts = torch.cat([task_sums(token_ce, token_task), kd_sums]).detach()
    return loss * world_size, parts
