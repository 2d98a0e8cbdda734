"""ROUGE in both tokenizations and the bootstrap: exact values on hand-made pairs."""

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenizers

from eval.metrics import UnicodeTokenizer, bootstrap_ci, copied_ngram_share, repeated_ngram_share, rouge, word_count


def test_paper_mode_hand_computed_pair():
    # pred/ref unigrams overlap: the x2, cat, on, mat = 5 of 6 each; bigrams: the cat, on the, the mat = 3 of 5;
    # LCS: the cat on the mat = 5.
    s = rouge("the cat sat on the mat", "the cat is on the mat", "en", mode="paper")
    assert s == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6}, abs=1e-12)


def test_paper_mode_uses_porter_stemmer():
    # Porter: fevers -> fever, coughs -> cough; so 2 of 3 unigrams match, no bigram does, LCS = 2.
    s = rouge("Fevers and coughs", "fever with cough", "en", mode="paper")
    assert s == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.0, "rougeL": 2 / 3}, abs=1e-12)


@pytest.mark.parametrize("pred,ref", [
    ("The patient was treated with amoxicillin for 10 days.", "Amoxicillin was given; the patient recovered."),
    ("Acute myocardial infarction with ST elevation.", "ST-elevation myocardial infarction, acute."),
    ("", "nonempty reference"),
])
def test_paper_mode_equals_rouge_score_defaults(pred, ref):
    expected = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    got = rouge(pred, ref, "en", mode="paper")
    assert got == {k: expected[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def test_paper_tokenizer_breaks_accented_words():
    # Why the unicode mode exists: rouge-score keeps [a-z0-9] only.
    assert tokenizers.DefaultTokenizer(use_stemmer=True).tokenize("neumonía") == ["neumon", "a"]


def test_unicode_tokenizer_keeps_accented_words():
    text = "Neumonía bilateral, insuficiência cardíaque!"
    assert UnicodeTokenizer("es", stem=False).tokenize(text) == ["neumonía", "bilateral", "insuficiência", "cardíaque"]
    assert UnicodeTokenizer("pt").tokenize("insuficiência") == ["insuficient"]   # Snowball Portuguese
    assert UnicodeTokenizer("fr").tokenize("cardíaque") == ["cardíaqu"]          # Snowball French keeps the í
    assert UnicodeTokenizer("es").tokenize("NEUMONÍA") == ["neumon"]             # lowercased, then stemmed
    assert UnicodeTokenizer("en").tokenize("the fevers") == ["the", "fever"]     # <= 3 letters: not stemmed


def test_unicode_tokenizer_normalizes_decomposed_accents():
    decomposed = "neumoni\u0301a"  # i + combining acute accent
    assert UnicodeTokenizer("es", stem=False).tokenize(decomposed) == ["neumonía"]


def test_unicode_mode_hand_computed_pair():
    # pt tokens: [insuficient, cardíac, grav] vs [insuficient, cardíac]
    # R1: P 2/3, R 1 -> F 0.8; R2: P 1/2, R 1 -> F 2/3; RL = R1.
    s = rouge("insuficiência cardíaca grave", "insuficiência cardíaca", "pt", mode="unicode")
    assert s == pytest.approx({"rouge1": 0.8, "rouge2": 2 / 3, "rougeL": 0.8}, abs=1e-12)


def test_modes_differ_on_accents():
    # unicode: [neumon, grav] vs [neumon, lev] -> 1/2; paper: [neumon, a, grave] vs [neumon, a, leve] -> 2/3
    assert rouge("Neumonía grave", "neumonía leve", "es", "unicode")["rouge1"] == pytest.approx(0.5)
    assert rouge("Neumonía grave", "neumonía leve", "es", "paper")["rouge1"] == pytest.approx(2 / 3)


def test_empty_prediction_scores_zero():
    assert rouge("", "insuficiência cardíaca", "pt") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_unknown_language_and_mode_are_errors():
    with pytest.raises(ValueError, match="unknown language 'de'"):
        rouge("a", "b", "de")
    with pytest.raises(ValueError, match="eval.rouge_tokenizer"):
        rouge("a", "b", "en", mode="ascii")


def test_bootstrap_constant_and_deterministic():
    assert bootstrap_ci([0.25] * 7, samples=200, seed=0) == pytest.approx((0.25, 0.25))
    values = [0.1, 0.9, 0.4, 0.6, 0.3]
    lo, hi = bootstrap_ci(values, samples=500, seed=3)
    assert (lo, hi) == bootstrap_ci(values, samples=500, seed=3)
    assert lo < np.mean(values) < hi


def test_bootstrap_one_resample_is_that_resample_mean():
    idx = np.random.default_rng(5).integers(0, 2, size=(1, 2))
    expected = float(np.array([0.0, 1.0])[idx].mean())
    assert bootstrap_ci([0.0, 1.0], samples=1, seed=5) == pytest.approx((expected, expected))
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([], samples=10, seed=0)


def test_word_count():
    assert word_count("Neumonía, 2 días; ok_go") == 5


def test_copy4_counts_the_prediction_4grams_found_in_the_report():
    report = "The patient had a high fever and a dry cough for three days."
    # prediction 4-grams: (the patient had a) in report, (patient had a high) in, (had a high fever) in,
    # (a high fever today) not: 3 of 4; case and punctuation do not matter.
    assert copied_ngram_share("The patient had a HIGH fever, today", report) == pytest.approx(3 / 4)
    assert copied_ngram_share("fever and cough", report) == 0.0  # under 4 words: nothing to copy
    assert copied_ngram_share("Fiebre alta y tos seca", "fiebre alta y tos seca") == 1.0
    assert copied_ngram_share("", report) == 0.0


def test_repeat4_counts_the_4grams_seen_earlier_in_the_same_prediction():
    # 12 words, 9 4-grams; the second "the cat sat on the mat" repeats (the cat sat on), (cat sat on the),
    # (sat on the mat): 3 of 9. Case and punctuation do not matter.
    assert repeated_ngram_share("The cat sat on the mat. The cat sat on the MAT") == pytest.approx(3 / 9)
    assert repeated_ngram_share("fiebre alta y tos seca") == 0.0      # no loop
    assert repeated_ngram_share("a b c d a b c d") == pytest.approx(1 / 5)
    assert repeated_ngram_share("fever and cough") == 0.0             # under 4 words
    assert repeated_ngram_share("") == 0.0
