"""The teacher pool: what both Stage 1 passes send requests to, and the loop that keeps it fed.

Two pools implement `TeacherPool`: the vLLM replicas on Ray (teacher_serving.replica.ReplicaPool)
and a remote OpenAI-compatible endpoint (teacher_serving.remote.RemotePool). A pass hands `drive`
its items, how to make an item's request, and what to do with the answers; `drive` keeps every
free slot of the pool busy with single requests (continuous batching on the engine side) and puts
a request that failed back in the queue. Pure Python: no Ray, no vLLM.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateRequest:
    """One chat answer: messages, vLLM SamplingParams keyword arguments, an optional JSON schema."""
    messages: list[dict]
    sampling: dict
    json_schema: dict | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """The teacher's top-k next-token log-probs, by prefill, over tokens `first`.. of each sequence:
    sequences = {task: {"prompt_token_ids": [...], "first": int}}."""
    topk: int
    sequences: dict[str, dict]


class TeacherPool(Protocol):
    gpus: int  # GPUs it holds (0: CPU replicas, or a remote endpoint whose hardware is not ours to count)

    @property
    def free_slots(self) -> int:
        """Requests it takes now without queueing (raises when no replica is left to serve any)."""

    def submit(self, request: GenerateRequest | ScoreRequest) -> Future:
        """Send one request; the future's result is the answer dict (generate) or {task: (ids, log_probs)}."""

    def done(self, future: Future) -> None:
        """The future's result was taken."""

    def failed(self, future: Future, error: BaseException) -> None:
        """The future failed: recover what serves it (restart a replica, ...); the caller re-queues."""

    def close(self) -> None:
        ...


class StartOnFirstUse:
    """A TeacherPool started by the first pass that has work for it (engines take minutes to load):
    `start()` starts it; `close()` closes it only if it was started."""

    def __init__(self, open_pool: Callable[[], TeacherPool]):
        self._open, self._pool = open_pool, None

    def start(self) -> TeacherPool:
        if self._pool is None:
            self._pool = self._open()
        return self._pool

    @property
    def gpus(self) -> int:
        return self._pool.gpus if self._pool is not None else 0

    @property
    def free_slots(self) -> int:
        return self.start().free_slots

    def submit(self, request: GenerateRequest | ScoreRequest) -> Future:
        return self.start().submit(request)

    def done(self, future: Future) -> None:
        self.start().done(future)

    def failed(self, future: Future, error: BaseException) -> None:
        self.start().failed(future, error)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def drive(pool: TeacherPool, items: list, make_request: Callable[[Any], GenerateRequest | ScoreRequest],
          accept: Callable[[list[tuple[Any, Any]]], list], max_failures: int) -> Counter:
    """Feed `pool` single requests, as many as it has free slots, until every item is accepted.

    `accept(answered)` gets the (item, output) pairs that came back together and returns the items to
    send again. A failed request (engine, endpoint) goes back to the front of the queue; an item whose
    requests failed `max_failures` times is dropped and counted as "failed" (a rerun retries it).
    An item needs `engine_failures` (int) and `record["id"]` (for the log).
    """
    queue, inflight, counts = deque(items), {}, Counter()
    while queue or inflight:
        for _ in range(min(len(queue), pool.free_slots)):
            item = queue.popleft()
            inflight[pool.submit(make_request(item))] = item
        finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        answered = []
        for future in finished:
            item = inflight.pop(future)
            try:
                output = future.result()
            except Exception as exc:  # engine, endpoint or request failure: the pool recovers, the item goes back
                pool.failed(future, exc)
                item.engine_failures += 1
                if item.engine_failures < max_failures:
                    queue.appendleft(item)
                else:
                    counts["failed"] += 1
                    log.error("report %s: its request failed %d times (%s); not recorded, a rerun retries it",
                              item.record["id"], item.engine_failures, type(exc).__name__)
                continue
            pool.done(future)
            answered.append((item, output))
        if answered:
            queue.extend(accept(answered))
    return counts
