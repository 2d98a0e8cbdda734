"""The evaluation recipe: for each model, generate -> score; then the report.

Results folder (eval.output_dir):
  predictions/<label>.jsonl   one summary per report (resumable), + .meta.json (settings)
  results.md                  the paper-layout table, 95% intervals, speed/cost
  scores.csv, scores.json     per model x language means and intervals (+ counts, speed)
  per_report.csv              every metric of every report
  plots/                      metrics_by_language.png, length.png
  extraction.* (eval.extraction) entity P/R/F1 against the teacher's JSON key information
  showcase.json (eval.showcase_id) one public report beside every model's summary (also in results.md)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from distil.atomic import write_text
from distil.config import ExperimentConfig
from distil.data import DataError, read_prepared
from distil.teacher_config import annotation_key
from eval.bertscore import BertScore
from eval.generate import generate_predictions, read_predictions
from eval.report import terminal_summary, write_report
from eval.scoring import score_predictions
from eval.showcase import showcase, showcase_record, write_showcase

log = logging.getLogger(__name__)
REPORT_FILES = ("results.md", "scores.csv", "scores.json", "per_report.csv", "plots/metrics_by_language.png",
                "plots/length.png", "extraction.json", "extraction.csv", "showcase.json")


def evaluate(cfg: ExperimentConfig, models: dict[str, str]) -> str:
    """Evaluate each labelled model folder on data.prepared_dir/<eval.split>.jsonl; writes results.md and
    returns what to print (the means and the faithfulness table, never report text)."""
    e = cfg.eval
    out = Path(e.output_dir)
    records = read_prepared(Path(cfg.data.prepared_dir) / f"{e.split}.jsonl")
    if not records:
        raise DataError(f"{cfg.data.prepared_dir}/{e.split}.jsonl has no records to evaluate")
    if e.showcase_id:
        showcase_record(records, e.showcase_id)  # before any generation
    bertscore = BertScore(e)
    scores, counts = {}, {}
    for label, path in models.items():
        pred_path = out / "predictions" / f"{label}.jsonl"
        stats = generate_predictions(e, path, records, pred_path)
        log.info("%s: %s", label, stats)
        predictions = read_predictions(pred_path)
        scores[label], counts[label] = score_predictions(records, predictions, e.rouge_tokenizer, bertscore)
        counts[label]["truncated_reports"] = sum(p.get("truncated", False) for p in predictions.values())
    for name in REPORT_FILES:  # the old report goes first: a kill below leaves part of the new one, never a mix
        (out / name).unlink(missing_ok=True)
    markdown = write_report(out, scores, counts, e)
    printed = terminal_summary(json.loads((out / "scores.json").read_text()), e, out / "results.md")
    if e.extraction:
        from eval.extraction import evaluate_extraction

        extraction = evaluate_extraction(cfg, models, records)
        markdown += extraction
        printed += extraction
    if e.showcase_id:  # into results.md only: the returned (printed) Markdown never holds report text
        predictions = {label: read_predictions(out / "predictions" / f"{label}.jsonl") for label in models}
        side_by_side = write_showcase(out, showcase(records, predictions, e.showcase_id, cfg.data.key_info_path,
                                                      annotation_key(cfg.teacher)))
        markdown += "\n" + side_by_side
        printed += f"One report side by side ({e.showcase_id}), its inventions marked: in {out / 'results.md'}\n"
    write_text(out / "results.md", markdown)
    log.info("results in %s: %s", out, json.dumps(counts))
    return printed
