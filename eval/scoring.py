"""Pair predictions with gold summaries and score each report: ROUGE-1/2/L, BERTScore P/R/F1 and what
ROUGE does not see: copying (copy4), invention (unsupported_numbers, novel_terms; distil/faithfulness.py)
and loops (repeat4), each beside the gold summary's own rate (ref_*). Every score is a fraction in [0, 1].

Bad inputs, each either an error or a counted skip (the counts go into scores.json):
  a prediction id not among the references, or with another language  -> error (wrong file)
  a reference language without a ROUGE stemmer / BERTScore model     -> error (names id, lang)
  a reference without a prediction                                   -> skipped, counted "missing"
  an empty prediction                                                -> scored (0), counted "empty"
"""

from __future__ import annotations

import logging

from distil.data import DataError
from distil.faithfulness import novel_terms, unsupported_numbers
from eval.metrics import SNOWBALL_LANGUAGES, copied_ngram_share, repeated_ngram_share, rouge, word_count

log = logging.getLogger(__name__)

METRICS = ("bertscore_p", "bertscore_r", "bertscore_f1", "rouge1", "rouge2", "rougeL", "copy4")
FAITHFULNESS = ("unsupported_numbers", "novel_terms", "repeat4")  # lower is better
CHECKS = ("copy4", *FAITHFULNESS)  # measured on the prediction and on the gold summary alike
GOLD = tuple(f"ref_{m}" for m in CHECKS)  # the gold summaries' rates


def align(references: list[dict], predictions: dict[str, dict]) -> tuple[list[tuple[dict, dict]], dict[str, int]]:
    """(reference, prediction) pairs in reference order, and the counts of skipped/odd inputs."""
    by_id = {r["id"]: r for r in references}
    stray = sorted(set(predictions) - set(by_id))
    if stray:
        raise DataError(f"{len(stray)} predictions have ids that are not in the evaluated split (e.g. {stray[:3]}); "
                        "were they generated for another split or data set?")
    pairs, counts = [], {"references": len(references), "missing": 0, "empty": 0, "scored": 0}
    for ref in references:
        if ref["lang"] not in SNOWBALL_LANGUAGES:
            raise DataError(f"record {ref['id']!r}: unknown language {ref['lang']!r}; "
                            f"supported: {sorted(SNOWBALL_LANGUAGES)}")
        pred = predictions.get(ref["id"])
        if pred is None:
            counts["missing"] += 1
            continue
        if pred.get("lang", ref["lang"]) != ref["lang"]:
            raise DataError(f"record {ref['id']!r}: prediction language {pred.get('lang')!r} but reference "
                            f"language {ref['lang']!r}; the predictions file does not match the data")
        if not isinstance(pred.get("prediction"), str):
            raise DataError(f"record {ref['id']!r}: prediction missing or not a string")
        counts["empty"] += not pred["prediction"].strip()
        pairs.append((ref, pred))
    counts["scored"] = len(pairs)
    if counts["missing"]:
        log.warning("%d of %d references have no prediction and are skipped", counts["missing"], len(references))
    return pairs, counts


def score_predictions(references: list[dict], predictions: dict[str, dict], rouge_mode: str,
                      bertscore) -> tuple[list[dict], dict[str, int]]:
    """One row per scored report: id, lang, METRICS, FAITHFULNESS, GOLD, lengths in words, counts of numbers
    (pred_/ref_numbers, pred_/ref_numbers_unsupported), tokens and seconds."""
    pairs, counts = align(references, predictions)
    bert: dict[str, dict] = {}
    for lang in sorted({ref["lang"] for ref, _ in pairs}):
        group = [(ref, pred) for ref, pred in pairs if ref["lang"] == lang]
        scores = bertscore.score([p["prediction"] for _, p in group], [r["summary"] for r, _ in group], lang)
        bert.update({ref["id"]: s for (ref, _), s in zip(group, scores)})
    rows = []
    for ref, pred in pairs:
        mine = text_checks(pred["prediction"], ref["report"], ref["lang"])
        gold = text_checks(ref["summary"], ref["report"], ref["lang"])
        row = {"id": ref["id"], "lang": ref["lang"], **bert[ref["id"]],
               **rouge(pred["prediction"], ref["summary"], ref["lang"], rouge_mode),
               **{m: mine[m] for m in CHECKS}, **{f"ref_{m}": gold[m] for m in CHECKS},
               "pred_words": word_count(pred["prediction"]), "ref_words": word_count(ref["summary"]),
               "pred_numbers": mine["numbers"], "pred_numbers_unsupported": mine["numbers_unsupported"],
               "ref_numbers": gold["numbers"], "ref_numbers_unsupported": gold["numbers_unsupported"]}
        row.update({key: pred[key] for key in ("gen_tokens", "seconds") if key in pred})
        rows.append(row)
    return rows, counts


def text_checks(summary: str, report: str, lang: str) -> dict:
    """CHECKS of one summary against its report, and how many numbers it writes (`numbers`), how many of them
    the report lacks (`numbers_unsupported`)."""
    numbers = unsupported_numbers(summary, report, lang)
    return {"copy4": copied_ngram_share(summary, report), "unsupported_numbers": numbers.share,
            "novel_terms": novel_terms(summary, report, lang).share, "repeat4": repeated_ngram_share(summary),
            "numbers": numbers.total, "numbers_unsupported": numbers.count}
