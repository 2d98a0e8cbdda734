"""Stage 1 on a real one-node SLURM: a cancelled Stage 1 leaves no Ray behind. (The chain stage1 ->
stage2 -> eval with afterok, and a failed Stage 1 cancelling the rest, run on two nodes in
tests/test_slurm_multinode.py.)"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

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
