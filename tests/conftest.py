"""Shared fixtures: the bundled sample, prepared splits and a tiny Qwen2 built once per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
sys.path.insert(0, str(REPO))  # launch/*.py import as modules in tests

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    """A port nobody listens on now (never a hard-coded one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_records():
    from distil.data import load_sources

    return load_sources([SAMPLE])


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, sample_records):
    """train/valid/test JSONL of the bundled sample (all four languages), paper split and crop."""
    from distil.data import SPLITS, crop, split_records, write_jsonl

    out = tmp_path_factory.mktemp("prepared")
    splits = split_records(sample_records, [0.8, 0.01, 0.19], 42)
    for split in SPLITS:
        rows = splits[split] if split == "test" else [crop(r, 2560, 512) for r in splits[split]]
        write_jsonl(out / f"{split}.jsonl", rows)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_records):
    """A random Qwen2 (hidden 128, 2 layers, head_dim 64) + BPE tokenizer trained on the sample."""
    from distil.tiny import make_tiny_model

    texts = [r["report"] for r in sample_records] + [r["summary"] for r in sample_records]
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, seed=0)


@pytest.fixture(scope="session")
def lively_model(tmp_path_factory, tiny_model):
    """The tiny model with larger random weights, so greedy decoding varies instead of repeating one token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("lively")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out
