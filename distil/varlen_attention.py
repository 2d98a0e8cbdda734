"""Packed rows on CPU without a dense mask: attention runs per packed example.

On GPUs FlashAttention-2's varlen kernel attends within each packed example. Its CPU twin used to be
sdpa with the block-diagonal mask transformers builds from position_ids: a dense T x T product per row
and layer with most of it masked, which the CPU kernel cannot skip. For a 2048-token row of three
examples that is about 6x the pairs the examples attend to (arithmetic; the speed-up is for
bench/train_throughput.py to measure).
Here each example is its own causal sdpa call, whose CPU flash kernel computes only the causal
triangle. Same arithmetic as the masked call (fp32 differences ~1e-7), registered with transformers as
attn_implementation "sdpa_varlen"; its mask function builds no mask.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def example_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed example in a [1, T] row: an example starts where its position is 0."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"{NAME} takes one packed row of position_ids [1, T], got shape {tuple(position_ids.shape)}")
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [position_ids.shape[1]]
    return list(zip(starts, ends))


REFUSAL = (f"{NAME} is for training on packed rows (one row, no cache, no padding); use "
           "attn_implementation='sdpa' to generate")


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, position_ids: torch.Tensor | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers attention interface: query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None).
    The spans are the collator's cu_seq_lens_q when given (distil/packing.py), else read from position_ids."""
    if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(REFUSAL)
    if cu_seq_lens_q is not None:
        spans = list(itertools.pairwise(cu_seq_lens_q.tolist()))
    else:
        spans = [(0, query.shape[2])] if position_ids is None else example_spans(position_ids)
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       dropout_p=dropout if module.training else 0.0, scale=scaling, enable_gqa=gqa)
        for s, e in spans], dim=2)
    return out.transpose(1, 2).contiguous(), None


def no_mask(batch_size: int, *args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """The mask function: packed examples need none (the spans come from position_ids); padding is refused."""
    if batch_size != 1 or (attention_mask is not None and not bool(attention_mask.all())):
        raise ValueError(REFUSAL)
    return None


def register() -> str:
    """Make "sdpa_varlen" a transformers attention implementation (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(NAME, no_mask)
    return NAME
