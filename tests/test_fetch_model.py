"""launch/fetch_model.py for real: the packaged SmolLM2 GGUF -> an HF folder, checked, once."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from distil.model_check import safetensors_problem
from distil.real_model import GGUF_SHA256, ModelFetchError, convert, packaged_gguf


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    import launch.fetch_model as fetch_model

    cache = tmp_path_factory.mktemp("cache")
    return cache, fetch_model


@pytest.mark.timeout(600)
def test_fetch_converts_once_and_prints_the_folder_last(fetched, capsys):
    cache, fetch_model = fetched
    assert fetch_model.main(["--cache-dir", str(cache)]) == 0
    folder = cache / "SmolLM2-135M-Instruct"
    assert capsys.readouterr().out.splitlines()[-1] == str(folder)
    manifest = json.loads((folder / "fetch_manifest.json").read_text())
    assert manifest["gguf_sha256"] == GGUF_SHA256 and manifest["parameters"] == 134_515_008
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied embeddings stay tied: 538 MB, not 651
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert "not the original bf16 weights" in (folder / "README.md").read_text()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert fetch_model.main(["--cache-dir", str(cache)]) == 0  # the second call is a no-op
    assert capsys.readouterr().out.splitlines()[-1] == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not (cache / "SmolLM2-135M-Instruct.partial").exists()


@pytest.mark.timeout(600)
def test_a_fetched_folder_whose_weights_were_cut_is_converted_again(fetched, capsys, caplog):
    """The manifest says "fetched"; the no-op path checks the weights too before it says so."""
    cache, fetch_model = fetched
    assert fetch_model.main(["--cache-dir", str(cache)]) == 0  # converted here or by the test above
    weights = cache / "SmolLM2-135M-Instruct" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    caplog.set_level(logging.INFO, logger="distil.real_model")
    assert fetch_model.main(["--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(weights.parent)
    assert "fails the model check, converting it again" in caplog.text and "cut short" in caplog.text
    assert weights.stat().st_size == size and safetensors_problem(weights) is None


def test_a_corrupt_gguf_is_refused_with_the_fix(tmp_path):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(packaged_gguf(), bad)
    with open(bad, "r+b") as f:
        f.seek(10_000_000)
        byte = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelFetchError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf: sha256 .*pip install --force-reinstall"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
