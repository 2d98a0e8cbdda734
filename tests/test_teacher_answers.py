"""Pure pieces of the annotation job: answer status, JSON schema, grounding, prompt fitting, config."""

import json

import pytest

from distil.config import ConfigError, TeacherConfig, load_config
from distil.teacher_config import sampling_key
from teacher_serving.annotate import Item, fit_prompts, request
from teacher_serving.answers import classify, key_info_schema
from teacher_serving.grounding import extract_facts, grounding_score, summarize_grounding


def test_classify():
    assert classify("  \n", "stop", "text") == "empty"
    assert classify("fever, 38.5 °C", "length", "text") == "truncated"
    assert classify("fever", "stop", "text") == "ok"
    assert classify('{"a": 1', "stop", "json") == "invalid_json"
    schema = key_info_schema(20)
    full = {k: ("" if v["type"] == "string" else []) for k, v in schema["properties"].items()}
    assert classify(json.dumps(full), "stop", "json") == "ok"
    assert classify(json.dumps({**full, "extra": 1}), "stop", "json") == "invalid_json"
    assert schema["properties"]["medications"]["items"]["maxLength"] == 20


def test_extract_facts_normalizes_numbers_units_dates_and_drugs():
    facts = extract_facts("A 45-year-old took Amoxicillin 500 mg and 2,5 mg/kg prednisolone on 12/03/2020; CRP 120.")
    assert facts == {"45", "amoxicillin", "500 mg", "2.5 mg/kg", "prednisolone", "12/03/2020", "120"}


def test_grounding_score_by_hand():
    report = "Se administró amoxicilina 500 mg durante 7 días. PCR 12,5 mg/l."
    assert grounding_score("amoxicilina 500mg; PCR 12.5 mg/l", report) == 1.0
    assert grounding_score("amoxicilina 750 mg, 7 días, vancomicina", report) == pytest.approx(2 / 4)
    assert grounding_score("no facts here", report) is None
    summary = summarize_grounding([{"lang": "es", "grounding": 1.0}, {"lang": "es", "grounding": 0.5},
                                   {"lang": "en", "grounding": None}], threshold=0.8)
    assert summary == {"es": {"scored": 2, "mean": 0.75, "below_threshold": 1}}


def test_retries_sample_at_retry_temperature_with_a_new_seed():
    t = TeacherConfig(temperature=0.0, retry_temperature=0.7, seed=3, max_new_tokens=16, max_model_len=64)
    item = Item({"id": "x", "lang": "en", "report": "r"}, [{"role": "user", "content": "r"}])
    assert request(item, t, None).sampling == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 3,
                                                  "stop": []}
    item.attempts = 2
    assert request(item, t, None).sampling["temperature"] == 0.7
    assert request(item, t, None).sampling["seed"] == 5
    assert sampling_key(t)["temperature"] == 0.0  # the ledger key is the configured sampling


def test_repetition_penalty_reaches_every_try_and_keys_the_ledger_only_when_set():
    plain = TeacherConfig(max_new_tokens=16, max_model_len=64)
    assert "repetition_penalty" not in sampling_key(plain)  # ledgers from before the option keep their keys
    t = TeacherConfig(max_new_tokens=16, max_model_len=64, repetition_penalty=1.15)
    item = Item({"id": "x", "lang": "en", "report": "r"}, [{"role": "user", "content": "r"}])
    assert request(item, t, None).sampling["repetition_penalty"] == 1.15
    item.attempts = 1
    assert request(item, t, None).sampling["repetition_penalty"] == 1.15
    assert sampling_key(t) == {**sampling_key(plain), "repetition_penalty": 1.15}


def test_fit_prompts_cuts_reports_to_their_first_tokens(tiny_model, sample_records):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    records = sample_records[:6]
    items, impossible = fit_prompts(records, tok, budget=200)
    assert not impossible and len(items) == 6
    for item, record in zip(items, records):
        text = tok.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 200
        cut = item.messages[1]["content"]
        assert item.report_tokens_dropped > 0 and record["report"].startswith(cut[:50])
    items, impossible = fit_prompts(records[:2], tok, budget=5)  # not even the system prompt fits
    assert not items and [r["id"] for r in impossible] == [r["id"] for r in records[:2]]


def test_teacher_config_checks_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {max_new_tokens: 4096, max_model_len: 2048, top_p: 0, backend: openai}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "teacher.max_new_tokens" in text and "teacher.top_p" in text and "teacher.api_base" in text
    assert "teacher.topk_logprobs: backend openai returns no prompt log-probs to store" in text
    for p in ("launch/configs/tiny_cpu.yaml",):
        assert load_config(p).teacher.tensor_parallel_size == 1
