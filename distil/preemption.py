"""Save a checkpoint and stop before SLURM's time limit, so a requeued job resumes where it stopped.

slurm/stage2.sbatch asks SLURM for USR1 a few minutes before the limit (--signal=B:USR1@N); its
trap creates the file named by $DISTIL_STOP_FILE. At every step end each rank looks for that file
and the ranks agree through one all-reduce (they may see it at different steps, and a checkpoint
save is collective). Then the Trainer saves and stops, rank 0 writes <stop file>.saved, and the job
script requeues the job. A file, not a signal to the ranks: the DeepSpeed launcher between SLURM
and the ranks dies on USR1, and a file works the same on every node of a shared filesystem.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

log = logging.getLogger(__name__)

STOP_FILE_ENV = "DISTIL_STOP_FILE"


class SaveAndStopCallback(TrainerCallback):
    """Checkpoint and stop at the first step end after `stop_file` appears (on any rank)."""

    def __init__(self, stop_file: str | os.PathLike | None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.stopped = False

    @classmethod
    def from_env(cls) -> SaveAndStopCallback:
        return cls(os.environ.get(STOP_FILE_ENV))

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_file is None or self.stopped:
            return
        requested = torch.tensor([float(self.stop_file.exists())], device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        if requested.item() > 0:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
            if state.is_world_process_zero:
                log.info("stop requested (%s): saving checkpoint-%d and stopping", self.stop_file, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.stopped and state.is_world_process_zero:
            Path(f"{self.stop_file}.saved").write_text(f"checkpoint-{state.global_step}\n")
