"""Extraction quality: entity-level precision/recall/F1 of a student's key information vs the teacher's.

Both sides are JSON key information (teacher.key_info_format: json; schema in
teacher_serving/answers.py). Each category is read from the first of its fields present
(ENTITY_FIELDS); a list field gives its items, a string field is split at , ; and line breaks.
Entities match after normalization (NFC, casefold, inner whitespace collapsed, surrounding
punctuation dropped), as sets per report. Scores are micro-averaged over reports:
P = matched / predicted, R = matched / teacher's, F1 their harmonic mean (0 when undefined).
Reports whose teacher answer is missing or not JSON are skipped and counted; a student answer
that is not JSON counts as predicting nothing.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from distil.atomic import write_json

ENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "medications": ("medications",),
    "diagnoses": ("diagnoses",),
    "symptoms": ("symptoms", "presentation"),
}
SPLIT = re.compile(r"[,;\n]+")
FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


def normalize_entity(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFC", text).casefold().split())
    return text.strip(" .,:;!?()[]\"'-")


def parse_key_info(text: str) -> dict | None:
    """The JSON object in an answer (``` fences and text around the braces tolerated), else None."""
    text = FENCE.sub("", text.strip())
    for candidate in (text, text[text.find("{"): text.rfind("}") + 1]):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def entities(key_info: dict | None) -> dict[str, set[str]]:
    """Normalized entity sets per category from parsed key information (empty sets for None)."""
    out = {}
    for category, fields in ENTITY_FIELDS.items():
        value = next((key_info[f] for f in fields if key_info and f in key_info), None)
        items = value if isinstance(value, list) else SPLIT.split(value) if isinstance(value, str) else []
        out[category] = {n for n in (normalize_entity(i) for i in items if isinstance(i, str)) if n}
    return out


def prf(matched: int, predicted: int, gold: int) -> dict[str, float]:
    p = matched / predicted if predicted else 0.0
    r = matched / gold if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_scores(student: dict[str, str], teacher: dict[str, str]) -> tuple[dict[str, dict], dict[str, int]]:
    """Micro P/R/F1 per category over the ids in `teacher`; `student` answers by id (raw text)."""
    totals = {c: [0, 0, 0] for c in ENTITY_FIELDS}  # matched, predicted, gold
    counts = {"reports": 0, "teacher_not_json": 0, "student_missing": 0, "student_not_json": 0}
    for id_, teacher_text in teacher.items():
        gold_info = parse_key_info(teacher_text)
        if gold_info is None:
            counts["teacher_not_json"] += 1
            continue
        if id_ not in student:
            counts["student_missing"] += 1
            continue
        pred_info = parse_key_info(student[id_])
        counts["student_not_json"] += pred_info is None
        counts["reports"] += 1
        gold, pred = entities(gold_info), entities(pred_info)
        for c in ENTITY_FIELDS:
            totals[c][0] += len(gold[c] & pred[c])
            totals[c][1] += len(pred[c])
            totals[c][2] += len(gold[c])
    return {c: {**prf(*t), "matched": t[0], "predicted": t[1], "gold": t[2]} for c, t in totals.items()}, counts


def evaluate_extraction(cfg, models: dict[str, str], records: list[dict]) -> str:
    """Generate P_ext answers per model (not the teacher) and score them; writes extraction.json/.csv."""
    from distil.data import DataError, load_key_info
    from distil.teacher_config import annotation_key
    from eval.generate import generate_predictions, read_predictions
    from eval.report import write_csv

    if not cfg.data.key_info_path:
        raise DataError("eval.extraction needs the teacher's key information: set data.key_info_path")
    ids = {r["id"] for r in records}
    teacher = {i: t for i, t in load_key_info(cfg.data.key_info_path, annotation_key(cfg.teacher)).items() if i in ids}
    if not teacher:
        raise DataError(f"{cfg.data.key_info_path} has no key information for the {cfg.eval.split} split; "
                        f"annotate it in Stage 1 (teacher.splits)")
    out = Path(cfg.eval.output_dir)
    results, rows = {}, []
    for label, path in models.items():
        if label == cfg.eval.teacher_label:
            continue
        pred_path = out / "predictions" / f"{label}.extract.jsonl"
        generate_predictions(cfg.eval, path, [r for r in records if r["id"] in teacher], pred_path, task="extract")
        student = {i: p["prediction"] for i, p in read_predictions(pred_path).items()}
        scores, counts = entity_scores(student, teacher)
        results[label] = {"scores": scores, "counts": counts}
        rows += [{"model": label, "category": c, **s} for c, s in scores.items()]
    write_json(out / "extraction.json", results, indent=1)
    write_csv(rows, out / "extraction.csv")
    lines = ["\n## Extraction vs the teacher's key information (entity P/R/F1, %)\n",
             "| Model | Category | P | R | F1 | predicted | teacher's |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['category']} | {100 * r['precision']:.2f} | {100 * r['recall']:.2f} "
              f"| {100 * r['f1']:.2f} | {r['predicted']} | {r['gold']} |" for r in rows]
    return "\n".join(lines) + "\n"
