"""Source grounding: does the teacher's key information repeat facts that are in the report?

The checkable facts of an answer are its numbers (with their unit when one follows), dates and
drug names (words with a common INN stem, in EN/ES/FR/PT spellings). The score is the share of
those facts found in the source report after the same normalization (lower case, decimal comma
as point, no space between a number and its unit). An answer without checkable facts scores
None: nothing to check is not evidence of invention. Pure functions over strings.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

UNITS = (r"mg/kg|mg/dl|mg/l|mmol/l|µmol/l|umol/l|meq/l|g/dl|g/l|ng/ml|pg/ml|iu/l|ui/l|u/l|mmhg|cmh2o|"
         r"mcg|µg|ug|mg|kg|g|ml|dl|l|mm|cm|m|%|°c|bpm|lpm|años|anos|ans|years|year|days|días|dias|jours|"
         r"weeks|semanas|semaines|months|meses|mois|hours|horas|heures|h")
DATE = re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b")
NUMBER_UNIT = re.compile(rf"(?<![\w.,])(\d+(?:[.,]\d+)?)\s*({UNITS})(?![\w])")
NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)?(?![\w])")
DRUG = re.compile(
    r"\b\w+(?:mab|nib|cillin|cilina|cilline|mycin|micina|mycine|floxacin|floxacino|floxacine|cycline|ciclina|"
    r"olol|pril|sartan|statin|statina|statine|azole|azol|prazol|prazole|parin|parina|parine|vir|"
    r"zepam|semide|thiazide|tiazida|dronate|tidine|tidina|profen|fenac|solone|solona|methasone|metasona|cortisone|"
    r"cortisona|dipine|dipino|oxetine|oxetina|cetamol|tropin|trexate|trexato|platin|platino|rubicin|rubicina|taxel)\b", re.IGNORECASE)


def _normalize(text: str) -> str:
    text = text.lower()
    text = re.sub(r"(\d),(\d)", r"\1.\2", text)
    return re.sub(r"\s+", " ", text)


def extract_facts(text: str) -> set[str]:
    """Normalized numbers (+unit), dates and drug-like words of `text`."""
    text = _normalize(text)
    facts = set(DATE.findall(text))
    without_dates = DATE.sub(" ", text)
    facts |= {f"{num} {unit}" for num, unit in NUMBER_UNIT.findall(without_dates)}
    facts |= set(NUMBER.findall(NUMBER_UNIT.sub(" ", without_dates)))
    facts |= set(DRUG.findall(text))
    return facts


def grounding_score(answer: str, report: str) -> float | None:
    """Share of the answer's facts that occur in the report; None when the answer has none."""
    facts = extract_facts(answer)
    if not facts:
        return None
    source = extract_facts(report)
    source_text = _normalize(report)
    found = sum(1 for f in facts if f in source or f in source_text)
    return found / len(facts)


def summarize_grounding(records: list[dict], threshold: float | None) -> dict[str, dict]:
    """Per language: records scored, mean score and how many fall below `threshold`."""
    by_lang: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("grounding") is not None:
            by_lang[r["lang"]].append(r["grounding"])
    return {lang: {"scored": len(scores), "mean": round(statistics.fmean(scores), 4),
                   "below_threshold": sum(s < threshold for s in scores) if threshold is not None else None}
            for lang, scores in sorted(by_lang.items())}
