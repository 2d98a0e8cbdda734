"""Entity-level P/R/F1 of extracted key information: exact values on hand-made answers."""

import json

import pytest

from eval.extraction import entities, entity_scores, normalize_entity, parse_key_info, prf

TEACHER = json.dumps({
    "patient_demographics": "61-year-old man", "presentation": "Fever, productive cough; dyspnea",
    "history": "", "diagnoses": ["Community-acquired pneumonia", "Sepsis"], "investigations": ["chest X-ray"],
    "medications": ["Amoxicillin", "Clarithromycin", "Paracetamol"], "procedures": [], "outcome": "recovered"})


def test_normalize_entity():
    assert normalize_entity("  Amoxicillin. ") == "amoxicillin"
    assert normalize_entity("Insuficiência\n  Cardíaca") == "insuficiência cardíaca"
    assert normalize_entity("(sepsis)") == "sepsis"


def test_parse_key_info_tolerates_fences_and_chatter():
    assert parse_key_info('```json\n{"medications": ["a"]}\n```') == {"medications": ["a"]}
    assert parse_key_info('Here it is: {"diagnoses": []} hope it helps') == {"diagnoses": []}
    assert parse_key_info("no json here") is None
    assert parse_key_info("[1, 2]") is None


def test_entities_from_lists_and_a_string_field():
    got = entities(parse_key_info(TEACHER))
    assert got == {"medications": {"amoxicillin", "clarithromycin", "paracetamol"},
                   "diagnoses": {"community-acquired pneumonia", "sepsis"},
                   "symptoms": {"fever", "productive cough", "dyspnea"}}
    assert entities({"symptoms": ["Rash"], "presentation": "fever"})["symptoms"] == {"rash"}  # first field wins
    assert entities(None) == {"medications": set(), "diagnoses": set(), "symptoms": set()}


def test_prf_hand_computed():
    assert prf(2, 3, 4) == pytest.approx({"precision": 2 / 3, "recall": 0.5, "f1": 4 / 7})
    assert prf(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_scores_micro_average_and_counts():
    student = {
        # medications: 2 of 2 predicted match (amoxicillin, paracetamol); diagnoses: 1 of 2; symptoms: fever, cough
        "r1": json.dumps({"medications": ["amoxicillin", "Paracetamol"], "diagnoses": ["sepsis", "asthma"],
                          "presentation": "fever, cough"}),
        "r2": "I cannot answer in JSON",   # counts as predicting nothing
    }
    teacher = {"r1": TEACHER, "r2": TEACHER, "r3": TEACHER, "r4": "free text, not JSON"}
    scores, counts = entity_scores(student, teacher)
    assert counts == {"reports": 2, "teacher_not_json": 1, "student_missing": 1, "student_not_json": 1}
    # gold totals over r1 + r2: medications 3 + 3, diagnoses 2 + 2, symptoms 3 + 3
    assert scores["medications"] == pytest.approx({**prf(2, 2, 6), "matched": 2, "predicted": 2, "gold": 6})
    assert scores["diagnoses"] == pytest.approx({**prf(1, 2, 4), "matched": 1, "predicted": 2, "gold": 4})
    assert scores["symptoms"] == pytest.approx({**prf(1, 2, 6), "matched": 1, "predicted": 2, "gold": 6})
    assert scores["medications"]["precision"] == 1.0 and scores["medications"]["recall"] == pytest.approx(1 / 3)


def test_launch_with_extraction(tmp_path, prepared_dir, tiny_model, capsys):
    from distil.config import load_config
    from distil.data import read_jsonl
    from distil.teacher_config import annotation_key
    from launch import evaluate as launch_evaluate

    ledger = tmp_path / "key_info.jsonl"
    test_ids = [r["id"] for r in read_jsonl(prepared_dir / "test.jsonl")][:3]
    teacher = annotation_key(load_config("launch/configs/tiny_cpu.yaml").teacher)  # as Stage 1 writes them
    ledger.write_text("".join(json.dumps({"id": i, "key_info": TEACHER, "status": "ok", **teacher}) + "\n"
                              for i in test_ids))
    out = tmp_path / "eval"
    argv = ["--config", "launch/configs/tiny_cpu.yaml", "--models", f"student={tiny_model}",
            f"data.prepared_dir={prepared_dir}", f"data.key_info_path={ledger}", f"eval.output_dir={out}",
            "eval.backend=hf", "eval.max_new_tokens=8", "eval.max_model_len=768", "eval.bootstrap_samples=20",
            "eval.device=cpu", "eval.extraction=true"]
    assert launch_evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| student | medications |" in printed
    saved = json.loads((out / "extraction.json").read_text())
    assert saved["student"]["counts"]["reports"] == 3
    assert saved["student"]["scores"]["diagnoses"]["gold"] == 6   # 2 per report x 3 reports
    assert len(read_jsonl(out / "predictions" / "student.extract.jsonl")) == 3
    assert "| student | medications |" in (out / "results.md").read_text()
