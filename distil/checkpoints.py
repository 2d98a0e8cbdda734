"""Finding the checkpoint to resume from, and exporting one as a Hugging Face model.

The Trainer writes a checkpoint folder in several steps (weights, DeepSpeed states, RNG, and
trainer_state.json last), so a job killed mid-save leaves a folder without trainer_state.json.
Resume picks the newest *complete* checkpoint, so a kill at any moment loses at most the steps
since the last one. A checkpoint that already reached the planned steps is a finished run:
resuming it would train nothing, which the recipe refuses (finished_run_message).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distil.atomic import publish_dir, staging_dir
from distil.config import TrainConfig

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FinishedRunError(RuntimeError):
    """train.output_dir holds a run this config cannot resume: finished already, or of another student."""


STUDENT_FILE = "student.json"  # in train.output_dir: which model the checkpoints there started from


def other_student_message(output_dir: str | Path, identity: str, name: str, section: str = "train",
                          model_key: str = "model.name_or_path") -> str | None:
    """Why the checkpoints in `output_dir` are another student's (distil.fingerprint differs), or None: a
    resume would go on training that one, whatever `model_key` says now."""
    path = Path(output_dir) / STUDENT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("identity") == identity:
        return None
    return (f"{section}.output_dir={output_dir} holds checkpoints of another student ({saved.get('model')}, "
            f"{saved.get('identity')}), but {model_key}={name} is {identity}: resuming would go on training "
            f"the other one. Use a new {section}.output_dir for this student, or set {model_key} back")


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = [
        (int(m.group(1)), path)
        for path in output_dir.iterdir()
        if (m := CHECKPOINT.match(path.name)) and (path / "trainer_state.json").is_file() and (path / "latest").is_file()
    ]
    return max(complete)[1] if complete else None


def finished_run_message(checkpoint: Path, planned_steps: int, train: TrainConfig, section: str = "train") -> str | None:
    """Why resuming `checkpoint` would do nothing (it reached `planned_steps` and is exported), or None.

    A finished run without output_dir/hf (stopped on request at its last step) still has its export to do:
    None. `train` holds the run's output_dir, num_epochs, max_steps and export; `section` names their keys.
    """
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    if step < planned_steps or (train.export and not (Path(train.output_dir) / "hf").is_dir()):
        return None
    return (f"{section}.output_dir={train.output_dir} holds a finished run: {Path(checkpoint).name} already reached "
            f"the {planned_steps} optimizer steps this config plans ({section}.num_epochs={train.num_epochs:g}, "
            f"{section}.max_steps={train.max_steps}), so resuming it would train nothing. To train again, use a new "
            f"{section}.output_dir (or delete this one); to train this run further, raise {section}.num_epochs or "
            f"{section}.max_steps; to export it again, delete its hf/ folder and rerun")


def without_tied_copies(state_dict: dict, model) -> dict:
    """`state_dict` minus the weights `model` ties to another (lm_head.weight with tie_word_embeddings).

    Under DeepSpeed ZeRO 0-2 the Trainer saves a state dict whose tensors accelerate cloned one by
    one, and save_pretrained drops a tied weight only when it shares storage, so lm_head.weight was
    written too (a tied 135M model in fp32: 651 MB instead of 538 MB); from_pretrained ties it back.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}


def check_checkpoint(checkpoint_dir: str | Path) -> None:
    """FileNotFoundError unless `checkpoint_dir` is a complete checkpoint-N folder (cheap: no imports)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "latest").is_file() or not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir}: not a complete training checkpoint (needs 'latest' and config.json); "
            "pass one of the output_dir/checkpoint-N folders written by launch/train.py"
        )


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Consolidate a DeepSpeed checkpoint (any ZeRO stage) into fp32 HF weights + tokenizer + chat template."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    check_checkpoint(checkpoint_dir)
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    config = AutoConfig.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{checkpoint_dir}: checkpoint does not match the model config "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    staged = staging_dir(output_dir)  # swapped in whole: a kill never leaves half a model at output_dir
    model.save_pretrained(staged)
    AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(staged)
    publish_dir(staged, output_dir)
    return output_dir
