"""The distil-tuning loss: L = gamma * L_sum + (1 - gamma) * L_ext, in one forward pass.

Each task's loss is the mean cross-entropy over its assistant tokens, where the token counts
are those of the whole optimizer step (every micro-batch on every rank). A micro-batch then
contributes sum(ce) / step_count, and the contributions add up to the same loss however the
step is split into micro-batches and ranks. Pure torch, no distributed code here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distil.tokenization import IGNORE

SUMMARIZE, EXTRACT = 0, 1


def _cross_entropy_fp32(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Per-token cross-entropy [N] of logits [N, V], upcast to fp32 one chunk at a time.

    Each chunk is checkpointed, so the fp32 copy exists for one chunk only, in forward and in
    backward; with a 152k vocabulary a full fp32 copy would dwarf the model's activations.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    pieces = []
    for start in range(0, logits.shape[0], chunk_tokens):
        part_logits, part_targets = logits[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and part_logits.requires_grad:
            pieces.append(checkpoint(_cross_entropy_fp32, part_logits, part_targets, use_reentrant=False))
        else:
            pieces.append(_cross_entropy_fp32(part_logits, part_targets))
    return torch.cat(pieces)


def task_token_counts(target_ids: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """[summarize tokens, extract tokens] that carry a label."""
    labelled = target_ids != IGNORE
    return torch.stack([(labelled & (task_ids == SUMMARIZE)).sum(), (labelled & (task_ids == EXTRACT)).sum()])


def distil_loss(token_ce: torch.Tensor, token_task: torch.Tensor, gamma: float,
                step_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of gamma * L_sum + (1 - gamma) * L_ext.

    token_ce:    [N] fp32 cross-entropy of the labelled tokens of this micro-batch
    token_task:  [N] task of each token (SUMMARIZE or EXTRACT)
    step_counts: [2] labelled tokens per task over the whole optimizer step (all micro-batches,
                 all ranks). A task with no token in the step contributes 0, never NaN.
    Returns (loss, per-task sums of cross-entropy [2], for logging).
    """
    sums = torch.stack([token_ce[token_task == SUMMARIZE].sum(), token_ce[token_task == EXTRACT].sum()])
    weights = torch.tensor([gamma, 1.0 - gamma], dtype=sums.dtype, device=sums.device)
    denominators = step_counts.to(sums.device, sums.dtype).clamp(min=1.0)
    return (weights * sums / denominators).sum(), sums.detach()
