"""Memory of a merge (launch/merge.py, mergekit): what it owns against the bound it prints first.

    python bench/merge_memory.py --models runs/quality_teacher/standard/hf runs/quality_teacher/teacher/hf

Runs the linear merge of the given students (one base model) as a subprocess and samples its memory every
50 ms: anonymous memory (what the merge owns) and mapped file pages (the inputs, memory-mapped: reclaimable
page cache), beside the anonymous memory of the imports alone and the bound (distil.merge.memory_need).
Appends one record to bench/results/merge_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distil.merge import memory_need  # noqa: E402

IMPORTS = "import mergekit.merge, torch, transformers, distil.merge; print(open('/proc/self/status').read())"


def status_kib(text: str, field: str) -> int:
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs=2, required=True, help="two students of one base model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "merge_memory.json")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    imports = status_kib(subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, env=env,
                                        check=True).stdout, "RssAnon")
    with tempfile.TemporaryDirectory() as tmp:
        models = "[" + ", ".join(f"{{path: {m}}}" for m in args.models) + "]"
        started = time.time()
        proc = subprocess.Popen([sys.executable, "launch/merge.py", "--config", "launch/configs/tiny_cpu.yaml",
                                 f"merge.models={models}", f"merge.dtype={args.dtype}", f"merge.output_dir={tmp}/out"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        anon = files = 0
        while proc.poll() is None:
            try:
                text = Path(f"/proc/{proc.pid}/status").read_text()
                anon, files = max(anon, status_kib(text, "RssAnon")), max(files, status_kib(text, "RssFile"))
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)
        if proc.returncode != 0:
            raise SystemExit(f"error: the merge failed (exit {proc.returncode})")
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs", "models": args.models,
              "dtype": args.dtype, "seconds": round(time.time() - started, 1),
              "bound_gb": round(memory_need(args.models[0], len(args.models), args.dtype) / 1e9, 3),
              "peak_anonymous_gb": round(anon * 1024 / 1e9, 3), "imports_anonymous_gb": round(imports * 1024 / 1e9, 3),
              "owned_gb": round((anon - imports) * 1024 / 1e9, 3), "peak_mapped_file_gb": round(files * 1024 / 1e9, 3)}
    kept = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps(kept + [record], indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
