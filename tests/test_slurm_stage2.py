"""slurm/stage2.sbatch on a real one-node SLURM: the save-and-requeue before the time limit, and errors
that stop at submission. (Training on 1 and 2 nodes runs in tests/test_slurm_multinode.py.)"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, prepare_inputs, tiny_experiment, write_ledger

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, cluster):
    """Prepared data, the tiny student and a hand-written ledger, shared by the Stage 2 runs."""
    folder = tmp_path_factory.mktemp("stage2")
    config = tiny_experiment(folder, cluster.cpus)
    prepare_inputs(config)
    write_ledger(config)
    return folder, config


def pipeline(cluster, *args: str) -> dict[str, str]:
    """slurm/pipeline.sh ARGS in this virtualenv; returns {stage: job id}."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = cluster.run([str(REPO / "slurm" / "pipeline.sh"), *args], cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.split()[:1] in (["stage1"], ["stage2"],
                                                                                                 ["eval"]))
    assert jobs, proc.stdout
    return jobs


def job_log(folder: Path, stage: str, job: str) -> str:
    return next((folder / "logs").glob(f"distil-{stage}-*-{job}.out")).read_text(errors="replace")


def diagnose(folder: Path, stage: str, job: str, cluster) -> str:
    """The job's log (when it has one) and the daemons' logs, for an assertion message."""
    logs = list((folder / "logs").glob(f"distil-{stage}-*-{job}.out"))
    return (logs[0].read_text(errors="replace")[-3000:] if logs else "(no job log)") + "\n" + cluster.logs()


def test_stage2_saves_a_checkpoint_and_requeues_before_the_time_limit(cluster, inputs, tmp_path):
    """USR1 (what --signal=B:USR1@N sends) -> checkpoint at the next step -> requeue -> resume -> done."""
    folder, _ = inputs
    out = tmp_path / "student"
    config = tiny_experiment(folder, cluster.cpus, name="requeue",
                             train={"output_dir": str(out), "max_steps": 30, "save_steps": 1000})
    job = pipeline(cluster, "--stages", "stage2", str(config))["stage2"]
    deadline = time.time() + 400
    trace = out / "data_trace" / "rank0.jsonl"
    while not (trace.is_file() and len(trace.read_text().splitlines()) >= 3):
        fields = cluster.job(job)
        assert time.time() < deadline and fields["JobState"] in ("PENDING", "RUNNING"), \
            f"{fields}\n{diagnose(folder, 'stage2', job, cluster)}"
        time.sleep(0.5)
    signal = cluster.run(["scancel", "--batch", "--signal=USR1", job])
    assert signal.returncode == 0, signal.stderr
    deadline = time.time() + 600
    while (fields := cluster.job(job))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED") or \
            fields.get("Restarts") == "0":
        assert time.time() < deadline, diagnose(folder, "stage2", job, cluster)
        time.sleep(1)
    fields = cluster.job(job)
    log = job_log(folder, "stage2", job)
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), log[-3000:] + cluster.logs()
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved and saved[0] < 30, saved  # the checkpoint saved on request, before the end
    assert "requeueing to resume from it" in log and "resuming from" in log
    assert (out / "hf" / "config.json").is_file()


def test_a_request_the_cluster_cannot_meet_fails_at_submission(cluster, inputs):
    _, config = inputs
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = cluster.run([str(REPO / "slurm" / "pipeline.sh"), "--stages", "stage2", str(config),
                        "slurm.stage2_nodes=2"], cwd=REPO, env=env)
    assert proc.returncode != 0
    assert "Batch job submission failed" in proc.stderr and "sbatch of stage2 failed" in proc.stderr


def test_a_missing_config_stops_the_job_with_the_fix(cluster, inputs, tmp_path):
    folder, config = inputs
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = cluster.run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", "--gpus-per-node=0",
                        "--cpus-per-task=1", "slurm/stage2.sbatch", str(tmp_path / "nope.yaml")], cwd=REPO, env=env)
    job = proc.stdout.strip()
    assert cluster.wait([job], timeout=60)[job] == "FAILED"
    assert "config " + str(tmp_path / "nope.yaml") + " not found" in (tmp_path / f"{job}.out").read_text()
