"""The GPU tier: what a GPU user relies on, measured on CUDA in bf16. Skipped without a GPU.

    bench/gpu/run.sh           # the whole tier in one call (installs the carried DeepSpeed wheel)
    pytest -m gpu tests/test_gpu.py

- packed records give the logits of each record run alone, with the attention kernel the
  config picks on GPU in bf16 (`choose_backend()`: flash_attention_2 when flash-attn is installed,
  else torch's varlen_attn, else sdpa), with torch's varlen_attn wherever this torch has it, and
  with sdpa explicitly;
- the distil loss and its chunked fp32 cross-entropy in bf16 agree with an fp32 reference, and
  the lean path (lm_head at labelled positions only) peaks under a recorded fraction of the naive
  fp32 logits [T, V] at T = 16k, V = 152k (LEAN_MAX_FRACTION; the goal is 0.1);
- tokens/s and MFU of the Qwen2.5-0.5B architecture (random weights) at 4k packed context, with
  the kernel the config picks and with torch's varlen_attn;
- one DeepSpeed ZeRO-2 and one ZeRO-3 run of launch/train.py on one GPU over NCCL in bf16 (with
  CUDA and no DeepSpeed these fail: bench/gpu/run.sh carries it, a skip would hide that).

Each test writes its numbers to $GPU_TIER_RESULTS/gpu_<name>.json (default bench/results/).
Only `test_train_step_flops_hand_computed` runs on CPU: it pins the FLOP count the MFU uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port
from distil.backend import choose_backend, torch_varlen_available
from distil.architecture import load_architecture
from distil.plan import logits_bytes
from distil.tokenization import IGNORE

QWEN_05B = REPO / "launch" / "configs" / "models" / "Qwen2.5-0.5B"
DEVICE = "cuda"  # bench/gpu/rehearse_cpu.py sets "cpu" to run the same numerics small on CPU
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False); run bench/gpu/run.sh on a GPU machine")
PRODUCTION = choose_backend("auto", precision="bf16").attn_implementation  # what the config picks on this machine
TORCH_VARLEN = ["torch_varlen"] if torch_varlen_available() else []
if TORCH_VARLEN:
    from distil.torch_varlen import register

    register()  # also where flash-attn wins the choice, so the tier measures both
ATTENTION = sorted({PRODUCTION, "sdpa", *TORCH_VARLEN})
THROUGHPUT_ATTENTION = sorted({PRODUCTION, *TORCH_VARLEN})

# Tolerances, stated once (see each test for why).
PACKED_VS_ALONE_FACTOR = 2.0   # max|packed - alone| <= 2 x that record's own bf16 error vs fp32
LOSS_REL_TOL = 1e-3            # |L_bf16 - L_fp32| / L_fp32
CE_ABS_TOL = 0.05              # per-token cross-entropy, nats
GRAD_COSINE_MIN = 0.999        # gradients of the bf16 loss vs the fp32 reference
LEAN_MAX_FRACTION = 0.75       # lean loss peak / naive fp32 logits [T, V]: 0.66 in the CPU rehearsal (the goal is 0.1)
MFU_GOAL = 0.40


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def train_step_flops(body_params: int, vocab: int, hidden: int, layers: int, q_dim: int,
                     doc_lengths: list[int], labelled: int) -> int:
    """Model FLOPs of one training step (backward = 2 x forward, so 3 x the forward's 2 FLOPs/MAC):

        6 * body_params * tokens           every token through the non-embedding weights
      + 6 * vocab * hidden * labelled      lm_head runs at labelled positions only (logits_to_keep)
      + 12 * layers * q_dim * sum n(n+1)/2 QK^T and AV over each document's causal (query, key) pairs

    body_params excludes the embedding and lm_head; the embedding is a lookup, not a matmul.
    Recomputation (gradient checkpointing) and the optimizer step are not model FLOPs.
    """
    tokens = sum(doc_lengths)
    pairs = sum(n * (n + 1) // 2 for n in doc_lengths)
    return 6 * body_params * tokens + 6 * vocab * hidden * labelled + 12 * layers * q_dim * pairs


def body_params(model) -> int:
    """Parameters other than the input embedding and lm_head (tied or not)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def synthetic_examples(lengths: list[int], vocab: int, answer_fraction: float = 0.25, seed: int = 0) -> list[dict]:
    """Random-token records in encode_example's layout; the last `answer_fraction` of each is its answer."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        start = n - max(1, round(n * answer_fraction))
        examples.append({"id": f"r{i}", "task": ("summarize", "extract")[i % 2], "input_ids": ids,
                         "labels": [IGNORE] * start + ids[start:]})
    return examples


def record(name: str, payload: dict) -> Path:
    """Write bench/results/gpu_<name>.json (or under $GPU_TIER_RESULTS) with the machine it ran on."""
    import transformers

    out = Path(os.environ.get("GPU_TIER_RESULTS", REPO / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "transformers": transformers.__version__, "date": date.today().isoformat()}
    path = out / f"gpu_{name}.json"
    path.write_text(json.dumps({**payload, "machine": machine}, indent=2) + "\n")
    return path


def qwen05b(attn: str, dtype: torch.dtype, seed: int = 0, **shape):
    """Qwen2.5-0.5B's architecture with random weights, built on DEVICE (`shape` shrinks it for rehearsal)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM._from_config(Qwen2Config.from_pretrained(QWEN_05B, **shape),
                                              attn_implementation=attn, dtype=dtype)
    return model.to(DEVICE)


def to_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_train_step_flops_hand_computed():
    # 6*100*5 + 6*10*4*2 + 12*2*4*(3*4/2 + 2*3/2) = 3000 + 480 + 864
    assert train_step_flops(100, 10, 4, 2, 4, [3, 2], 2) == 4344
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config.from_pretrained(QWEN_05B))
    assert body_params(model) == 357_898_112  # Qwen2.5-0.5B: 0.49B in all, 0.36B without the embedding


# ---------------------------------------------------------------------------------------------
# Measurements: plain functions of DEVICE, so bench/gpu/rehearse_cpu.py runs them small on CPU.


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_peak_bytes(fn) -> int:
    """Peak CUDA memory above what was allocated before `fn` (its inputs), forward + backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check_packing(attn: str, lengths: list[int], **shape) -> list[dict]:
    """Per record: max|packed - alone| (bf16), max|alone_bf16 - alone_fp32| (bf16's own error on the
    record alone) and max|one_sequence - alone|, the same row run without restarting positions
    (attention across records: the positive control). The packed row goes in as packed_loss passes it:
    position_ids and the collator's varlen boundaries."""
    from distil.packing import attention_inputs, collate_packed

    reference = qwen05b("sdpa", torch.float32, **shape).eval()  # the math, in fp32
    model = qwen05b(attn, torch.bfloat16, **shape).eval()
    model.load_state_dict(reference.state_dict())
    examples = synthetic_examples(lengths, model.config.vocab_size)
    batch = to_device(collate_packed([examples]))
    rows, start = [], 0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], **attention_inputs(batch), use_cache=False).logits[0]
        one_sequence = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        for ex in examples:
            n = len(ex["input_ids"])
            ids = torch.tensor([ex["input_ids"]], device=DEVICE)
            alone = model(input_ids=ids, use_cache=False).logits[0].float()
            exact = reference(input_ids=ids, use_cache=False).logits[0]
            part = slice(start, start + n)
            rows.append({"tokens": n, "packed_vs_alone": (packed[part].float() - alone).abs().max().item(),
                         "bf16_vs_fp32_alone": (alone - exact).abs().max().item(),
                         "one_sequence_vs_alone": (one_sequence[part].float() - alone).abs().max().item(),
                         "logit_abs_max": exact.abs().max().item()})
            start += n
    return rows


def _loss_inputs(tokens: int, vocab: int, hidden: int, label_every: int = 4, seed: int = 0):
    """fp32 hidden states at RMS-normed scale, an lm_head giving logits of std ~1.5, labels on every
    4th position (the planner's answer_fraction 0.25), tasks mixed."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(tokens, hidden, device=DEVICE, generator=g)
    w = torch.randn(vocab, hidden, device=DEVICE, generator=g) * (1.5 / math.sqrt(hidden))
    targets = torch.full((tokens,), IGNORE, device=DEVICE)
    labelled = torch.arange(0, tokens, label_every, device=DEVICE)
    targets[labelled] = torch.randint(0, vocab, (labelled.numel(),), device=DEVICE, generator=g)
    tasks = torch.randint(0, 2, (tokens,), device=DEVICE, generator=g)
    return h, w, targets, tasks


def lean_loss(h, w, targets, tasks, gamma: float, chunk: int):
    """The project's path (distil.trainer.packed_loss): lm_head at labelled positions only, then
    fp32 cross-entropy one checkpointed chunk at a time, then the step-normalized distil loss."""
    from distil.loss import chunked_cross_entropy, distil_loss, kind_weights, task_token_counts

    labelled = (targets != IGNORE).nonzero().squeeze(1)
    ce = chunked_cross_entropy(torch.nn.functional.linear(h[labelled], w), targets[labelled], chunk)
    loss, _ = distil_loss(ce, tasks[labelled], kind_weights(gamma), task_token_counts(targets, tasks))
    return loss, ce


def naive_loss(h, w, targets, tasks, gamma: float):
    """The paper implementation's way: logits at every position, upcast to fp32, masked task means."""
    ce = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), targets,
                                           ignore_index=IGNORE, reduction="none")
    masks = [(targets != IGNORE) & (tasks == t) for t in (0, 1)]
    return gamma * ce[masks[0]].sum() / masks[0].sum() + (1 - gamma) * ce[masks[1]].sum() / masks[1].sum(), ce


def _compare(grad: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative L2 error) of a gradient against its reference, in fp64."""
    g, r = grad.double().flatten(), reference.double().flatten()
    return (torch.dot(g, r) / (g.norm() * r.norm())).item(), ((g - r).norm() / r.norm()).item()


def check_loss(tokens: int, vocab: int, hidden: int, chunk: int, peak_bytes=cuda_peak_bytes, gamma: float = 0.8) -> dict:
    """bf16 lean loss vs the fp32 reference (value, per-token CE, gradient cosines), and the peak
    memory of the lean and the naive bf16 paths (forward + backward) over their inputs."""
    h32, w32, targets, tasks = _loss_inputs(tokens, vocab, hidden)
    labelled = targets != IGNORE
    ref_h, ref_w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref_loss, ref_ce = naive_loss(ref_h, ref_w, targets, tasks, gamma)  # fp32 throughout: the reference
    ref_loss.backward()
    ref_ce, ref_gh, ref_gw = ref_ce[labelled].detach(), ref_h.grad[labelled], ref_w.grad
    del ref_h, ref_w
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    del h32, w32
    out = {}

    def lean():
        loss, ce = lean_loss(h, w, targets, tasks, gamma, chunk)
        loss.backward()
        out["loss"], out["ce"] = loss.item(), ce.detach()

    def naive():
        naive_loss(h, w, targets, tasks, gamma)[0].backward()

    lean_peak = peak_bytes(lean)
    grad_h, grad_w = _compare(h.grad[labelled], ref_gh), _compare(w.grad, ref_gw)
    del ref_gh, ref_gw
    h.grad = w.grad = None
    naive_peak = peak_bytes(naive)
    naive_logits = tokens * vocab * 4
    planned = logits_bytes(dataclasses.replace(load_architecture("Qwen2.5-0.5B"), vocab_size=vocab),
                           int(labelled.sum()), chunk)
    return {
        "tokens": tokens, "vocab": vocab, "hidden": hidden, "labelled": int(labelled.sum()), "chunk_tokens": chunk,
        "loss_fp32": ref_loss.item(), "loss_bf16": out["loss"],
        "loss_rel_err": abs(out["loss"] - ref_loss.item()) / ref_loss.item(),
        "ce_max_abs_err": (out["ce"] - ref_ce).abs().max().item(),
        "grad_cosine_hidden": grad_h[0], "grad_rel_err_hidden": grad_h[1],
        "grad_cosine_lm_head": grad_w[0], "grad_rel_err_lm_head": grad_w[1],
        "lean_peak_gib": lean_peak / 2**30, "naive_peak_gib": naive_peak / 2**30,
        "naive_logits_gib": naive_logits / 2**30, "lean_fraction_of_naive_logits": lean_peak / naive_logits,
        "lean_fraction_of_naive_peak": lean_peak / naive_peak,
        "planner_fraction_of_naive_logits": planned / naive_logits,  # distil.plan.logits_bytes' model of it
    }


def bf16_matmul_peak(sizes: tuple[int, ...] = (8192, 16384), repeats: int = 10, trials: int = 3) -> float:
    """Best FLOP/s of large square bf16 matmuls on this device now: the MFU's denominator."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        a @ b
        for _ in range(trials):
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync()
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
        del a, b
    return best


def measure_throughput(attn: str, lengths: list[int], steps: int, peak: float, **shape) -> dict:
    """Time the project's training step on one packed row: packed_loss (lm_head at labelled
    positions, chunked fp32 CE), backward, fused AdamW; bf16 weights, no gradient checkpointing."""
    from distil.loss import kind_weights, task_token_counts
    from distil.packing import collate_packed
    from distil.trainer import packed_loss

    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = qwen05b(attn, torch.bfloat16, **shape).train()
    c = model.config
    batch = to_device(collate_packed([synthetic_examples(lengths, c.vocab_size)]))
    counts = task_token_counts(batch["target_ids"], batch["task_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")

    def step():
        loss, _, _ = packed_loss(model, batch, kind_weights(0.8), counts, chunk_tokens=2048)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # warm-up: kernels chosen, allocator settled
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    labelled = int(counts.sum())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    flops = train_step_flops(body_params(model), c.vocab_size, c.hidden_size, c.num_hidden_layers,
                             c.num_attention_heads * head_dim, lengths, labelled)
    return {"attn_implementation": attn, "dtype": "bf16", "row_tokens": sum(lengths), "records": lengths,
            "labelled_tokens": labelled, "steps_timed": steps, "step_seconds": seconds,
            "tokens_per_s": sum(lengths) / seconds, "labelled_tokens_per_s": labelled / seconds,
            "step_tflop": flops / 1e12, "matmul_peak_tflops": peak / 1e12, "mfu": flops / seconds / peak,
            "final_loss": loss.item(),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None}


# ---------------------------------------------------------------------------------------------
# The GPU tests.


@gpu
@needs_cuda
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_records_give_the_logits_of_each_record_alone(attn):
    """Tolerance, per record: max|packed - alone| <= 2 x max|alone_bf16 - alone_fp32|: packing adds
    no more than bf16 rounding already does to the record alone. The positive control (the row as
    one causal sequence) must differ by more than 5 x that, or the check could not see a leak."""
    rows = check_packing(attn, [517, 1031, 64, 389])
    record(f"packing_{attn}", {"attn_implementation": attn, "dtype": "bf16", "model": "Qwen2.5-0.5B (random weights)",
                               "tolerance": f"packed_vs_alone <= {PACKED_VS_ALONE_FACTOR} x bf16_vs_fp32_alone",
                               "records": rows})
    for i, r in enumerate(rows):
        tol = PACKED_VS_ALONE_FACTOR * r["bf16_vs_fp32_alone"]
        assert r["packed_vs_alone"] <= tol, f"record {i} ({attn}): packed vs alone {r['packed_vs_alone']} > {tol}"
        if i > 0:  # the first record has nothing before it to leak from
            assert r["one_sequence_vs_alone"] > 5 * tol, f"record {i}: the positive control shows no leak: {r}"


@gpu
@needs_cuda
@pytest.mark.timeout(180)
def test_distil_loss_in_bf16_matches_fp32_and_the_lean_path_needs_a_fraction_of_the_naive_logits():
    """T = 16k, V = 152k, hidden 896, labels on 1/4 of the positions, chunk = the config default.
    Tolerances: loss within LOSS_REL_TOL, per-token CE within CE_ABS_TOL, gradient cosine >=
    GRAD_COSINE_MIN; lean peak <= LEAN_MAX_FRACTION x the naive fp32 logits (the goal is 0.1)."""
    from distil.config import LossConfig

    result = check_loss(16384, 151936, 896, LossConfig().lm_head_chunk_tokens)
    result.update(goal_fraction=0.1, recorded_max_fraction=LEAN_MAX_FRACTION,
                  goal_met=result["lean_fraction_of_naive_logits"] <= 0.1)
    record("loss", result)
    assert result["loss_rel_err"] <= LOSS_REL_TOL, result
    assert result["ce_max_abs_err"] <= CE_ABS_TOL, result
    assert min(result["grad_cosine_hidden"], result["grad_cosine_lm_head"]) >= GRAD_COSINE_MIN, result
    assert result["lean_fraction_of_naive_logits"] <= LEAN_MAX_FRACTION, result


@gpu
@needs_cuda
@pytest.mark.timeout(240)
@pytest.mark.parametrize("attn", THROUGHPUT_ATTENTION)
def test_throughput_and_mfu_of_qwen25_05b_at_4k_packed_context(attn):
    """One 4096-token row of five MultiClinSum-sized records per step, with the attention the config
    picks (gpu_throughput.json) and torch's varlen_attn (gpu_throughput_torch_varlen.json when it is not
    the pick). MFU = train_step_flops / step time / bf16_matmul_peak of this run. Recorded; goal >= 0.4."""
    peak = bf16_matmul_peak()
    result = measure_throughput(attn, [1190, 1010, 870, 640, 386], 20, peak)
    result.update(model="Qwen2.5-0.5B (random weights)", mfu_goal=MFU_GOAL, goal_met=result["mfu"] >= MFU_GOAL,
                  production_choice=attn == PRODUCTION,
                  flops_formula="6*body_params*tokens + 6*vocab*hidden*labelled + 12*layers*q_dim*sum n(n+1)/2")
    record("throughput" if attn == PRODUCTION else f"throughput_{attn}", result)
    assert math.isfinite(result["final_loss"])
    assert 0.05 < result["mfu"] <= 1.0, f"MFU outside (0.05, 1]: a FLOP miscount or a slow path; {result}"


# ---------------------------------------------------------------------------------------------
# DeepSpeed on one GPU.

DS_STEPS = 6
_DS_RUNS: dict[str, dict] = {}


def run_deepspeed(stage: str, tmp: Path, prepared_dir: Path, tiny_model: Path, precision: str = "bf16") -> dict:
    """`deepspeed --num_gpus 1 launch/train.py` (the launcher as a module of this interpreter) with
    ds_configs/<stage>.json on the tiny model for DS_STEPS steps; its losses, backend and export."""
    import yaml

    cfg = {"data": {"prepared_dir": str(prepared_dir)},
           "model": {"name_or_path": str(tiny_model)},
           "loss": {"gamma": 1.0},  # no Stage 1 ledger needed
           "train": {"output_dir": str(tmp / "run"), "max_length": 512, "pack_length": 1024, "max_steps": DS_STEPS,
                     "learning_rate": 3e-3, "warmup_ratio": 0.0, "precision": precision, "logging_steps": 1,
                     "save_steps": 1000, "resume": "never", "report_to": [], "seed": 7}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
               str(REPO / "launch" / "train.py"), "--config", str(tmp / "run.yaml"),
               "--deepspeed", str(REPO / "ds_configs" / f"{stage}.json")]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=280,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    log = proc.stdout + proc.stderr
    run = {"stage": stage, "precision": precision, "returncode": proc.returncode,
           "seconds_with_launch": time.perf_counter() - started,
           "backend": next(("Backend(" + line.split("Backend(", 1)[1] for line in log.splitlines()
                            if "backend: Backend(" in line), None),
           "log_tail": log[-4000:]}
    if proc.returncode == 0:
        from safetensors.torch import load_file

        history = json.loads((tmp / "run" / "trainer_state.json").read_text())["log_history"]
        run["losses"] = [h["loss"] for h in history if "loss" in h]
        run["tokens_per_s"] = [h.get("tokens_per_s") for h in history if "loss" in h]
        weights = load_file(str(tmp / "run" / "hf" / "model.safetensors"))
        run["exported_dtypes"] = sorted({str(t.dtype) for t in weights.values()})
    return run


@gpu
@needs_cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_in_bf16_over_nccl_on_one_gpu(stage, tmp_path, prepared_dir, tiny_model):
    """NCCL, bf16, the loss falls over DS_STEPS steps, the exported model is bf16. ZeRO-2 and ZeRO-3
    start from the same weights and data, so their first-step losses agree (bf16, within 0.01).
    No DeepSpeed on a CUDA machine is a failure, not a skip: the tier would pass without its runs."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        pytest.fail(f"deepspeed is not importable here ({error}), so the tier cannot run launch/train.py: "
                    "run the tier with bench/gpu/run.sh, which installs it from bench/gpu/.carry")
    torch.cuda.empty_cache()  # the launched run gets the memory this process cached
    run = run_deepspeed(stage, tmp_path, prepared_dir, tiny_model)
    _DS_RUNS[stage] = run
    record(f"deepspeed_{stage}", {k: v for k, v in run.items() if k != "log_tail"})
    assert run["returncode"] == 0, run["log_tail"]
    assert run["backend"] and "dist_backend='nccl'" in run["backend"], run
    losses = run["losses"]
    assert len(losses) == DS_STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert run["exported_dtypes"] == ["torch.bfloat16"], run
    if stage == "zero3" and "losses" in _DS_RUNS.get("zero2", {}):
        assert abs(losses[0] - _DS_RUNS["zero2"]["losses"][0]) <= 0.01, (losses, _DS_RUNS["zero2"]["losses"])
