"""The ledger: durable appends, resume by key, torn last line, one writer at a time (no Ray)."""

import json

import pytest

from distil.data import load_key_info
from distil.ledger import Ledger as KeyedLedger
from distil.ledger import LedgerLockedError
from distil.teacher_config import key_of
from distil.teacher_config import record_key as annotation_record_key


def Ledger(path):  # noqa: N802 - the Stage 1 ledger: records keyed by (id, teacher, prompt version, sampling)
    return KeyedLedger(path, key=key_of)


def record_key(record_id, teacher, prompt_version, sampling):
    return annotation_record_key(record_id, {"teacher": teacher, "prompt_version": prompt_version,
                                             "sampling": sampling})

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
    wanted = {"teacher": "t", "prompt_version": "v1", "sampling": SAMPLING}
    assert load_key_info(path, wanted) == {"r0": "info 0", "r1": "info 1"}  # Stage 2 reads ok records only


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


def test_stage2_trains_on_the_teacher_the_config_names_and_refuses_two_matching_answers(tmp_path):
    """A ledger shared by two teachers: Stage 2 takes the answers of the teacher in the config's teacher
    section (model, prompt version, sampling), never whichever came last."""
    from distil.config import TeacherConfig
    from distil.data import DataError, training_examples
    from distil.teacher_config import annotation_key

    big, small = TeacherConfig(model="big-teacher"), TeacherConfig(model="small-teacher", temperature=0.5)
    path = tmp_path / "k.jsonl"
    with Ledger(path) as ledger:
        for teacher, tag in ((big, "big"), (small, "small")):
            ledger.append([{"id": i, "lang": "en", "key_info": f"{tag} {i}", "status": "ok", **annotation_key(teacher)}
                           for i in ("a", "b")])
    records = [{"id": i, "lang": "en", "report": f"R {i}", "summary": f"S {i}"} for i in ("a", "b")]
    for teacher, tag in ((big, "big"), (small, "small")):
        examples, _ = training_examples(records, load_key_info(path, annotation_key(teacher)), gamma=0.8)
        assert [e["answer"] for e in examples if e["task"] == "extract"] == [f"{tag} a", f"{tag} b"]
    with pytest.raises(DataError, match="no record of teacher 'other'"):  # a config naming none of them
        load_key_info(path, annotation_key(TeacherConfig(model="other")))
    with open(path, "a") as f:  # a second answer of the big teacher for report b (a merged ledger)
        f.write(json.dumps({"id": "b", "lang": "en", "key_info": "again", "status": "ok", **annotation_key(big)}) + "\n")
    with pytest.raises(DataError, match=r"k\.jsonl:5: report 'b' has two answers of teacher 'big-teacher'"):
        load_key_info(path, annotation_key(big))
    assert load_key_info(path, annotation_key(small)) == {"a": "small a", "b": "small b"}


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(rec(0)) + "\n" + json.dumps(rec(1)))  # written by hand or another tool
    with Ledger(path) as ledger:
        assert [r["id"] for r in ledger.records] == ["r0", "r1"]
        ledger.append([rec(2)])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["r0", "r1", "r2"]
