"""Does evaluation during training leak memory? Peak RSS of each of N callback rounds.

    python bench/eval_memory.py --out bench/results/eval_memory.json
    python bench/eval_memory.py --out /tmp/m.json --rounds 10 --subset 8 --max-new-tokens 64

Builds the tiny Qwen2 from the bundled sample (data/sample), then runs the training callback's
round (eval.callback.GenerationEvalCallback.evaluate_now: greedy generation for the subset with
the current weights, ROUGE, BERTScore with the packaged all-MiniLM-L6-v2) N times, nudging the
weights between rounds as a training step would. Before each round the kernel's peak-RSS mark is
reset (/proc/self/clear_refs), so each round's VmHWM is that round's own peak. Round 1 is the
warm-up (it loads the BERTScore model); target: the last round's peak within 2% of round 2's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the per-round numbers")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--subset", type=int, default=8, help="reports summarized per round")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.config import load_config
    from distil.data import SPLITS, load_sources, split_records, write_jsonl
    from distil.tiny import make_tiny_model
    from eval.callback import GenerationEvalCallback

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="eval_memory_"))
    records = load_sources([REPO / "data" / "sample"])
    splits = split_records(records, [0.8, 0.01, 0.19], 42)
    for split in SPLITS:
        write_jsonl(work / "data" / f"{split}.jsonl", splits[split])
    texts = [r["report"] for r in splits["train"]] + [r["summary"] for r in splits["train"]]
    model_dir = make_tiny_model(work / "model", texts)
    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml", [
        f"data.prepared_dir={work / 'data'}", f"train.output_dir={work / 'run'}", "eval.callback_split=test",
        f"eval.callback_subset={args.subset}", f"eval.callback_max_new_tokens={args.max_new_tokens}",
        "eval.callback_steps=1", "eval.device=cpu"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():  # larger random weights: varied text instead of one repeated token, so every
        for p in model.parameters():  # round really decodes, scores ROUGE and runs the BERTScore model
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.train()
    callback = GenerationEvalCallback(cfg)

    exact = reset_peak()
    rounds = []
    for i in range(args.rounds):
        reset_peak()
        t0 = time.perf_counter()
        metrics = callback.evaluate_now(model, tokenizer)
        with torch.no_grad():  # stand-in for an optimizer step: the weights change between rounds
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        rounds.append({"round": i + 1, "peak_rss_mib": round(peak_rss_mib(), 1),
                       "seconds": round(time.perf_counter() - t0, 2), "gen_rouge1": metrics["gen_rouge1"]})
        print(json.dumps(rounds[-1]), flush=True)
    # Round 1 is the warm-up: it loads the BERTScore model and fills the allocator's pools.
    steady = [r["peak_rss_mib"] for r in rounds[1:]] or [rounds[0]["peak_rss_mib"]]
    result = {
        "rounds": rounds, "reports_per_round": len(callback.records), "max_new_tokens": args.max_new_tokens,
        "per_round_peak": exact,  # False: VmHWM could not be reset, peaks are cumulative
        "growth_pct": round(100 * (steady[-1] - steady[0]) / steady[0], 2),  # last round vs round 2
        "spread_pct": round(100 * (max(steady) - min(steady)) / min(steady), 2),  # noise over rounds 2..N
        "target_pct": 2.0, "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    }
    result["ok"] = result["growth_pct"] <= 2.0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"peak RSS growth round 2 -> {args.rounds}: {result['growth_pct']}% (spread {result['spread_pct']}%; "
          f"target <= 2%): {'ok' if result['ok'] else 'TOO MUCH'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
