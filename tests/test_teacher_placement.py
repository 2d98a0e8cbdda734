"""Replica placement arithmetic against hand-computed cluster layouts (no Ray)."""

import os

import pytest

from teacher_serving.placement import PlacementError, max_replicas, plan_replicas, tp_groups_per_node


def test_tp_groups_per_node():
    assert tp_groups_per_node([8, 8, 4], 4) == [2, 2, 1]
    assert tp_groups_per_node([8, 6], 8) == [1, 0]


def test_two_8gpu_nodes_tp4_gives_four_replicas_of_one_packed_group():
    nodes = [{"CPU": 96, "GPU": 8}, {"CPU": 96, "GPU": 8}]
    plan = plan_replicas(nodes, tensor_parallel_size=4)
    assert plan.num_replicas == 4
    assert plan.bundles == ({"GPU": 1.0, "CPU": 1.0},) * 4
    assert plan.strategy == "STRICT_PACK" and plan.executor_backend == "ray" and plan.on_gpu
    assert plan.actor_resources == {"num_cpus": 1.0, "num_gpus": 0}
    assert plan.gpus == 16  # what Stage 1's GPU-hours per 1,000 reports count


def test_tp8_on_a_head_without_gpus_and_three_gpu_nodes():
    nodes = [{"CPU": 8}, {"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 4}]
    assert plan_replicas(nodes, tensor_parallel_size=8).num_replicas == 2  # the 4-GPU node holds no TP-8 group


def test_pipeline_parallel_spans_nodes():
    nodes = [{"CPU": 64, "GPU": 8}] * 3
    plan = plan_replicas(nodes, tensor_parallel_size=8, pipeline_parallel_size=2)
    assert plan.num_replicas == 1  # 3 TP groups // 2 stages
    assert len(plan.bundles) == 16 and plan.strategy == "PACK" and plan.executor_backend == "ray"
    assert plan.gpus == 16


def test_single_gpu_replicas_hold_their_gpu_without_ray_executor():
    plan = plan_replicas([{"CPU": 16, "GPU": 2}], tensor_parallel_size=1, cpus_per_replica=4)
    assert plan.num_replicas == 2 and plan.executor_backend is None
    assert plan.actor_resources == {"num_cpus": 4.0, "num_gpus": 1}


def test_cpus_limit_gpu_replicas():
    # a TP-4 group with 4 CPUs per GPU bundle needs 16 CPUs on its node
    assert max_replicas([{"CPU": 8, "GPU": 8}], 4, 1, cpus_per_replica=4) == 0
    assert max_replicas([{"CPU": 16, "GPU": 8}], 4, 1, cpus_per_replica=4) == 1
    assert max_replicas([{"CPU": 32, "GPU": 8}], 4, 1, cpus_per_replica=4) == 2


def test_cpu_cluster():
    plan = plan_replicas([{"CPU": 2}], num_replicas=None)
    assert plan.num_replicas == 2 and plan.bundles == ({"CPU": 1.0},) and not plan.on_gpu and plan.gpus == 0
    assert plan.actor_resources == {"num_cpus": 1.0, "num_gpus": 0}
    assert plan_replicas([{"CPU": 5}], cpus_per_replica=2).num_replicas == 2


def test_cpu_tensor_parallel_is_one_bundle_of_tp_times_cpus_with_vllms_local_workers():
    plan = plan_replicas([{"CPU": 4}, {"CPU": 2}], tensor_parallel_size=2)
    assert plan.num_replicas == 3 and plan.bundles == ({"CPU": 2.0},) and plan.strategy == "STRICT_PACK"
    assert plan.executor_backend == "mp" and plan.actor_resources == {"num_cpus": 2.0, "num_gpus": 0}
    assert plan_replicas([{"CPU": 8}], tensor_parallel_size=2, cpus_per_replica=2).num_replicas == 2


@pytest.mark.parametrize("nodes, kwargs, words", [
    ([{"CPU": 4}], {"tensor_parallel_size": 8}, "teacher.tensor_parallel_size x teacher.cpus_per_replica = 8 x 1"),
    ([{"CPU": 4}], {"pipeline_parallel_size": 2}, "teacher.pipeline_parallel_size=2"),
    ([{"CPU": 64, "GPU": 4}], {"tensor_parallel_size": 8}, "lower teacher.tensor_parallel_size"),
    ([{"CPU": 64, "GPU": 8}], {"tensor_parallel_size": 4, "num_replicas": 3}, "teacher.num_replicas <= 2"),
    ([{"CPU": 1}], {"cpus_per_replica": 2}, "lower teacher.cpus_per_replica"),
    ([], {}, "ray start --head"),
])
def test_errors_name_the_key_and_the_fix(nodes, kwargs, words):
    with pytest.raises(PlacementError, match=words.replace(".", r"\.").replace("[", r"\[")):
        plan_replicas(nodes, **kwargs)


def test_vllm_cpu_threads_give_each_worker_and_replica_its_own_cores(monkeypatch):
    from distil.backend import vllm_cpu_thread_env

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3, 1, 7, 5})
    bind = lambda *a: vllm_cpu_thread_env(*a)["VLLM_CPU_OMP_THREADS_BIND"]  # noqa: E731
    assert vllm_cpu_thread_env(2) == {"VLLM_CPU_OMP_THREADS_BIND": "1,3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert bind() == "1,3,5,7"
    assert bind(None, 2) == "1,3|5,7"          # TP 2 over the whole host
    assert bind(1, 2, 0) == "1|3" and bind(1, 2, 1) == "5|7"  # two TP-2 replicas on one host: disjoint
    assert bind(2, 1, 2) == "1,3"              # more replicas than the host holds: cores are reused
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # what the user set wins
    assert bind(2) == "0|1"
    assert bind(None, 2) == "0|1"
    with pytest.raises(ValueError, match=r"VLLM_CPU_OMP_THREADS_BIND='0\|1' .* fewer than the 3 tensor-parallel"):
        bind(None, 3)  # vLLM itself would fail inside its worker, on an index error


def test_engine_binding_is_gone_from_the_environment_once_the_engine_started(monkeypatch):
    """An engine's binding left in os.environ passes for the user's own to every later engine of the
    process (an evaluation, then a teacher replica: both would sit on the evaluation's cores)."""
    from distil.backend import scoped_environ

    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with pytest.raises(RuntimeError, match="engine failed"):
        with scoped_environ({"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": None}):
            assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
            assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
            raise RuntimeError("engine failed")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
