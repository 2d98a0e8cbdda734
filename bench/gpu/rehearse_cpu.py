"""Run the GPU tier's measurements small on CPU, to catch mistakes before GPU time is spent.

    .venv/bin/python bench/gpu/rehearse_cpu.py [--deepspeed]

The same functions tests/test_gpu.py calls on CUDA (check_packing, check_loss, measure_throughput),
with DEVICE = "cpu", a Qwen2 shrunk to hidden 128 and 2 layers (head_dim 64 as in Qwen2.5), and a
loss at T = 2048, V = 16384 (the memory fractions depend on T * V and chunk / T, kept at 1/8); this
CPU has no native bf16, so bf16 matmuls crawl here (about 1 GFLOP/s). The packing check also runs
"torch_varlen" (distil/torch_varlen.py) with its kernel replaced by a CPU stand-in of torch 2.11's
varlen_attn (tests/test_gpu_paths.py; no enable_gqa, as on the GPU machine), so the adapter's plumbing is
rehearsed, not the kernel. CPU kernels are not CUDA kernels:
the numbers show the code runs and the orders of magnitude, never the GPU's results. Peak memory
here is the process's peak RSS (glibc made to mmap every large block, so freed tensors leave RSS).
--deepspeed also runs run_deepspeed (ZeRO-2 and ZeRO-3, one rank) in fp32 over gloo, as CPU
allows, on a tiny model and the bundled sample in a temporary folder (about 3 minutes).
Prints JSON; writes nothing in the repository.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # must be set before the process starts
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import test_gpu as tier  # noqa: E402

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=2048)


def _rss_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def rss_peak_bytes(fn) -> int:
    """Peak RSS above the RSS before `fn`, the CPU stand-in for torch.cuda.max_memory_allocated."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def deepspeed_runs(tmp: Path) -> dict:
    """The DeepSpeed test's runs, with the fixtures of tests/conftest.py rebuilt here."""
    from distil.data import SPLITS, crop, load_sources, split_records, write_jsonl
    from distil.tiny import make_tiny_model

    records = load_sources([REPO / "data" / "sample"])
    splits = split_records(records, [0.8, 0.01, 0.19], 42)
    for split in SPLITS:
        write_jsonl(tmp / "prepared" / f"{split}.jsonl",
                    splits[split] if split == "test" else [crop(r, 2560, 512) for r in splits[split]])
    model = make_tiny_model(tmp / "model", [r["report"] for r in records] + [r["summary"] for r in records], seed=0)
    runs = {}
    for stage in ("zero2", "zero3"):
        (tmp / stage).mkdir()
        run = tier.run_deepspeed(stage, tmp / stage, tmp / "prepared", model, precision="fp32")
        runs[stage] = {k: v for k, v in run.items() if k != "log_tail" or run["returncode"] != 0}
    return runs


def packing(attn: str) -> list[dict]:
    rows = tier.check_packing(attn, [129, 257, 16, 97], **SMALL)
    for i, r in enumerate(rows):
        tol = tier.PACKED_VS_ALONE_FACTOR * r["bf16_vs_fp32_alone"]
        r["ok"] = r["packed_vs_alone"] <= tol and (i == 0 or r["one_sequence_vs_alone"] > 5 * tol)
    return rows


def main() -> int:
    from test_gpu_paths import varlen_attn_211
    from torch.nn.attention import varlen

    from distil.torch_varlen import register

    tier.DEVICE = "cpu"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    register()
    varlen.varlen_attn = varlen_attn_211  # the CPU stand-in; this process only
    packing_by_attn = {attn: packing(attn) for attn in ("sdpa", "torch_varlen")}
    loss = tier.check_loss(2048, 16384, 128, chunk=256, peak_bytes=rss_peak_bytes)
    throughput = tier.measure_throughput("sdpa", [300, 200, 12], 2, tier.bf16_matmul_peak((256,), 3, 2), **SMALL)
    result = {"packing": packing_by_attn, "loss": loss, "throughput": throughput}
    if "--deepspeed" in sys.argv:
        os.environ["OMP_NUM_THREADS"] = "1"
        with tempfile.TemporaryDirectory() as tmp:
            result["deepspeed"] = deepspeed_runs(Path(tmp))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
