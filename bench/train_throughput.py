"""Training throughput: our packed one-forward distil-tuning step vs the paper implementation's.

    python bench/train_throughput.py --out bench/results/train_throughput.json
    python bench/train_throughput.py --model .cache/SmolLM2-135M-Instruct --pack-length 2048 \
        --out bench/results/train_throughput_smollm2.json

Same model, same real MultiClinSum reports (2560/512-character crop), same AdamW, one process,
fp32 on CPU; each side with its attention kernel (sdpa for the reference's padded batches, the
trainer's own choice for ours: on CPU sdpa per packed example, distil/varlen_attention.py;
--attention sdpa gives ours the masked-row sdpa instead):

  reference  the method of nicolay-r/distil-tuning-llm: every example padded to max_length
             (3078 tokens), one forward per task per step, loss over the whole sequence (its
             labels keep the padding), full [3078, vocab] logits.
  ours       distil.trainer.packed_loss: both tasks packed into padding-free rows, one forward,
             lm_head only at labelled positions, chunked fp32 cross-entropy.

The default model is a ~31M-parameter Qwen2 whose vocabulary and lm_head have Qwen2.5's size
(151,936); its tokenizer is trained on the reports with a vocabulary sized so tokens per character
are close to Qwen's (~0.25). --model FOLDER runs a real model (e.g. SmolLM2) with its own tokenizer. The extraction target is the gold summary (no teacher is run here): the two
answers have the same length distribution as in the paper's setting, which is what timing needs.
Writes ratio_vs_reference, padding_efficiency, tokens_per_s and mfu: model FLOPs per second over
the matmul peak measured in the same run (the best of large square fp32 products, n = 1024-4096,
on the threads the run uses). --kd-topk K also times ours with the token-level KD term (loss.kd_alpha
1, JSD) over K stored teacher log-probs per answer token, read from a real top-k store written
beforehand (the model's own top-K, by one no-grad forward per example): kd_step_ratio = with / without.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from distil.backend import choose_backend
from distil.data import crop, load_sources
from distil.kd_loss import KDTerm
from distil.loss import kind_weights, task_token_counts
from distil.packing import collate_packed, pack_best_fit
from distil.tiny import train_tokenizer
from distil.tokenization import IGNORE, answer_length, encode_example
from distil.trainer import packed_loss

REPO = Path(__file__).resolve().parents[1]
QWEN_VOCAB = 151_936
SHAPE = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, num_key_value_heads=1,
             intermediate_size=512)


def matmul_peak_flops(sizes=(1024, 2048, 3072, 4096), seconds: float = 1.0) -> float:
    """The machine's fp32 GEMM peak: the best rate over several large square products, each repeated
    for about `seconds`. One 2048^2 product under-measures it (the CPU's best shape differs)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        reps, start = 0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
            reps += 1
            if time.perf_counter() - start > seconds and reps >= 3:
                break
    return best


def load_model(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def build_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=QWEN_VOCAB, tie_word_embeddings=True, max_position_embeddings=32768,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPE)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def step_flops(model, tokens: int, lm_head_positions: int, attention_pairs: int) -> float:
    """Forward + backward FLOPs: 6 * params * tokens for the body, 6 * lm_head * positions
    projected, and 12 * layers * hidden per attended (query, key) pair (QK^T and AV, fwd + bwd)."""
    c = model.config
    lm_head = c.vocab_size * c.hidden_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return 6 * body * tokens + 6 * lm_head * lm_head_positions + 12 * c.num_hidden_layers * c.hidden_size * attention_pairs


def run_reference(model, tokenizer, examples: list[dict], max_length: int) -> dict:
    """One padded forward per task, loss over the whole (padded) sequence, like the paper's code."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    real_tokens = processed = flops = 0
    start = time.perf_counter()
    for summ, ext in examples:
        opt.zero_grad()
        loss = 0.0
        for enc in (summ, ext):
            ids = enc["input_ids"][:max_length]
            pad = max_length - len(ids)
            input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * pad])
            mask = torch.tensor([[1] * len(ids) + [0] * pad])
            labels = torch.tensor([enc["labels"][:max_length] + [tokenizer.pad_token_id] * pad])
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            loss = loss + F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE)
            real_tokens += len(ids)
            processed += max_length
            flops += step_flops(model, max_length, max_length, max_length * (max_length + 1) // 2)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "reports": len(examples), "real_tokens": real_tokens,
            "processed_tokens": processed, "flops": flops}


def attach_teacher_topk(model, tokenizer, examples: list[dict], k: int, folder: Path) -> None:
    """Write the model's own top-k over each example's answer tokens to a store, as Stage 1 would, and
    attach the entries the way Stage 2's data loading does."""
    from distil.teacher_topk import TopkStore, sequence_fingerprint, tokenizer_fingerprint
    from teacher_serving.topk import ScoreJob, TopkWriter

    writer = TopkWriter(folder, tokenizer_fingerprint(tokenizer),
                        {"teacher": "bench", "prompt_version": "bench", "sampling": {"topk": k}})
    for i, ex in enumerate(examples):
        n = answer_length(ex["labels"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0, -n - 1:-1]
        top = logits.float().log_softmax(-1).topk(k)
        job = ScoreJob({"id": f"{ex['id']}#{i}"}, {}, fingerprints={ex["task"]: sequence_fingerprint(ex["input_ids"])})
        writer.append([(job, {ex["task"]: (top.indices.numpy(), top.values.numpy())})])
    writer.close()
    store = TopkStore(folder)
    for i, ex in enumerate(examples):
        ex["teacher_topk"] = store.lookup(dict(ex, id=f"{ex['id']}#{i}"))


def run_ours(model, examples: list[dict], pack_length: int, kd: KDTerm | None = None) -> dict:
    """Both tasks of every report packed into rows; one forward per row; lm_head at labels only."""
    flat = [e for pair in examples for e in pair]
    rows = [[flat[i] for i in row] for row in pack_best_fit([len(e["input_ids"]) for e in flat], pack_length)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = labelled = flops = 0
    start = time.perf_counter()
    for row in rows:
        batch = collate_packed([row])
        opt.zero_grad()
        counts = task_token_counts(batch["target_ids"], batch["task_ids"])
        loss, _, _ = packed_loss(model, batch, kind_weights(0.8), counts, chunk_tokens=1024, kd=kd)
        loss.backward()
        opt.step()
        n_labelled = int(counts.sum())
        tokens += batch["input_ids"].numel()
        labelled += n_labelled
        pairs = sum(len(e["input_ids"]) * (len(e["input_ids"]) + 1) // 2 for e in row)
        flops += step_flops(model, batch["input_ids"].numel(), n_labelled, pairs)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "reports": len(examples), "rows": len(rows), "tokens": tokens,
            "labelled_tokens": labelled, "row_fill": tokens / (len(rows) * pack_length), "flops": flops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="a real model folder (e.g. .cache/SmolLM2-135M-Instruct); default: the "
                                        "31M Qwen2 with Qwen2.5's vocabulary")
    parser.add_argument("--data", default=None, help="MultiClinSum release folder (default: ../shared/data if present, else the bundled sample)")
    parser.add_argument("--reports-ours", type=int, default=32)
    parser.add_argument("--reports-reference", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=3078, help="the paper implementation's max_length")
    parser.add_argument("--pack-length", type=int, default=4096)
    parser.add_argument("--tokenizer-vocab", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="auto",
                        help="ours: model.attn_implementation (auto = the trainer's choice for fp32 here; "
                             "torch_varlen, flash_attention_2: bf16/fp16 on CUDA only, refused here)")
    parser.add_argument("--kd-topk", type=int, default=0, help="also time ours with the KD term over K teacher log-probs")
    args = parser.parse_args(argv)
    attention = choose_backend(args.attention, precision="fp32").attn_implementation  # the bench runs fp32

    torch.set_num_threads(args.threads)
    shared = REPO.parent / "shared" / "data" / "multiclinsum_gs_train_en"
    source = Path(args.data) if args.data else (shared if shared.is_dir() else REPO / "data/sample/multiclinsum_gs_train_en")
    records = [crop(r, 2560, 512) for r in load_sources([source])]
    if args.model:
        model, tokenizer = load_model(args.model)
    else:
        tokenizer = train_tokenizer([r["report"] for r in records] + [r["summary"] for r in records],
                                    args.tokenizer_vocab)
        model = build_model(tokenizer)
    chars = sum(len(r["report"]) + len(r["summary"]) for r in records[:100])
    toks = sum(len(tokenizer(r["report"])["input_ids"]) + len(tokenizer(r["summary"])["input_ids"]) for r in records[:100])

    n = max(args.reports_ours, args.reports_reference)
    pairs = []
    for r in records[:n]:
        pair = []
        for task in ("summarize", "extract"):
            ex = {"id": r["id"], "lang": r["lang"], "task": task, "report": r["report"], "answer": r["summary"]}
            pair.append(encode_example(tokenizer, ex, args.max_length))
        pairs.append(pair)

    params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak_flops()
    model.set_attn_implementation(attention)
    run_ours(model, pairs[:4], args.pack_length)  # warm-up
    ours = run_ours(model, pairs[:args.reports_ours], args.pack_length)
    with_kd = None
    if args.kd_topk:
        import tempfile

        flat = [e for pair in pairs[:args.reports_ours] for e in pair]
        with tempfile.TemporaryDirectory() as folder:
            attach_teacher_topk(model, tokenizer, flat, args.kd_topk, Path(folder) / "bench.topk")
            with_kd = run_ours(model, pairs[:args.reports_ours], args.pack_length, KDTerm(alpha=1.0, beta=0.5))
    model.set_attn_implementation("sdpa")
    reference = run_reference(model, tokenizer, pairs[:args.reports_reference], args.max_length)

    ours_per_report = ours["seconds"] / ours["reports"]
    ref_per_report = reference["seconds"] / reference["reports"]
    result = {
        "ratio_vs_reference": round(ref_per_report / ours_per_report, 2),
        "padding_efficiency": 1.0,  # rows are flattened: no padding token is ever computed
        "row_fill": round(ours["row_fill"], 4),
        "reference_padding_efficiency": round(reference["real_tokens"] / reference["processed_tokens"], 4),
        "tokens_per_s": round(ours["tokens"] / ours["seconds"], 1),
        "reference_real_tokens_per_s": round(reference["real_tokens"] / reference["seconds"], 1),
        "mfu": round(ours["flops"] / ours["seconds"] / peak, 4),
        "reference_mfu": round(reference["flops"] / reference["seconds"] / peak, 4),
        "model_gflops_per_s": round(ours["flops"] / ours["seconds"] / 1e9, 1),
        "seconds_per_report": {"ours": round(ours_per_report, 3), "reference": round(ref_per_report, 3)},
        "matmul_peak_gflops": round(peak / 1e9, 1),
        **({"kd_step_ratio": round(with_kd["seconds"] / ours["seconds"], 3),
            "kd_tokens_per_s": round(with_kd["tokens"] / with_kd["seconds"], 1),
            "kd": {"topk": args.kd_topk, "alpha": 1.0, "beta": 0.5, "lm_head_chunk_tokens": 1024}} if with_kd else {}),
        "setup": {
            "model": args.model or "tiny Qwen2 (random)", "model_params": params, "vocab": model.config.vocab_size,
            **({} if args.model else SHAPE), "attention": {"ours": attention, "reference": "sdpa"}, "dtype": "fp32",
            "tokenizer_vocab": len(tokenizer), "tokens_per_char": round(toks / chars, 3),
            "matmul_peak": "best of square fp32 products n = 1024, 2048, 3072, 4096",
            "reports_ours": ours["reports"], "reports_reference": reference["reports"], "rows_ours": ours["rows"],
            "max_length_reference": args.max_length, "pack_length_ours": args.pack_length, "crop": [2560, 512],
            "data": str(source.name), "threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": torch.get_num_threads(),
            "date": date.today().isoformat(), "torch": torch.__version__,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
