"""The real thing on CPU: the `deepspeed` launcher, 2 ranks over gloo, ZeRO-2 and ZeRO-3, a tiny
Qwen2; resume after SIGKILL; export; 1 rank vs 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, free_port
from distil.config import TeacherConfig
from distil.data import read_jsonl
from distil.teacher_config import annotation_key

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
MAX_STEPS = 8


def _config(tmp: Path, prepared_dir: Path, tiny_model: Path, name: str, **train) -> Path:
    ledger = tmp / "key_info.jsonl"
    if not ledger.exists():  # Stage 1's ledger, written by hand here: two reports lack key info
        rows = read_jsonl(prepared_dir / "train.jsonl")
        teacher = annotation_key(TeacherConfig())  # as Stage 1 writes them for this config's teacher section
        ledger.write_text("".join(json.dumps({"id": r["id"], "lang": r["lang"], "status": "ok",
                                              "key_info": "Key facts: " + r["summary"][:160], **teacher}) + "\n"
                                  for r in rows[2:]))
    cfg = {
        "data": {"prepared_dir": str(prepared_dir), "key_info_path": str(ledger)},
        "model": {"name_or_path": str(tiny_model)},
        "loss": {"gamma": 0.8, "lm_head_chunk_tokens": 256},
        "train": {"output_dir": str(tmp / name), "max_length": 512, "pack_length": 1024, "max_steps": MAX_STEPS,
                  "learning_rate": 3e-3, "warmup_ratio": 0.0, "precision": "fp32", "logging_steps": 1,
                  "save_steps": 2, "save_total_limit": None, "trace_data": True, "seed": 7, **train},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(config: Path, ranks: int, *extra: str) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(REPO / "launch" / "train.py"), "--config", str(config), *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _run(config: Path, ranks: int, *extra: str) -> str:
    proc = subprocess.run(_command(config, ranks, *extra), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _params(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, prepared_dir, tiny_model):
    tmp = tmp_path_factory.mktemp("zero2")
    config = _config(tmp, prepared_dir, tiny_model, "run")
    log = _run(config, 2, "--deepspeed", str(REPO / "ds_configs/zero2.json"))
    return tmp, config, log


@pytest.mark.timeout(900)
def test_zero2_two_ranks_trains_shards_data_and_agrees(zero2_run):
    tmp, _, log = zero2_run
    out = tmp / "run"
    history = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == MAX_STEPS and losses[-1] < losses[0] - 0.5, losses
    assert all("loss_sum" in h and "loss_ext" in h and h["tokens_per_s"] > 0 for h in history if "loss" in h)
    # both ranks end with the same parameters
    p0, p1 = (json.loads((out / "data_trace" / f"params_rank{r}.json").read_text()) for r in (0, 1))
    assert p0 == p1
    # each rank saw different rows, and no example twice within the epoch
    seen = {}
    for rank in (0, 1):
        for line in (out / "data_trace" / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(rank, []).extend(row["examples"])
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything))
    assert any(e.startswith("extract:") for e in everything) and any(e.startswith("summarize:") for e in everything)
    # the exported model reloads and the run left TensorBoard events and its config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "hf")
    assert AutoTokenizer.from_pretrained(out / "hf").chat_template
    assert "lm_head.weight" not in _params(out / "hf")  # tied to the embeddings: not written twice
    assert list(out.rglob("events.out.tfevents.*"))
    assert (out / f"checkpoint-{MAX_STEPS}" / "experiment.yaml").is_file()
    assert "2 of 50 reports have no key information" in log


@pytest.mark.timeout(900)
def test_resume_after_sigkill_ends_with_the_same_parameters(zero2_run, prepared_dir, tiny_model):
    tmp, _, _ = zero2_run
    config = _config(tmp, prepared_dir, tiny_model, "killed")
    out = tmp / "killed"
    proc = subprocess.Popen(_command(config, 2, "--deepspeed", str(REPO / "ds_configs/zero2.json")), cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint-4 within 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "hf").exists()
    log = _run(config, 2, "--deepspeed", str(REPO / "ds_configs/zero2.json"))
    assert "resuming from" in log
    assert _max_diff(_params(out / "hf"), _params(tmp / "run" / "hf")) < 1e-6


@pytest.mark.timeout(900)
def test_rerunning_a_finished_run_is_refused(zero2_run):
    tmp, config, _ = zero2_run
    before = sorted(p.name for p in (tmp / "run").iterdir())
    proc = subprocess.run(_command(config, 2, "--deepspeed", str(REPO / "ds_configs/zero2.json")), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"error: train.output_dir={tmp / 'run'} holds a finished run: checkpoint-{MAX_STEPS} already reached "
            f"the {MAX_STEPS} optimizer steps this config plans") in proc.stderr
    assert sorted(p.name for p in (tmp / "run").iterdir()) == before


def test_another_student_into_the_same_output_dir_is_refused(zero2_run, lively_model):
    """Checkpoints belong to the student they started from (its fingerprint in student.json): a config
    that now names another model must not resume, and so go on training, the old one."""
    tmp, config, _ = zero2_run
    other = tmp / "other_student.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["name_or_path"] = str(lively_model)
    other.write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in (tmp / "run").iterdir())
    proc = subprocess.run(_command(other, 2, "--deepspeed", str(REPO / "ds_configs/zero2.json")), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: train.output_dir={tmp / 'run'} holds checkpoints of another student" in proc.stderr
    assert f"but model.name_or_path={lively_model} is sha256:" in proc.stderr
    assert sorted(p.name for p in (tmp / "run").iterdir()) == before


def test_a_train_split_without_examples_is_a_clear_error(tmp_path, tiny_model):
    empty = tmp_path / "prepared"
    empty.mkdir()
    for split in ("train", "valid", "test"):
        (empty / f"{split}.jsonl").write_text("")
    config = _config(tmp_path, empty, tiny_model, "run", max_steps=2)
    proc = subprocess.run(_command(config, 1), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: {empty}/train.jsonl gives no training example (0 reports" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(900)
def test_one_rank_with_accumulation_equals_two_ranks(zero2_run, prepared_dir, tiny_model):
    tmp, _, _ = zero2_run
    config = _config(tmp, prepared_dir, tiny_model, "one_rank", gradient_accumulation_steps=2)
    _run(config, 1, "--deepspeed", str(REPO / "ds_configs/zero2.json"))
    assert _max_diff(_params(tmp / "one_rank" / "hf"), _params(tmp / "run" / "hf")) < 1e-5


@pytest.mark.timeout(900)
def test_zero3_two_ranks_and_export_give_the_same_logits(tmp_path, prepared_dir, tiny_model):
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path, prepared_dir, tiny_model, "z3", max_steps=4)
    _run(config, 2, "--deepspeed", str(REPO / "ds_configs/zero3.json"))
    out = tmp_path / "z3"
    p0, p1 = (json.loads((out / "data_trace" / f"params_rank{r}.json").read_text()) for r in (0, 1))
    assert p0 == p1
    import launch.export as export

    assert export.main(["--checkpoint", str(out / "checkpoint-4"), "--output", str(tmp_path / "exported")]) == 0
    assert "lm_head.weight" not in _params(out / "hf") and "lm_head.weight" not in _params(tmp_path / "exported")
    ids = torch.tensor([list(range(5, 60))])
    live = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)(input_ids=ids).logits
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)(input_ids=ids).logits
    assert (live - exported).abs().max().item() < 1e-5
    start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(input_ids=ids).logits
    assert (live - start).abs().max().item() > 1e-3  # it trained


def test_train_without_the_launcher_shows_the_command(tmp_path, capsys, monkeypatch):
    import launch.train as train

    monkeypatch.delenv("RANK", raising=False)
    assert train.main(["--config", str(REPO / "launch/configs/tiny_cpu.yaml")]) == 2
    assert "deepspeed --num_gpus N launch/train.py" in capsys.readouterr().err
