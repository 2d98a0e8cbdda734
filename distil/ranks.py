"""What the DeepSpeed recipes (launch/train.py, launch/align.py) share: their command line, and how a rank
ends (together, then at once)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def recipe_arguments(doc: str, argv: list[str] | None, script: str, example: str, zero: str = "zero2"):
    """(args, the overrides with --deepspeed folded in) of a DeepSpeed recipe, or None after saying how to
    launch it when it runs outside the DeepSpeed launcher (no RANK / WORLD_SIZE)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (overrides train.deepspeed)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--verbose", action="store_true", help="print DeepSpeed's and transformers' logs too")
    parser.add_argument("overrides", nargs="*", help=f"section.key=value, e.g. {example}")
    args = parser.parse_args(argv)
    enable_stack_dumps()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(f"error: {script} runs under the DeepSpeed launcher:\n  deepspeed --num_gpus N {script} --config "
              f"CONFIG.yaml [--deepspeed ds_configs/{zero}.json]", file=sys.stderr)
        return None
    return args, list(args.overrides) + ([f"train.deepspeed={args.deepspeed}"] if args.deepspeed else [])


def log_per_rank(log_file, verbose: bool) -> None:
    """Every rank's lines into `log_file`; on the terminal rank 0 at INFO, the other ranks their errors only
    (their warnings repeat rank 0's)."""
    from distil.logs import setup

    rank = int(os.environ["RANK"])
    setup(log_file, verbose, logging.INFO if rank == 0 else logging.ERROR, f"%(asctime)s rank{rank} %(name)s: %(message)s")


def run_together(work, user_errors: tuple[type[BaseException], ...]) -> int:
    """Run a recipe's `work` on this rank; exit status 0 ("model: <folder>" on rank 0), or 2 for `user_errors`.
    The ranks leave together and close their process groups whatever happens."""
    try:
        model = work()
        leave_together()
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_process_groups()
    if model:
        print(f"model: {model}")
    return 0


def leave_together() -> None:
    """Every rank waits here until rank 0 has exported and checked the model, so no rank closes its
    process groups while a peer still uses them."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def close_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """Flush what the rank printed and logged, then end the process without the interpreter's teardown.
    Everything the rank writes is on disk by now (atomic writes, checked export); the teardown only runs
    the destructors of native threads (gloo, DeepSpeed's ops) in no set order, and it has aborted a
    finished rank ("terminate called without an active exception", exit -6: rank 1 of the two-node
    ZeRO-3 test, in two full-suite runs) after its work was done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def enable_stack_dumps() -> None:
    """A rank killed by a signal prints every thread's Python stack."""
    import faulthandler

    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError):  # no file descriptor behind sys.stderr (an in-process caller)
        pass
