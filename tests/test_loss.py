"""The distil-tuning loss: hand-computed values, the two-forward reference, and invariance of the
step loss and gradients to how the step is split into micro-batches and ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port
from distil.loss import (EXTRACT, STUDENT_EXTRACT, STUDENT_SUMMARY, SUMMARIZE, TEACHER_SUMMARY, chunked_cross_entropy,
                         distil_loss, kind_weights, step_loss, task_token_counts)
from distil.packing import collate_packed
from distil.tokenization import IGNORE, encode_example
from distil.trainer import packed_loss

GAMMA = 0.8


def test_distil_loss_hand_computed():
    ce = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])
    task = torch.tensor([SUMMARIZE, SUMMARIZE, EXTRACT, EXTRACT, EXTRACT])
    loss, sums = distil_loss(ce, task, kind_weights(0.8), torch.tensor([2, 3, 0, 0, 0]))
    # L_sum = (1+3)/2 = 2, L_ext = (2+4+6)/3 = 4, L = 0.8*2 + 0.2*4 = 2.4
    assert loss.item() == pytest.approx(2.4, abs=1e-6)
    assert sums.tolist() == [4.0, 12.0, 0.0, 0.0, 0.0]
    # the same tokens seen as one micro-batch of a step with 4 + 6 labelled tokens in total
    part, _ = distil_loss(ce, task, kind_weights(0.8), torch.tensor([4, 6, 0, 0, 0]))
    assert part.item() == pytest.approx(0.8 * 4 / 4 + 0.2 * 12 / 6, abs=1e-6)


def test_step_loss_mixes_kd_per_token_and_undoes_the_rank_average():
    ce = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])
    kd = torch.tensor([0.5, 0.0, 1.0, 1.0, 0.0])  # 0 where a token has no teacher top-k
    task = torch.tensor([SUMMARIZE, SUMMARIZE, EXTRACT, EXTRACT, EXTRACT])
    loss, parts = step_loss(ce, kd, task, kind_weights(0.8), 2.0, torch.tensor([4, 6, 0, 0, 0]), world_size=2)
    # tokens: ce + 2*kd = [2, 3 | 4, 6, 6]; L = (0.8 * 5/4 + 0.2 * 16/6) * 2 ranks
    assert loss.item() == pytest.approx((0.8 * 5 / 4 + 0.2 * 16 / 6) * 2, abs=1e-6)
    assert parts.tolist() == [4.0, 12.0, 0.0, 0.0, 0.0, 0.5, 2.0, 0.0, 0.0, 0.0]  # CE per kind, then KD
    plain, parts = step_loss(ce, None, task, kind_weights(0.8), 2.0, torch.tensor([2, 3, 0, 0, 0]), world_size=1)  # KD off
    assert plain.item() == pytest.approx(2.4, abs=1e-6) and parts.tolist() == [4.0, 12.0] + [0.0] * 8


def test_gamma_one_and_missing_task_give_no_nan():
    ce = torch.tensor([2.0, 4.0])
    task = torch.tensor([SUMMARIZE, SUMMARIZE])
    loss, _ = distil_loss(ce, task, kind_weights(1.0), torch.tensor([2, 0, 0, 0, 0]))
    assert loss.item() == pytest.approx(3.0)
    empty, _ = distil_loss(torch.zeros(0), torch.zeros(0, dtype=torch.long), kind_weights(0.8, 0.5),
                           torch.tensor([0, 0, 0, 0, 0]))
    assert empty.item() == 0.0 and not math.isnan(empty.item())


def test_task_token_counts():
    targets = torch.tensor([[IGNORE, 5, 6, IGNORE, 7, IGNORE]])
    tasks = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert task_token_counts(targets, tasks).tolist() == [2, 1, 0, 0, 0]
    tasks = torch.tensor([[0, 0, 2, 2, 2, 1]])
    assert task_token_counts(targets, tasks).tolist() == [1, 0, 2, 0, 0]
    tasks = torch.tensor([[3, 3, 4, 4, 4, 0]])
    assert task_token_counts(targets, tasks).tolist() == [0, 0, 0, 1, 2]


def test_three_kinds_each_normalized_by_its_own_step_count():
    ce = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, 5.0, 7.0])
    task = torch.tensor([SUMMARIZE, SUMMARIZE, EXTRACT, EXTRACT, EXTRACT, TEACHER_SUMMARY, TEACHER_SUMMARY])
    loss, sums = distil_loss(ce, task, kind_weights(0.8, 0.5), torch.tensor([2, 3, 2, 0, 0]))
    # L_sum = 4/2 = 2, L_ext = 12/3 = 4, L_teacher = 12/2 = 6; L = 0.8*2 + 0.2*4 + 0.5*6 = 5.4
    assert loss.item() == pytest.approx(5.4, abs=1e-6)
    assert sums.tolist() == [4.0, 12.0, 12.0, 0.0, 0.0]
    # a step with 8 teacher-summary tokens in all: this micro-batch adds 0.5 * 12/8 for that kind
    part, _ = distil_loss(ce, task, kind_weights(0.8, 0.5), torch.tensor([2, 3, 8, 0, 0]))
    assert part.item() == pytest.approx(0.8 * 2 + 0.2 * 4 + 0.5 * 12 / 8, abs=1e-6)
    # off (w = 0): the teacher summaries' tokens change nothing
    off, _ = distil_loss(ce, task, kind_weights(0.8), torch.tensor([2, 3, 2, 0, 0]))
    assert off.item() == pytest.approx(2.4, abs=1e-6)


def test_onpolicy_weights_split_lambda_by_gamma():
    assert kind_weights(0.8, 0.5, 0.25) == pytest.approx([0.6, 0.15, 0.375, 0.2, 0.05])
    assert kind_weights(0.8) == pytest.approx([0.8, 0.2, 0.0, 0.0, 0.0])  # off: the supervised loss alone
    assert kind_weights(1.0, 0.0, 1.0) == pytest.approx([0.0, 0.0, 0.0, 1.0, 0.0])  # on-policy only, summaries only


def test_student_samples_carry_kd_alone_normalized_by_their_own_count():
    ce = torch.tensor([1.0, 3.0, 9.0, 9.0, 9.0])  # the student's own tokens: their CE is never a loss
    kd = torch.tensor([0.5, 0.5, 2.0, 4.0, 3.0])
    task = torch.tensor([SUMMARIZE, SUMMARIZE, STUDENT_SUMMARY, STUDENT_SUMMARY, STUDENT_EXTRACT])
    weights = kind_weights(0.8, 0.0, 0.5)  # [0.4, 0.1, 0, 0.4, 0.1]
    loss, parts = step_loss(ce, kd, task, weights, 2.0, torch.tensor([2, 0, 0, 2, 1]), world_size=1)
    # summarize: (1 + 2*0.5 + 3 + 2*0.5) / 2 = 3; student_summary: (2 + 4) / 2 = 3; student_extract: 3 / 1 = 3
    assert loss.item() == pytest.approx(0.4 * 3 + 0.4 * 3 + 0.1 * 3, abs=1e-6)
    assert parts.tolist() == [4.0, 0.0, 0.0, 18.0, 9.0, 1.0, 0.0, 0.0, 6.0, 3.0]
    # without a KD term the samples teach nothing (and give no NaN)
    none, _ = step_loss(ce, None, task, weights, 2.0, torch.tensor([2, 0, 0, 2, 1]), world_size=1)
    assert none.item() == pytest.approx(0.4 * 4 / 2, abs=1e-6)


def test_chunked_cross_entropy_matches_full_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(10, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    full = F.cross_entropy(logits, targets, reduction="none")
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    chunked = chunked_cross_entropy(logits, targets, chunk_tokens=3)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.allclose(full.float(), chunked.float(), atol=1e-6)
    assert torch.allclose(g_full, g_chunked, atol=1e-6)


@pytest.fixture(scope="module")
def model_and_examples(tiny_model, sample_records):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    examples = []
    for record, task in zip(sample_records[:4], ("summarize", "extract", "summarize", "extract")):
        answer = record["summary"] if task == "summarize" else "Key: " + record["summary"][:150]
        ex = {"id": record["id"], "lang": record["lang"], "task": task, "report": record["report"], "answer": answer}
        examples.append(encode_example(tok, ex, 300))
    return model, examples


def _reference_two_forward(model, examples, gamma):
    """The paper implementation's way: one padded forward per task, full logits, mean over answer tokens."""
    means = []
    for task in ("summarize", "extract"):
        group = [e for e in examples if e["task"] == task]
        width = max(len(e["input_ids"]) for e in group)
        ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in group])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in group])
        labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in group])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        means.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE))
    return gamma * means[0] + (1 - gamma) * means[1]


def _step(model, micro_batches, gamma, step_counts):
    model.zero_grad()
    total = 0.0
    for batch in micro_batches:
        loss, _, _ = packed_loss(model, batch, kind_weights(gamma), step_counts, chunk_tokens=7)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _counts(micro_batches):
    return sum(task_token_counts(b["target_ids"], b["task_ids"]) for b in micro_batches)


def test_one_packed_forward_equals_two_forward_reference(model_and_examples):
    model, examples = model_and_examples
    batch = collate_packed([examples])
    ours, _, _ = packed_loss(model, batch, kind_weights(GAMMA), task_token_counts(batch["target_ids"], batch["task_ids"]), 7)
    reference = _reference_two_forward(model, examples, GAMMA)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)


def test_step_loss_and_gradients_identical_for_1x4_and_4x1(model_and_examples):
    model, examples = model_and_examples
    one_by_four = [collate_packed([[e] for e in examples])]
    four_by_one = [collate_packed([[e]]) for e in examples]
    loss_a, grads_a = _step(model, one_by_four, GAMMA, _counts(one_by_four))
    loss_b, grads_b = _step(model, four_by_one, GAMMA, _counts(four_by_one))
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def _rank_worker(rank, world, port, model_dir, examples, out):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    mine = [collate_packed([[e]]) for e in examples[rank::world]]
    counts = _counts(mine)
    dist.all_reduce(counts)  # as DistilTrainer.get_batch_samples does
    loss_sum = 0.0
    for batch in mine:
        loss, _, _ = packed_loss(model, batch, kind_weights(GAMMA), counts, chunk_tokens=7)
        (loss * world).backward()  # the trainer undoes the gradient average over ranks
        loss_sum += loss.item()
    for p in model.parameters():  # what DeepSpeed/DDP do: average gradients over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    total = torch.tensor([loss_sum])
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total.item(), "grads": {n: p.grad for n, p in model.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_step_loss_and_gradients_identical_on_one_and_two_ranks(model_and_examples, tiny_model, tmp_path):
    import torch.multiprocessing as mp

    model, examples = model_and_examples
    single = [collate_packed([[e]]) for e in examples]
    loss_1, grads_1 = _step(model, single, GAMMA, _counts(single))
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, free_port(), str(tiny_model), examples, out), nprocs=2, join=True)
    two = torch.load(out)
    assert two["loss"] == pytest.approx(loss_1, abs=1e-5)
    for name, grad in grads_1.items():
        assert torch.allclose(grad, two["grads"][name], atol=1e-6), name
