"""Packed rows on GPU without flash-attn: torch's own FlashAttention-2 varlen kernel.

flash-attn ships as source that takes hours to compile; torch (>= 2.10) carries the same kernels as
torch.nn.attention.varlen.varlen_attn. Registered with transformers as attn_implementation
"torch_varlen", for packed training rows only (one row, no cache, no padding). The example
boundaries are the collator's cu_seq_lens_q/k and max_length_q/k (distil/packing.py), made once per
batch; without them they are derived from position_ids as transformers does for flash-attn.
varlen_attn's signature moved between releases: 2.10 takes is_causal and no scale, later ones
window_size=(-1, 0) for causal and a scale; enable_gqa only from 2.12, so on older torch the
key/value heads are repeated first (Qwen2.5 uses grouped-query attention). Imports on CPU; computes
on CUDA in bf16/fp16 only (distil/backend.py chooses it only there).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

NAME = "torch_varlen"
REFUSAL = (f"{NAME} is for training on packed rows (one row, no cache, no padding); use "
           "attn_implementation='sdpa' to generate")


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def boundaries(position_ids: torch.Tensor | None, tokens: int, device: torch.device):
    """(cu_seq_lens, max_length) of a [1, T] row from its position_ids, as transformers derives them
    for flash-attn; the whole row is one example when there are none."""
    if position_ids is None:
        return torch.tensor([0, tokens], dtype=torch.int32, device=device), tokens
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_seq_lens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    return cu_seq_lens, int(max_length)


def varlen_arguments(fn, scaling: float | None, heads: int, kv_heads: int, head_dim: int):
    """Keyword arguments for a causal call of this torch's `fn` (varlen_attn), plus what the caller must
    do itself where `fn` lacks the argument: the factor to scale the query by (no `scale`, torch 2.10)
    and the number of times to repeat each key/value head (no `enable_gqa`, before torch 2.12)."""
    params = _parameters(fn)
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    query_factor = 1.0
    if "scale" in params:
        options["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling * math.sqrt(head_dim), 1.0):
        query_factor = scaling * math.sqrt(head_dim)
    repeat = 1
    if heads != kv_heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            repeat = heads // kv_heads
    return options, query_factor, repeat


def torch_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, sliding_window: int | None = None,
                           position_ids: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                           cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None,
                           max_length_k: int | None = None, **kwargs):
    """transformers attention interface: query [1, H, T, D], key/value [1, H_kv, T, D] -> ([1, T, H, D], None)."""
    if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(REFUSAL)
    if dropout or sliding_window is not None:
        raise ValueError(f"{NAME} has no attention dropout and no sliding window (got dropout={dropout}, "
                         f"sliding_window={sliding_window}); use attn_implementation='sdpa'")
    if cu_seq_lens_q is None or max_length_q is None:
        cu_seq_lens_q, max_length_q = boundaries(position_ids, query.shape[2], query.device)
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    from torch.nn.attention import varlen

    options, query_factor, repeat = varlen_arguments(varlen.varlen_attn, scaling, query.shape[1], key.shape[1],
                                                     query.shape[3])
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [T, heads, D]
    if query_factor != 1.0:
        q = q * query_factor
    if repeat > 1:  # as transformers' repeat_kv: query head h reads key/value head h // repeat
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = varlen.varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, int(max_length_q), int(max_length_k), **options)
    return out.unsqueeze(0), None


def register() -> str:
    """Make "torch_varlen" a transformers attention implementation (idempotent); returns the name. Its
    mask function is flash-attn's: no mask for a packed row, the padding mask (refused above) otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, torch_varlen_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
