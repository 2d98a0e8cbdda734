"""How a DeepSpeed rank ends (launch/train.py, launch/align.py): together, then at once."""

from __future__ import annotations

import logging
import os
import sys


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
