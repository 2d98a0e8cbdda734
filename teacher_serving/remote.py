"""A remote OpenAI-compatible teacher (a `vllm serve`, Ray Serve LLM or a hosted API).

It sends clinical reports off this cluster, so it is off by default (teacher.backend: openai
turns it on) and says so in the log. The API key is read from the environment variable named by
teacher.api_key_env, never from the config. Requests run one report each, at most
teacher.max_concurrency at a time; the OpenAI client retries failures with exponential backoff
(teacher.api_retries). A TeacherPool (teacher_serving.pool) of generation requests only.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

from distil.teacher_config import TeacherConfig
from teacher_serving.pool import GenerateRequest

log = logging.getLogger(__name__)


class RemotePool:

    def __init__(self, t: TeacherConfig):
        from openai import OpenAI

        log.warning("teacher.backend=openai: clinical reports will be sent to %s, outside this cluster; use only "
                    "an endpoint approved for patient data", t.api_base)
        api_key = os.environ.get(t.api_key_env)
        if not api_key:
            log.warning("no API key in $%s (teacher.api_key_env); sending requests without one", t.api_key_env)
        self.model, self.gpus = t.model, 0
        self.client = OpenAI(base_url=t.api_base, api_key=api_key or "EMPTY", max_retries=t.api_retries,
                             timeout=t.request_timeout_s)
        self.max_concurrency = t.max_concurrency
        self.executor = ThreadPoolExecutor(max_workers=t.max_concurrency, thread_name_prefix="teacher-api")
        self.inflight: set[Future] = set()

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - len(self.inflight)

    def submit(self, request: GenerateRequest) -> Future:
        if not isinstance(request, GenerateRequest):  # the config refuses topk with this backend
            raise TypeError(f"a remote teacher answers chat requests only, not {type(request).__name__}")
        future = self.executor.submit(self._one, request)
        self.inflight.add(future)
        return future

    def _one(self, request: GenerateRequest) -> dict:
        s = request.sampling
        extra = {}
        if "repetition_penalty" in s:  # not in the OpenAI API; vLLM's server reads it from the body
            extra["extra_body"] = {"repetition_penalty": s["repetition_penalty"]}
        if request.json_schema:
            extra["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "key_info", "schema": request.json_schema, "strict": True}}
        response = self.client.chat.completions.create(
            model=self.model, messages=request.messages, max_tokens=s["max_tokens"], temperature=s["temperature"],
            top_p=s["top_p"], seed=s["seed"], stop=s["stop"] or None, **extra)
        choice = response.choices[0]
        usage = response.usage
        return {"text": choice.message.content or "", "finish_reason": choice.finish_reason,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None}

    def done(self, future: Future) -> None:
        self.inflight.discard(future)

    def failed(self, future: Future, error: BaseException) -> None:
        self.inflight.discard(future)
        log.warning("teacher API request failed after teacher.api_retries retries: %s", type(error).__name__)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
