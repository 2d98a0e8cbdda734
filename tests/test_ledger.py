"""The ledger: durable appends, resume by key, torn last line, one writer at a time (no Ray)."""

import json

import pytest

from distil.data import load_key_info
from teacher_serving.ledger import Ledger, LedgerLockedError, record_key

SAMPLING = {"temperature": 0.0, "max_new_tokens": 8}


def rec(i, status="ok", sampling=SAMPLING, prompt_version="v1"):
    return {"id": f"r{i}", "lang": "en", "key_info": f"info {i}", "status": status, "teacher": "t",
            "prompt_version": prompt_version, "sampling": sampling}


def test_append_resume_and_no_duplicates(tmp_path):
    path = tmp_path / "k.jsonl"
    with Ledger(path) as ledger:
        ledger.append([rec(0), rec(1)])
        ledger.append([rec(1)])  # same key again: not written twice
    with Ledger(path) as ledger:
        assert record_key("r0", "t", "v1", SAMPLING) in ledger.done
        assert record_key("r0", "t", "v2", SAMPLING) not in ledger.done
        assert record_key("r0", "t", "v1", {**SAMPLING, "temperature": 0.7}) not in ledger.done
        ledger.append([rec(2, status="truncated"), rec(0, prompt_version="v2")])
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["r0", "r1", "r2", "r0"]
    assert load_key_info(path) == {"r0": "info 0", "r1": "info 1"}  # Stage 2 reads ok records only


def test_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "k.jsonl"
    with Ledger(path) as ledger:
        ledger.append([rec(0)])
    with open(path, "a") as f:
        f.write('{"id": "r1", "lang": "e')  # the job died in the middle of a write
    with Ledger(path) as ledger:
        assert len(ledger.records) == 1
        ledger.append([rec(1)])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["r0", "r1"]


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(rec(0)) + "\nnot json\n" + json.dumps(rec(1)) + "\n")
    with pytest.raises(ValueError, match=r"k\.jsonl:2: not valid JSON"):
        Ledger(path)


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "k.jsonl"
    with Ledger(path):
        with pytest.raises(LedgerLockedError, match="another annotation job"):
            Ledger(path)
    with Ledger(path):
        pass
