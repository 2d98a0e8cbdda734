"""Finding the checkpoint to resume from, and exporting one as a Hugging Face model.

The Trainer writes a checkpoint folder in several steps (weights, DeepSpeed states, RNG, and
trainer_state.json last), so a job killed mid-save leaves a folder without trainer_state.json.
Resume picks the newest *complete* checkpoint, so a kill at any moment loses at most the steps
since the last one.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Consolidate a DeepSpeed checkpoint (any ZeRO stage) into fp32 HF weights + tokenizer + chat template."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not (checkpoint_dir / "latest").is_file() or not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir}: not a complete training checkpoint (needs 'latest' and config.json); "
            "pass one of the output_dir/checkpoint-N folders written by launch/train.py"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    config = AutoConfig.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{checkpoint_dir}: checkpoint does not match the model config "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(output_dir)
    return output_dir
