"""The sbatch options and template variables of a stage, from the experiment YAML (slurm section),
DISTIL_SLURM_<KEY> environment variables and section.key=value overrides. Used by slurm/*.

    python launch/slurm_args.py sbatch stage2 launch/configs/qwen25_7b_zero3_16k.yaml slurm.stage2_nodes=4
    python launch/slurm_args.py vars launch/configs/tiny_cpu.yaml

`sbatch` prints one option per line; `vars` prints DISTIL_*=value shell assignments.
Exit status 0 = printed, 2 = a config error (its key and the fix named; nothing printed on stdout).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distil.config import ConfigError
from distil.slurm_args import STAGES, resolve, sbatch_options, shell_assignments, stage_variables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    options = sub.add_parser("sbatch", help="sbatch options of one stage, one per line")
    options.add_argument("stage", choices=STAGES)
    variables = sub.add_parser("vars", help="DISTIL_* variables the templates read")
    for p in (options, variables):
        p.add_argument("config", help="experiment YAML")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. slurm.partition=gpu")
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args.config, args.overrides, os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "sbatch":
        print("\n".join(sbatch_options(cfg, args.stage, Path(args.config).stem)))
    else:
        print(shell_assignments(stage_variables(cfg)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
