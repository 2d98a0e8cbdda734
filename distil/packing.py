"""Padding-free packing: several examples per row, each attending only to itself.

A micro-batch is one flat sequence (batch dimension 1): the examples of its rows laid end to
end, `position_ids` restarting at 0 for each, so nothing attends across examples and no padding
token is ever computed. sdpa in transformers reads the example boundaries from the restarts; the
varlen kernels (flash-attn's, torch's, sdpa_varlen) take them as `cu_seq_lens_q/k` and
`max_length_q/k`, made here once per batch in the layout of transformers'
DataCollatorWithFlattening(return_flash_attn_kwargs=True), so no layer derives them again.
"""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np
import torch

from distil.prompts import TASK_IDS
from distil.teacher_topk import MISSING_ID
from distil.tokenization import IGNORE, answer_length


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens (best-fit decreasing).

    Longest first, each into the fullest row that still has room; ties broken by index so the
    result is deterministic. O(n log n).
    """
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
        else:
            left, row = free.pop(slot)
            rows[row].append(i)
            bisect.insort(free, (left - lengths[i], row))
    return rows


def shifted_targets(labels: list[int]) -> list[int]:
    """Target of position t is the label of t+1; the last position of an example predicts nothing."""
    return list(labels[1:]) + [IGNORE]


def collate_packed(rows: list[list[dict]]) -> dict:
    """Flatten rows of encoded examples into one sequence with per-example positions.

    Returns input_ids, position_ids, target_ids (already shifted, IGNORE off the answer) and
    task_ids (the kind of example: 0 gold summary, 1 extraction, 2 teacher summary) of shape [1, T]; the boundaries for varlen attention
    (attention_inputs); and the example ids for tracing. Examples
    carrying the teacher's top-k (distil/teacher_topk.py) add teacher_ids, teacher_log_probs
    [1, L, k] and teacher_mask [1, L] over the L labelled positions, in their order. Examples with a
    weight other than 1 (several teachers' answers, distil/combine.py) add token_weights [1, T].
    """
    input_ids, positions, targets, tasks, ids, lengths, weights = [], [], [], [], [], [], []
    for row in rows:
        for ex in row:
            n = len(ex["input_ids"])
            lengths.append(n)
            input_ids += ex["input_ids"]
            positions += range(n)
            targets += shifted_targets(ex["labels"])
            tasks += [TASK_IDS[ex["task"]]] * n
            weights += [ex.get("weight", 1.0)] * n
            ids.append(f"{ex['task']}:{ex['id']}")
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    batch = {"input_ids": as_row(input_ids), "position_ids": as_row(positions),
             "target_ids": as_row(targets), "task_ids": as_row(tasks), "example_ids": ids,
             **varlen_boundaries(lengths)}
    examples = [ex for row in rows for ex in row]
    if any(ex.get("weight", 1.0) != 1.0 for ex in examples):
        batch["token_weights"] = torch.tensor(weights, dtype=torch.float32).unsqueeze(0)
    if any(ex.get("teacher_topk") for ex in examples):
        batch.update(teacher_rows(examples))
    return batch


def varlen_boundaries(lengths: list[int]) -> dict:
    """cu_seq_lens_q/k (int32 [N + 1]: 0, then where each example ends) and max_length_q/k (an int) of
    examples of `lengths` laid end to end: what flash-attn's varlen kernels take."""
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    longest = max(lengths, default=0)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


# What the model's forward takes from a packed batch, besides input_ids.
ATTENTION_INPUTS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def attention_inputs(batch: dict) -> dict:
    """The packed batch's position_ids and varlen boundaries, as keyword arguments of the model's forward."""
    return {key: batch[key] for key in ATTENTION_INPUTS}


def teacher_rows(examples: list[dict]) -> dict:
    """The teacher's top-k of every labelled position of `examples`, concatenated in order.

    An example without them gets placeholder rows (ids 0..k-1, uniform log-probs: finite, so no NaN
    reaches the gradient) that teacher_mask leaves out of the loss. Tables narrower than the widest (one
    teacher's beside several teachers' mixture) are padded with empty columns (MISSING_ID, -inf).
    """
    k = max(ex["teacher_topk"].k for ex in examples if ex.get("teacher_topk"))
    ids, log_probs, mask = [], [], []
    for ex in examples:
        n = answer_length(ex["labels"])
        entry = ex.get("teacher_topk")
        if entry is not None:
            a, b = entry.read()
            pad = k - a.shape[1]
            ids.append(np.pad(a.astype(np.int64), ((0, 0), (0, pad)), constant_values=MISSING_ID))
            log_probs.append(np.pad(b.astype(np.float32), ((0, 0), (0, pad)), constant_values=-np.inf))
        else:
            ids.append(np.broadcast_to(np.arange(k, dtype=np.int64), (n, k)))
            log_probs.append(np.full((n, k), -math.log(k + 1), dtype=np.float32))
        mask.append(np.full(n, entry is not None))
    return {"teacher_ids": torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
            "teacher_log_probs": torch.from_numpy(np.concatenate(log_probs)).unsqueeze(0),
            "teacher_mask": torch.from_numpy(np.concatenate(mask)).unsqueeze(0)}
