"""The distil-tuning loss: L = gamma * L_sum + (1 - gamma) * L_ext, in one forward pass. All of it
is here: the trainer computes the per-token terms (cross-entropy, and the KD divergence of
distil/kd_loss.py), gathers the step's token counts and calls `step_loss`.

Each task's loss is the mean cross-entropy over its assistant tokens, where the token counts
are those of the whole optimizer step (every micro-batch on every rank). A micro-batch then
contributes sum(ce) / step_count, and the contributions add up to the same loss however the
step is split into micro-batches and ranks. Pure torch, no distributed code here.

With token-level distillation (loss.kd_alpha = alpha > 0, distil/kd_loss.py) a token's loss is
ce + alpha * kd, normalized by the same counts: L = gamma * (L_sum + alpha * KD_sum)
+ (1 - gamma) * (L_ext + alpha * KD_ext), i.e. L_kd = gamma * KD_sum + (1 - gamma) * KD_ext.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distil.prompts import TASK_IDS
from distil.tokenization import IGNORE

SUMMARIZE, EXTRACT = TASK_IDS["summarize"], TASK_IDS["extract"]


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


def task_token_counts(target_ids: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """[summarize tokens, extract tokens] that carry a label."""
    labelled = target_ids != IGNORE
    return torch.stack([(labelled & (task_ids == SUMMARIZE)).sum(), (labelled & (task_ids == EXTRACT)).sum()])


def task_sums(values: torch.Tensor, token_task: torch.Tensor) -> torch.Tensor:
    """[sum over summarize tokens, sum over extract tokens] of per-token values [N]."""
    return torch.stack([values[token_task == SUMMARIZE].sum(), values[token_task == EXTRACT].sum()])


def distil_loss(token_loss: torch.Tensor, token_task: torch.Tensor, gamma: float,
                step_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of gamma * L_sum + (1 - gamma) * L_ext.

    token_loss:  [N] fp32 loss of the labelled tokens of this micro-batch: the cross-entropy, plus
                 kd_alpha * the KD divergence where the teacher's top-k are used (the KD term is then
                 normalized, and weighted per task, exactly like the cross-entropy)
    token_task:  [N] task of each token (SUMMARIZE or EXTRACT)
    step_counts: [2] labelled tokens per task over the whole optimizer step (all micro-batches,
                 all ranks). A task with no token in the step contributes 0, never NaN.
    Returns (loss, per-task sums of token_loss [2], for logging).
    """
    sums = task_sums(token_loss, token_task)
    weights = torch.tensor([gamma, 1.0 - gamma], dtype=sums.dtype, device=sums.device)
    denominators = step_counts.to(sums.device, sums.dtype).clamp(min=1.0)
    return (weights * sums / denominators).sum(), sums.detach()


def step_loss(token_ce: torch.Tensor, token_kd: torch.Tensor | None, token_task: torch.Tensor, gamma: float,
              kd_alpha: float, step_counts: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to backpropagate for one micro-batch, and its parts for the log.

    token_ce:    [N] cross-entropy of the labelled tokens
    token_kd:    [N] KD divergence from the teacher's top-k (0 where a token has none), or None (KD off);
                 a token's loss is then ce + kd_alpha * kd
    step_counts: [2] labelled tokens per task over the whole step, all ranks (see distil_loss)
    world_size:  ranks averaging the gradients: DeepSpeed divides by it, while the counts already span
                 every rank, so the loss is multiplied back
    Returns (loss, parts [4]: cross-entropy summed per task [summarize, extract], then KD summed per task).
    """
    token_loss = token_ce if token_kd is None else token_ce + kd_alpha * token_kd
    loss, _ = distil_loss(token_loss, token_task, gamma, step_counts)
    kd_sums = task_sums(token_kd, token_task) if token_kd is not None else token_ce.new_zeros(2)
    parts = torch.cat([task_sums(token_ce, token_task), kd_sums]).detach()
    return loss * world_size, parts
