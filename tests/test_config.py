"""Config loading: every shipped YAML loads; bad keys, types and YAML give one clear error."""

from __future__ import annotations

import pytest

from conftest import REPO
from distil.config import ConfigError, load_config, teachers

CONFIGS = sorted((REPO / "launch" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_deepspeed_json_exists(path):
    cfg = load_config(path)
    if cfg.train.deepspeed:
        assert (REPO / cfg.train.deepspeed).is_file(), f"{path.name}: {cfg.train.deepspeed} missing"


def test_every_72b_teacher_that_scores_leaves_room_for_the_topk_pass():
    """docs/stage1.md ("Memory for the top-k pass"): the 72B configs pin the prefill chunk and vLLM's share."""
    scoring = [(path.name, t.config) for path in CONFIGS for t in teachers(load_config(path))
               if "Qwen2.5-72B" in t.config.model and t.config.topk_logprobs > 0]
    assert len(scoring) >= 6
    for name, teacher in scoring:
        assert (teacher.max_num_batched_tokens, teacher.gpu_memory_utilization) == (2048, 0.85), name


def test_paper_config_has_the_papers_hyperparameters():
    cfg = load_config(REPO / "launch/configs/paper_qwen25_05b.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (cfg.loss.gamma, cfg.train.learning_rate, cfg.train.lr_scheduler) == (0.8, 1e-5, "cosine")
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.num_epochs) == (0.03, 0.01, 3.0)
    assert cfg.train.precision == "bf16"
    assert (cfg.data.split_fractions, cfg.data.split_seed) == ([0.8, 0.01, 0.19], 42)
    assert (cfg.data.crop_report_chars, cfg.data.crop_summary_chars) == (2560, 512)


def test_overrides_replace_values_with_yaml_types(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-5\n")
    cfg = load_config(path, ["train.learning_rate=2e-5", "loss.gamma=1", "data.key_info_path=null"])
    assert cfg.train.learning_rate == 2e-5 and cfg.loss.gamma == 1.0 and cfg.data.key_info_path is None


def test_all_problems_reported_together_with_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 1\n  max_length: many\nloss:\n  gamma: 1.5\nwat: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "4 problem(s)" in text
    assert "train.learning_rat: unknown key" in text
    assert "train.max_length: expected int, got 'many'" in text
    assert "loss.gamma: must be in [0, 1], got 1.5" in text
    assert "wat: unknown section" in text


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_length: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: malformed YAML"):
        load_config(path)


def test_bad_override_is_explained(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(path, ["learning_rate=3"])


def test_a_renamed_key_says_its_new_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("teacher:\n  batch_size: 64\n")
    with pytest.raises(ConfigError, match=r"teacher\.batch_size: renamed to teacher\.max_num_seqs"):
        load_config(path)


def test_the_config_reference_in_docs_is_current():
    from distil.config import reference_table

    assert reference_table() in (REPO / "docs/config.md").read_text(), \
        "docs/config.md is stale: regenerate its table with the command in its header"
