"""Reading MultiClinSum, splitting, cropping, stats, and the errors users see on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE
from distil.data import (DataError, crop, dataset_stats, load_key_info, load_sources, split_counts,
                         split_records, training_examples)

SHARED = REPO.parent / "shared" / "data" / "multiclinsum_gs_train_en"


def test_bundled_sample_has_four_languages(sample_records):
    counts = {lang: sum(r["lang"] == lang for r in sample_records) for lang in ("en", "es", "fr", "pt")}
    assert counts == {"en": 40, "es": 8, "fr": 8, "pt": 8}
    first = next(r for r in sample_records if r["id"] == "multiclinsum_gs_en_1")
    assert first["report"] == (SAMPLE / "multiclinsum_gs_train_en/fulltext/multiclinsum_gs_en_1.txt").read_text()


@pytest.mark.skipif(not SHARED.is_dir(), reason="the full English split lives in ../shared/data (CI has it)")
def test_stats_of_the_real_english_split_match_the_paper_table():
    (row,) = dataset_stats(load_sources([SHARED]))
    assert row == {"lang": "en", "count": 592, "unlabelled": 0,
                   "report": {"mean": 3785.9, "min": 720, "max": 34072},
                   "summary": {"mean": 725.7, "min": 91, "max": 3884}}


def test_prepare_data_cli_prints_the_table(tmp_path, capsys):
    import launch.prepare_data as prepare

    assert prepare.main(["--input", str(SAMPLE / "multiclinsum_gs_train_es"), "--output", str(tmp_path), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "| es | 8 | 0 | 2196.6 | 1864 | 2616 |" in out
    assert [len((tmp_path / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test")] == [6, 0, 2]


def test_split_counts_are_the_papers_80_1_19():
    assert split_counts(592, [0.8, 0.01, 0.19]) == (474, 6, 112)
    assert split_counts(8, [0.8, 0.01, 0.19]) == (6, 0, 2)
    assert split_counts(100, [0.8, 0.01, 0.19]) == (80, 1, 19)


def test_split_is_deterministic_per_language_and_disjoint(sample_records):
    a = split_records(sample_records, [0.8, 0.01, 0.19], 42)
    b = split_records(list(reversed(sample_records)), [0.8, 0.01, 0.19], 42)
    assert {k: [r["id"] for r in v] for k, v in a.items()} == {k: [r["id"] for r in v] for k, v in b.items()}
    ids = [r["id"] for split in a.values() for r in split]
    assert len(ids) == len(set(ids)) == len(sample_records)
    assert sum(r["lang"] == "es" for r in a["train"]) == 6
    c = split_records(sample_records, [0.8, 0.01, 0.19], 7)
    assert [r["id"] for r in c["test"]] != [r["id"] for r in a["test"]]


def test_crop_cuts_characters():
    r = crop({"id": "x", "lang": "en", "report": "abcdef", "summary": "uvwxyz"}, 4, 2)
    assert (r["report"], r["summary"]) == ("abcd", "uv")
    assert crop(r, None, None) == r


def _release(tmp_path: Path, lang="en", n=2) -> Path:
    folder = tmp_path / f"mcs_{lang}"
    (folder / "fulltext").mkdir(parents=True)
    (folder / "summaries").mkdir()
    for i in range(1, n + 1):
        (folder / "fulltext" / f"r_{lang}_{i}.txt").write_text(f"Report {i} text.\n")
        (folder / "summaries" / f"r_{lang}_{i}_sum.txt").write_text(f"Summary {i}.\n")
    return folder


def test_missing_summary_file_names_it(tmp_path):
    folder = _release(tmp_path)
    (folder / "summaries" / "r_en_2_sum.txt").unlink()
    with pytest.raises(DataError, match=r"r_en_2\.txt: no summary file .*r_en_2_sum\.txt; add it or remove the report"):
        load_sources([folder])


def test_empty_report_is_an_error(tmp_path):
    folder = _release(tmp_path)
    (folder / "fulltext" / "r_en_1.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"record 'r_en_1' has an empty report"):
        load_sources([folder])


def test_non_utf8_bytes_are_named(tmp_path):
    folder = _release(tmp_path)
    (folder / "fulltext" / "r_en_1.txt").write_bytes("Neumon\xeda".encode("latin-1"))
    with pytest.raises(DataError, match=r"r_en_1\.txt: not valid UTF-8 \(byte 6"):
        load_sources([folder])


def test_duplicate_ids_across_sources(tmp_path):
    folder = _release(tmp_path)
    dup = tmp_path / "more.jsonl"
    dup.write_text(json.dumps({"id": "r_en_1", "lang": "en", "report": "a", "summary": "b"}) + "\n")
    with pytest.raises(DataError, match=r"duplicate report ids \['r_en_1'\]"):
        load_sources([folder, dup])


def test_unknown_language(tmp_path):
    with pytest.raises(DataError, match=r"unknown language 'de'"):
        load_sources([_release(tmp_path, lang="de")])
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps([{"id": "a", "lang": "it", "report": "r", "summary": "s"}]))
    with pytest.raises(DataError, match=r"x\.json\[0\]: record 'a' has unknown language 'it'"):
        load_sources([bad])


def test_json_and_jsonl_sources(tmp_path):
    rows = [{"id": "a", "lang": "fr", "report": "Rapport.", "summary": "Résumé."}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text(json.dumps(dict(rows[0], id="b")) + "\n")
    assert [r["id"] for r in load_sources([tmp_path / "a.json", tmp_path / "b.jsonl"])] == ["a", "b"]


def test_key_info_join_counts_reports_without_key_info(tmp_path):
    ledger = tmp_path / "key_info.jsonl"
    teacher = {"teacher": "t", "prompt_version": "v1", "sampling": {"temperature": 0.0}}
    ledger.write_text("\n".join(json.dumps({**r, **teacher}) for r in [
        {"id": "a", "key_info": "KI a", "status": "ok"},
        {"id": "b", "key_info": "", "status": "failed_empty"},
    ]) + "\n")
    records = [{"id": i, "lang": "en", "report": f"R {i}", "summary": f"S {i}"} for i in ("a", "b")]
    examples, counts = training_examples(records, load_key_info(ledger, teacher), gamma=0.8)
    assert [(e["id"], e["task"], e["answer"]) for e in examples] == [
        ("a", "summarize", "S a"), ("a", "extract", "KI a"), ("b", "summarize", "S b")]
    assert counts == {"reports": 2, "summarize": 2, "extract": 1, "missing_key_info": 1}
    baseline, _ = training_examples(records, {}, gamma=1.0)
    assert [e["task"] for e in baseline] == ["summarize", "summarize"]


def test_prepare_data_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    import launch.prepare_data as prepare

    folder = _release(tmp_path)
    (folder / "summaries" / "r_en_1_sum.txt").unlink()
    assert prepare.main(["--input", str(folder), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "r_en_1_sum.txt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
