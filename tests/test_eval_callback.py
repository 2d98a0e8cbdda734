"""The evaluation-during-training callback inside a real (single-process, CPU) DistilTrainer run.

The multi-rank DeepSpeed path is the same callback on rank 0 (see eval/callback.py)."""

import json

import pytest

from distil.config import load_config
from distil.data import DataError
from eval.callback import GenerationEvalCallback

CONFIG = "launch/configs/tiny_cpu.yaml"


def experiment(prepared_dir, tiny_model, out, **extra):
    overrides = [f"data.prepared_dir={prepared_dir}", f"model.name_or_path={tiny_model}", f"train.output_dir={out}",
                 "train.max_length=512", "train.pack_length=2048", "loss.gamma=1.0", "data.key_info_path=null",
                 "eval.callback_steps=2", "eval.callback_subset=3", "eval.callback_max_new_tokens=6",
                 "eval.device=cpu", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(CONFIG, overrides)


def test_callback_logs_generation_scores_every_n_steps(tmp_path, prepared_dir, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from distil.dataset import load_train_rows
    from distil.packing import collate_packed
    from distil.trainer import DistilTrainer

    cfg = experiment(prepared_dir, tiny_model, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rows, _ = load_train_rows(tokenizer, cfg.data.prepared_dir, None, 1.0, cfg.train.max_length, cfg.train.pack_length)
    callback = GenerationEvalCallback(cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=4, learning_rate=1e-3,
                             per_device_train_batch_size=1, report_to=[], save_strategy="no",
                             remove_unused_columns=False, logging_steps=2)
    trainer = DistilTrainer(model=model, args=args, train_dataset=rows,
                            data_collator=collate_packed, processing_class=tokenizer, callbacks=[callback],
                            gamma=1.0, lm_head_chunk_tokens=256)
    trainer.train()
    entries = [e for e in trainer.state.log_history if "gen_rouge1" in e]
    assert [e["step"] for e in entries] == [2, 4]
    for e in entries:
        assert set(e) >= {"gen_bertscore_f1", "gen_rouge1", "gen_rouge2", "gen_rougeL", "gen_empty", "gen_copy4",
                          "gen_unsupported_numbers", "gen_novel_terms", "gen_repeat4"}
        assert all(0.0 <= e[f"gen_{m}"] <= 1.0 for m in ("rouge1", "unsupported_numbers", "novel_terms", "repeat4"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "generation_eval.jsonl").read_text().splitlines()]
    assert lines == entries
    assert model.training  # handed back in training mode


def test_callback_is_the_same_as_evaluating_the_weights_directly(tmp_path, prepared_dir, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = experiment(prepared_dir, tiny_model, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    callback = GenerationEvalCallback(cfg)
    assert callback.evaluate_now(model, tokenizer) == callback.evaluate_now(model, tokenizer)
    assert not model.training  # left as it was


def test_empty_split_is_a_clear_error(tmp_path, prepared_dir, tiny_model):
    (tmp_path / "valid.jsonl").write_text("")
    cfg = experiment(tmp_path, tiny_model, tmp_path / "run", **{"eval.callback_split": "valid"})
    with pytest.raises(DataError, match="valid.jsonl is empty.*eval.callback_split"):
        GenerationEvalCallback(cfg)


def test_the_library_does_not_import_the_eval_package():
    """distil/ is the library, eval/ builds on it: the recipe (launch/train.py) attaches the callback."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "distil").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "eval" or n.startswith("eval.") for n in names), f"{path.name} imports {names}"


def test_launch_train_attaches_the_callback(tmp_path, prepared_dir, tiny_model, monkeypatch):
    import distil.trainer
    from launch import train as launch_train

    calls = []
    monkeypatch.setattr(distil.trainer, "train", lambda cfg, callbacks: calls.append([type(c) for c in callbacks]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = ["--config", CONFIG, f"data.prepared_dir={prepared_dir}", f"model.name_or_path={tiny_model}",
            f"train.output_dir={tmp_path / 'run'}", "eval.callback_split=test"]
    assert launch_train.main(argv + ["eval.callback_steps=2"]) == 0
    assert launch_train.main(argv + ["eval.callback_steps=0"]) == 0
    assert calls == [[GenerationEvalCallback], []]
