"""Assistant-only labels, report-side truncation, best-fit packing and per-example isolation."""

from __future__ import annotations

import pytest
import torch

from distil.packing import collate_packed, pack_best_fit, shifted_targets
from distil.tokenization import IGNORE, assistant_labels, encode_example, render_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _example(record, task="summarize"):
    return {"id": record["id"], "lang": record["lang"], "task": task,
            "report": record["report"], "answer": record["summary"]}


def test_assistant_labels_hand_computed():
    assert assistant_labels(3, [7, 8, 2]) == [IGNORE, IGNORE, IGNORE, 7, 8, 2]
    assert shifted_targets([IGNORE, IGNORE, 7, 8, 2]) == [IGNORE, 7, 8, 2, IGNORE]


def test_labels_cover_exactly_the_answer_through_end_of_turn(tokenizer, sample_records):
    record = next(r for r in sample_records if r["lang"] == "fr")
    enc = encode_example(tokenizer, _example(record), max_length=100_000)
    prompt = render_prompt(tokenizer, "summarize", "fr", record["report"])
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    answer = enc["labels"][n_prompt:]
    assert IGNORE not in answer and answer == enc["input_ids"][n_prompt:]
    assert tokenizer.decode(answer) == record["summary"].strip() + "<|im_end|>"
    assert tokenizer.decode(enc["input_ids"]).startswith("<|im_start|>system\nRésume le texte clinique<|im_end|>\n")
    assert not enc["truncated"]


def test_long_example_loses_report_tail_never_the_answer(tokenizer, sample_records):
    record = max(sample_records, key=lambda r: len(r["report"]))
    full = encode_example(tokenizer, _example(record), max_length=100_000)
    short = encode_example(tokenizer, _example(record), max_length=600)
    assert len(full["input_ids"]) > 600 >= len(short["input_ids"]) >= 590
    assert short["truncated"]
    n_answer = sum(t != IGNORE for t in full["labels"])
    assert short["input_ids"][-n_answer:] == full["input_ids"][-n_answer:]
    assert short["labels"][-n_answer:] == full["labels"][-n_answer:]
    text = tokenizer.decode(short["input_ids"])
    assert record["report"][:200] in text and "<|im_start|>assistant\n" in text


def test_answer_longer_than_max_length_is_dropped(tokenizer, sample_records):
    assert encode_example(tokenizer, _example(sample_records[0]), max_length=40) is None


def test_best_fit_decreasing_hand_computed():
    # capacity 10, longest first: 7 opens row0 (3 left); 6 opens row1 (4 left); 4 fills row1 (the
    # fullest row with room); 3 fills row0; the second 3 opens row2; 2 joins row2.
    assert pack_best_fit([3, 7, 4, 6, 3, 2], 10) == [[1, 0], [3, 2], [4, 5]]
    assert pack_best_fit([5, 5, 5], 5) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="example 1 has 11 tokens, more than the row capacity 10"):
        pack_best_fit([1, 11], 10)


def test_collate_restarts_positions_and_shifts_per_example():
    a = {"id": "a", "task": "summarize", "input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}
    b = {"id": "b", "task": "extract", "input_ids": [4, 5], "labels": [IGNORE, 5]}
    batch = collate_packed([[a, b]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["target_ids"].tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert batch["task_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert batch["example_ids"] == ["summarize:a", "extract:b"]


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen"])
def test_packed_logits_equal_each_example_alone(tiny_model, tokenizer, sample_records, attention):
    from transformers import AutoModelForCausalLM

    from distil.varlen_attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention).eval()
    examples = [encode_example(tokenizer, _example(r, task), 400)
                for r, task in zip(sample_records[40:43], ("summarize", "extract", "summarize"))]
    batch = collate_packed([examples])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            diff = (packed[start:start + len(ex["input_ids"])] - alone).abs().max().item()
            assert diff < 1e-4, f"example {ex['id']}: packed vs alone differ by {diff}"
            start += len(ex["input_ids"])


def test_example_spans_start_where_positions_restart():
    from distil.varlen_attention import example_spans

    assert example_spans(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [(0, 3), (3, 5), (5, 9)]
    assert example_spans(torch.tensor([[0, 1, 2, 3]])) == [(0, 4)]
    assert example_spans(torch.tensor([[0, 0, 0]])) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match=r"one packed row"):
        example_spans(torch.tensor([[0, 1], [0, 1]]))


def test_varlen_attention_gives_the_masked_sdpa_loss_and_gradients(tiny_model, tokenizer, sample_records):
    """Per-example sdpa on a packed row = one sdpa over the row with the block mask, forward and backward."""
    from transformers import AutoModelForCausalLM

    from distil.varlen_attention import register

    register()
    examples = [encode_example(tokenizer, _example(r, task), 300)
                for r, task in zip(sample_records[10:14], ("summarize", "extract", "extract", "summarize"))]
    batch = collate_packed([examples])
    results = {}
    for attention in ("sdpa", "sdpa_varlen"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        target = batch["target_ids"][0]
        loss = torch.nn.functional.cross_entropy(logits[0], target, ignore_index=IGNORE)
        loss.backward()
        results[attention] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_a, grads_a), (loss_b, grads_b) = results["sdpa"], results["sdpa_varlen"]
    assert abs(loss_a - loss_b) < 1e-6
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) < 1e-5


def test_varlen_attention_refuses_generation_batches(tiny_model):
    from transformers import AutoModelForCausalLM

    from distil.varlen_attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa_varlen")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="use attn_implementation='sdpa'"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), use_cache=False)
