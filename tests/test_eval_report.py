"""Alignment of predictions with references (bad inputs), aggregation, the table, speed/cost, plots."""

import json
import os

import pytest

from conftest import REPO
from distil.config import EvalConfig
from distil.data import DataError
from eval.report import aggregate, faithfulness_table, markdown_table, speed, speed_markdown, write_report
from eval.scoring import align, score_predictions

REFS = [
    {"id": "en_1", "lang": "en", "summary": "Fever and cough.", "report": "She had fever and cough since Monday."},
    {"id": "en_2", "lang": "en", "summary": "Chest pain.", "report": "Chest pain at rest."},
    {"id": "es_1", "lang": "es", "summary": "Neumonía grave.", "report": "Neumonía grave bilateral."},
]


class ConstantBertScore:
    """Stands in for BertScore where only the bookkeeping is under test."""

    def score(self, predictions, references, lang):
        return [{"bertscore_p": 0.5, "bertscore_r": 0.25, "bertscore_f1": 1 / 3} for _ in predictions]


def pred(id_, lang, text, **kw):
    return {"id": id_, "lang": lang, "prediction": text, **kw}


def test_missing_predictions_are_a_counted_skip():
    pairs, counts = align(REFS, {"en_1": pred("en_1", "en", "Fever.")})
    assert [r["id"] for r, _ in pairs] == ["en_1"]
    assert counts == {"references": 3, "missing": 2, "empty": 0, "scored": 1}


def test_empty_prediction_is_scored_zero_and_counted():
    rows, counts = score_predictions(REFS[:1], {"en_1": pred("en_1", "en", "  ")}, "unicode", ConstantBertScore())
    assert counts["empty"] == 1 and counts["scored"] == 1
    assert (rows[0]["rouge1"], rows[0]["rouge2"], rows[0]["rougeL"]) == (0.0, 0.0, 0.0)


def test_prediction_for_an_unknown_id_is_an_error():
    with pytest.raises(DataError, match="not in the evaluated split.*'fr_9'"):
        align(REFS, {"fr_9": pred("fr_9", "fr", "x")})


def test_language_mismatch_is_an_error():
    with pytest.raises(DataError, match="record 'es_1': prediction language 'pt'"):
        align(REFS, {"es_1": pred("es_1", "pt", "x")})


def test_unknown_language_is_an_error():
    with pytest.raises(DataError, match="record 'de_1': unknown language 'de'"):
        align([{"id": "de_1", "lang": "de", "summary": "Fieber."}], {})


def test_score_rows_hold_metrics_lengths_and_timing():
    preds = {"en_1": pred("en_1", "en", "Fever and cough.", gen_tokens=4, seconds=0.5),
             "es_1": pred("es_1", "es", "Neumonía grave.", gen_tokens=3, seconds=0.25)}
    rows, counts = score_predictions(REFS, preds, "unicode", ConstantBertScore())
    assert counts == {"references": 3, "missing": 1, "empty": 0, "scored": 2}
    assert rows[0] == {"id": "en_1", "lang": "en", "bertscore_p": 0.5, "bertscore_r": 0.25, "bertscore_f1": 1 / 3,
                       "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "pred_words": 3, "ref_words": 3,
                       "copy4": 0.0, "ref_copy4": 0.0, "unsupported_numbers": 0.0, "ref_unsupported_numbers": 0.0,
                       "novel_terms": 0.0, "ref_novel_terms": 0.0, "repeat4": 0.0, "ref_repeat4": 0.0,
                       "pred_numbers": 0, "pred_numbers_unsupported": 0,
                       "ref_numbers": 0, "ref_numbers_unsupported": 0,
                       "gen_tokens": 4, "seconds": 0.5}
    assert rows[1]["rouge1"] == 1.0 and rows[1]["lang"] == "es"


def test_score_rows_hold_what_rouge_misses_for_the_prediction_and_the_gold_summary():
    refs = [{"id": "en_1", "lang": "en", "report": "Fever of 38.5 for 3 days, treated with amoxicillin.",
             "summary": "Fever for 3 days treated with amoxicillin."}]
    text = "Fever for 5 days, MRA normal. Fever for 5 days, MRA normal."
    row = score_predictions(refs, {"en_1": pred("en_1", "en", text)}, "unicode", ConstantBertScore())[0][0]
    # numbers 5, 5: neither in the report. Content words fever days mra normal x2 (for: stop word): mra and
    # normal are new, 4 of 8. 12 words, 9 4-grams: the last 3 (fever for 5 days ... 5 days mra normal) repeat.
    assert (row["unsupported_numbers"], row["pred_numbers"], row["pred_numbers_unsupported"]) == (1.0, 2, 2)
    assert row["novel_terms"] == pytest.approx(4 / 8) and row["repeat4"] == pytest.approx(3 / 9)
    assert (row["ref_unsupported_numbers"], row["ref_novel_terms"], row["ref_repeat4"]) == (0.0, 0.0, 0.0)
    assert (row["ref_numbers"], row["ref_numbers_unsupported"]) == (1, 0)


def metric_row(lang, value, **kw):
    return {"lang": lang, "bertscore_p": value, "bertscore_r": value, "bertscore_f1": value,
            "rouge1": value, "rouge2": value / 2, "rougeL": value, "copy4": value / 4,
            "unsupported_numbers": value / 10, "novel_terms": value / 5, "repeat4": value / 2,
            "ref_copy4": 0.1, "ref_unsupported_numbers": 0.0, "ref_novel_terms": 0.2, "ref_repeat4": 0.0,
            "pred_numbers": 10, "pred_numbers_unsupported": 1, "ref_numbers": 8, "ref_numbers_unsupported": 0, **kw}


def test_aggregate_means_per_language_and_all():
    scores = {"base": [metric_row("en", 0.2), metric_row("en", 0.4), metric_row("fr", 0.6)]}
    agg = aggregate(scores, samples=50, seed=0)
    assert [(r["model"], r["lang"], r["n"]) for r in agg] == [("base", "en", 2), ("base", "fr", 1), ("base", "all", 3)]
    assert agg[0]["rouge1"] == pytest.approx(0.3) and agg[0]["rouge2"] == pytest.approx(0.15)
    assert agg[1]["rouge1_lo"] == agg[1]["rouge1_hi"] == pytest.approx(0.6)   # one report: no spread
    assert agg[2]["rouge1"] == pytest.approx(0.4)
    assert agg[0]["rouge1_lo"] <= 0.3 <= agg[0]["rouge1_hi"]


def test_markdown_table_layout():
    scores = {"base": [metric_row("en", 0.2)], "distil": [metric_row("en", 0.4)]}
    lines = markdown_table(aggregate(scores, samples=10, seed=0)).splitlines()
    assert lines[0] == ("| Language | Model | n | BERTScore P | BERTScore R | BERTScore F1 "
                        "| ROUGE-1 | ROUGE-2 | ROUGE-L | copy4 |")
    assert lines[2] == "| EN | base | 1 | 20.00 | 20.00 | 20.00 | 20.00 | 10.00 | 20.00 | 5.00 |"
    assert lines[3] == "| EN | distil | 1 | 40.00 | 40.00 | 40.00 | 40.00 | 20.00 | 40.00 | 10.00 |"
    assert lines[4] == "| All | base | 1 | 20.00 | 20.00 | 20.00 | 20.00 | 10.00 | 20.00 | 5.00 |"
    assert ("| EN | base | 1 | 20.0–20.0 | 20.0–20.0 | 20.0–20.0 | 20.0–20.0 | 10.0–10.0 | 20.0–20.0 | 5.0–5.0 |"
            in lines)


def test_faithfulness_table_beside_the_gold_rates():
    scores = {"base": [metric_row("en", 0.2), metric_row("en", 0.4)]}
    agg = aggregate(scores, samples=10, seed=0)
    assert agg[0]["unsupported_numbers"] == pytest.approx(0.03) and agg[0]["ref_novel_terms"] == pytest.approx(0.2)
    assert (agg[0]["pred_numbers"], agg[0]["pred_numbers_unsupported"], agg[0]["ref_numbers"]) == (20, 2, 16)
    lines = faithfulness_table(agg).splitlines()
    assert lines[0] == ("| Language | Model | n | unsupported numbers | gold | novel terms | gold | repeat4 | gold "
                        "| numbers (unsupported) | gold numbers (unsupported) |")
    lo, hi = 100 * agg[0]["unsupported_numbers_lo"], 100 * agg[0]["unsupported_numbers_hi"]
    assert lines[2].startswith(f"| EN | base | 2 | 3.00 ({lo:.1f}–{hi:.1f}) | 0.00 | 6.00 (")
    assert lines[2].endswith("| 15.00 (10.0–20.0) | 0.00 | 20 (2) | 16 (0) |")


def test_speed_and_cost_against_the_teacher():
    scores = {
        "teacher": [metric_row("en", 0.5, gen_tokens=100, seconds=1.0),
                    metric_row("en", 0.5, gen_tokens=100, seconds=1.0)],
        "student": [metric_row("en", 0.4, gen_tokens=50, seconds=0.1),
                    metric_row("en", 0.4, gen_tokens=30, seconds=0.1)],
    }
    teacher, student = speed(scores, "teacher", gpu_hour_price=2.0, gpu_count=1, teacher_gpu_count=8)
    assert teacher == pytest.approx({"model": "teacher", "reports": 2, "tokens_per_s": 100.0, "seconds_per_report": 1.0,
                                     "reports_per_s": 1.0, "gpus": 8, "gpu_hours_per_1000_reports": 8 * 1000 / 3600,
                                     "cost_per_report": 1.0 / 3600 * 8 * 2.0})
    assert student["gpu_hours_per_1000_reports"] == pytest.approx(1 * 0.1 * 1000 / 3600)  # 1 GPU, 0.1 s a report
    assert student["tokens_per_s"] == pytest.approx(400.0)
    assert student["times_faster_than_teacher"] == pytest.approx(10.0)
    assert student["times_cheaper_than_teacher"] == pytest.approx(80.0)   # 10x faster on 8x fewer GPUs


def test_write_report_files(tmp_path):
    scores = {"base": [metric_row("en", 0.2, pred_words=10, ref_words=20, gen_tokens=12, seconds=0.2),
                       metric_row("pt", 0.3, pred_words=15, ref_words=25, gen_tokens=18, seconds=0.3)],
              "teacher": [metric_row("en", 0.5, pred_words=18, ref_words=20, gen_tokens=30, seconds=2.0),
                          metric_row("pt", 0.6, pred_words=22, ref_words=25, gen_tokens=40, seconds=2.0)]}
    counts = {m: {"references": 2, "missing": 0, "empty": 0, "scored": 2} for m in scores}
    markdown = write_report(tmp_path, scores, counts, EvalConfig(bootstrap_samples=20))
    for name in ("results.md", "scores.csv", "scores.json", "per_report.csv",
                 "plots/metrics_by_language.png", "plots/length.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "plots/length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["counts"] == counts and len(saved["scores"]) == 6
    for row in saved["scores"]:  # fractions, as every other metric; the tables show points
        for m in ("unsupported_numbers", "novel_terms", "repeat4", "ref_unsupported_numbers", "ref_novel_terms",
                  "ref_repeat4"):
            assert 0.0 <= row[m + "_lo"] <= row[m] <= row[m + "_hi"] <= 1.0, m
    assert saved["lower_is_better"] == ["unsupported_numbers", "novel_terms", "repeat4"]
    assert "## Faithfulness" in markdown and "| PT | teacher | 1 | 6.00 (6.0–6.0) | 0.00 |" in markdown
    assert "| PT | teacher | 1 |" in markdown and "× faster" in markdown
    # on CPU the speed table names the machine, not a GPU count, and prices nothing
    assert f"| base | CPU ({os.cpu_count()} cores) |" in markdown and "— (CPU)" in markdown
    assert "| base | 1 | " not in markdown.split("## Speed")[1]
    assert (tmp_path / "scores.csv").read_text().splitlines()[0].startswith("model,lang,n,bertscore_p,bertscore_p_lo")


def test_speed_table_on_a_gpu_counts_gpus_and_prices_them():
    rows = [{"model": "student", "reports": 2, "tokens_per_s": 400.0, "seconds_per_report": 0.1, "gpus": 1,
             "gpu_hours_per_1000_reports": 0.1 * 1000 / 3600, "cost_per_report": 0.1 / 3600 * 2.0}]
    assert speed_markdown(rows).splitlines()[2] == "| student | 1 | 400.0 | 0.100 | 0.028 | 0.000056 |"
    assert speed_markdown(rows, "CPU (2 cores)").splitlines()[2] == \
        "| student | CPU (2 cores) | 400.0 | 0.100 | — | — (CPU) |"


def test_gpu_hours_per_1000_reports():
    from distil.plan import gpu_hours_per_1000_reports

    assert gpu_hours_per_1000_reports(seconds=331.2, reports=260, gpus=8) == pytest.approx(8 * 331.2 / 260 * 1000 / 3600)
    assert gpu_hours_per_1000_reports(seconds=360.0, reports=1000, gpus=4) == pytest.approx(0.4)  # 0.36 s each x 4 GPUs
    assert gpu_hours_per_1000_reports(seconds=10.0, reports=5, gpus=0) is None  # CPU: no GPU-hours
    assert gpu_hours_per_1000_reports(seconds=0.0, reports=0, gpus=8) is None


def test_showcase_puts_one_report_beside_every_summary(tmp_path):
    from eval.showcase import showcase, showcase_markdown

    ledger = tmp_path / "k.jsonl"
    annotation = {"teacher": "t", "prompt_version": 1, "sampling": {"temperature": 0.0}}
    ledger.write_text(json.dumps({"id": "a", "status": "ok", "key_info": "fever, cough", **annotation}) + "\n")
    records = [{"id": "a", "lang": "en", "report": "Line one.\nLine two.", "summary": "Gold."}]
    item = showcase(records, {"base": {"a": {"prediction": "Base says."}}, "student": {}}, "a", str(ledger),
                    annotation)
    assert item == {"id": "a", "lang": "en", "report": "Line one.\nLine two.", "gold_summary": "Gold.",
                    "teacher_key_info": "fever, cough", "summaries": {"base": "Base says.", "student": None}}
    text = showcase_markdown(item)
    assert "> Line one.\n> Line two." in text and "**Summary by student**\n\n> (none)" in text
    with pytest.raises(DataError, match="eval.showcase_id 'zz' is not in the evaluated split"):
        showcase(records, {}, "zz", None, annotation)


def test_showcase_marks_what_the_report_does_not_support():
    from eval.showcase import mark_unsupported, showcase_markdown

    report = "A 45-year-old man had fever of 38.5 °C; CRP 1,200 mg/l."
    # 12 is no number of the report; MRA and performed are no words of it; 45, 38,5 and 1 200 are
    assert mark_unsupported("A 45-year-old: MRA performed, CRP 12 mg/l, 38,5 °C, 1 200", report, "en") == (
        "A 45-year-old: **MRA** **performed**, CRP **12** mg/l, 38,5 °C, 1 200", ["MRA", "performed", "12"])
    item = {"id": "a", "lang": "en", "report": report, "gold_summary": "Man, 45, with fever.",
            "teacher_key_info": None, "summaries": {"base": "MRA: 12 mg. MRA: 12 mg.", "student": None}}
    text = showcase_markdown(item)
    assert "> **MRA**: **12** mg. **MRA**: **12** mg.\n\nNot in the report: MRA, 12\n" in text
    assert "> Man, 45, with fever.\n\nNot in the report: nothing\n" in text  # the gold summary, checked alike
    assert "**Summary by student**\n\n> (none)\n" in text


def test_a_showcase_id_outside_the_split_is_refused_before_any_generation(tmp_path):
    """Checked up front: found after generation it would throw away every model's predictions run."""
    from distil.config import load_config
    from distil.data import write_jsonl
    from eval.evaluate import evaluate

    write_jsonl(tmp_path / "data" / "test.jsonl", [{"id": "a", "lang": "en", "report": "R.", "summary": "S."}])
    cfg = load_config(REPO / "launch" / "configs" / "tiny_cpu.yaml",
                      [f"data.prepared_dir={tmp_path / 'data'}", f"eval.output_dir={tmp_path / 'eval'}",
                       "eval.split=test", "eval.showcase_id=zz"])
    with pytest.raises(DataError, match=r"eval.showcase_id 'zz' is not in the evaluated split; pick an id of that split \(e.g. 'a'\)"):
        evaluate(cfg, {"base": str(tmp_path / "no_model_needed")})
    assert not (tmp_path / "eval" / "predictions").exists()
