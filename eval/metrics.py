"""ROUGE-1/2/L per report with rouge-score, copy4 and repeat4, bootstrap confidence intervals: pure functions
over strings.

Two tokenizations (eval.rouge_tokenizer):
  paper   rouge-score's own tokenizer + Porter stemmer. It keeps only [a-z0-9], so "neumonía"
          becomes "neumon" + "a"; use it to compare with published (English) numbers.
  unicode keeps every letter (accents included), lowercases, and stems with the Snowball
          stemmer of the report's language. Same rule as rouge-score otherwise: only words of
          more than 3 characters are stemmed.
Scores are F-measures in [0, 1]; an empty prediction scores 0.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np
from rouge_score import rouge_scorer, tokenizers

from distil.faithfulness import SNOWBALL_LANGUAGES  # the languages every metric supports

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
WORD = re.compile(r"[^\W_]+")  # runs of letters and digits in any script


class UnicodeTokenizer(tokenizers.Tokenizer):
    """rouge-score tokenizer that keeps accented letters: NFC, lowercase, words, Snowball stems."""

    def __init__(self, lang: str, stem: bool = True):
        from nltk.stem import SnowballStemmer

        if lang not in SNOWBALL_LANGUAGES:
            raise ValueError(f"unknown language {lang!r} for ROUGE; supported: {sorted(SNOWBALL_LANGUAGES)}")
        self.stemmer = SnowballStemmer(SNOWBALL_LANGUAGES[lang]) if stem else None

    def tokenize(self, text: str) -> list[str]:
        words = WORD.findall(unicodedata.normalize("NFC", text).lower())
        if self.stemmer is None:
            return words
        return [self.stemmer.stem(w) if len(w) > 3 else w for w in words]


@functools.lru_cache(maxsize=None)
def rouge_scorer_for(lang: str, mode: str) -> rouge_scorer.RougeScorer:
    """One scorer per (language, eval.rouge_tokenizer); paper mode ignores the language."""
    if mode == "paper":
        if lang not in SNOWBALL_LANGUAGES:
            raise ValueError(f"unknown language {lang!r} for ROUGE; supported: {sorted(SNOWBALL_LANGUAGES)}")
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    if mode == "unicode":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer(lang))
    raise ValueError(f"unknown ROUGE tokenization {mode!r}; expected 'paper' or 'unicode' (eval.rouge_tokenizer)")


def rouge(prediction: str, reference: str, lang: str, mode: str = "unicode") -> dict[str, float]:
    """ROUGE-1/2/L F-measures of one prediction against its reference."""
    scores = rouge_scorer_for(lang, mode).score(reference, prediction)  # rouge-score takes (target, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def bootstrap_ci(values: list[float], samples: int, seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean: resample reports with replacement `samples` times."""
    if not values:
        raise ValueError("bootstrap of an empty list of scores")
    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of `text` (NFC, lowercased, letters and digits), in order."""
    words = WORD.findall(unicodedata.normalize("NFC", text).lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def copied_ngram_share(prediction: str, source: str, n: int = 4) -> float:
    """copy4: share of the prediction's word n-grams (lowercased, NFC) found verbatim in the source report.

    A summarizer that scores ROUGE by pasting sentences of the report is not what users want; the
    gold summaries give the reference value. A prediction shorter than n words copies nothing (0).
    """
    pred = word_ngrams(prediction, n)
    if not pred:
        return 0.0
    seen = set(word_ngrams(source, n))
    return sum(g in seen for g in pred) / len(pred)


def repeated_ngram_share(prediction: str, n: int = 4) -> float:
    """repeat4: share of the prediction's word n-grams that repeat an earlier n-gram of the same prediction.

    A looping summary (the same sentence again) can raise ROUGE while it tells the reader nothing
    new; a summary that never repeats itself scores 0, and so does one shorter than n words.
    """
    grams, seen, repeats = word_ngrams(prediction, n), set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def word_count(text: str) -> int:
    """Length in words (the length plot's unit), language-independent."""
    return len(WORD.findall(text))
