"""Source grounding: does the teacher's key information repeat facts that are in the report?

The checkable facts of an answer are its numbers (with their unit when one follows), dates and
drug names (words with a common INN stem, in EN/ES/FR/PT spellings). Numbers and dates are read
by distil/faithfulness.py, which also scores the students' summaries: 1,056,000 and 1 056 000 are
one value, 12,5 and 12.5 another, and `500mg` is 500 mg. The score is the share of those facts
found in the source report, read the same way (or, for a drug name, in its lowercased text). An
answer without checkable facts scores None: nothing to check is not evidence of invention. Pure
functions over strings.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections import defaultdict

from distil.faithfulness import DATE, number_mentions

UNITS = (r"mg/kg|mg/dl|mg/l|mmol/l|µmol/l|umol/l|meq/l|g/dl|g/l|ng/ml|pg/ml|iu/l|ui/l|u/l|mmhg|cmh2o|"
         r"mcg|µg|ug|mg|kg|g|ml|dl|l|mm|cm|m|%|°c|bpm|lpm|años|anos|ans|years|year|days|días|dias|jours|"
         r"weeks|semanas|semaines|months|meses|mois|hours|horas|heures|h")
UNIT_AFTER = re.compile(rf"\s*({UNITS})(?!\w)", re.IGNORECASE)
DRUG = re.compile(
    r"\b\w+(?:mab|nib|cillin|cilina|cilline|mycin|micina|mycine|floxacin|floxacino|floxacine|cycline|ciclina|"
    r"olol|pril|sartan|statin|statina|statine|azole|azol|prazol|prazole|parin|parina|parine|vir|"
    r"zepam|semide|thiazide|tiazida|dronate|tidine|tidina|profen|fenac|solone|solona|methasone|metasona|cortisone|"
    r"cortisona|dipine|dipino|oxetine|oxetina|cetamol|tropin|trexate|trexato|platin|platino|rubicin|rubicina|taxel)\b", re.IGNORECASE)


def _normalize(text: str) -> str:
    text = text.lower()
    text = re.sub(r"(\d),(\d)", r"\1.\2", text)
    return re.sub(r"\s+", " ", text)


def extract_facts(text: str, lang: str = "en") -> set[str]:
    """Numbers as canonical values (+ the unit that follows), dates as written, drug-like words of `text`.

    `lang` sets how a lone separator before 3 digits reads (distil/faithfulness.py); "en" by default.
    """
    text = unicodedata.normalize("NFC", text)  # the offsets of number_mentions
    facts = set()
    for m in number_mentions(text, lang):
        written = text[m.start:m.end]
        if DATE.fullmatch(written):
            facts.add(written.lower())
        elif len(m.parts) > 1:  # a run that reads as no single number (a list 1,2,3): each part
            facts |= set(m.parts)
        else:
            unit = UNIT_AFTER.match(text, m.end)
            facts.add(f"{m.parts[0]} {unit.group(1).lower()}" if unit else m.parts[0])
    facts |= {d.lower() for d in DRUG.findall(text)}
    return facts


def grounding_score(answer: str, report: str, lang: str = "en") -> float | None:
    """Share of the answer's facts that occur in the report; None when the answer has none."""
    facts = extract_facts(answer, lang)
    if not facts:
        return None
    source = extract_facts(report, lang)
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
