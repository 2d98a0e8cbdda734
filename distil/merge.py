"""Merge students into one model with mergekit (linear soup, task arithmetic, TIES), as MediPhi merges its
experts: one model to serve instead of one per language or per gamma.

mergekit does the arithmetic, tensor by tensor; this module adds what it leaves to the user: students of
another architecture or tokenizer are refused by name before anything is loaded (mergekit would average a
Qwen2.5 embedding row with a Llama one), the result is swapped in whole and checked like any model, the
recipe is saved beside it (merge.yaml: this section, resolved; mergekit_config.yml: what mergekit ran),
and the memory the merge needs is said before it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import yaml

from distil.align_config import MergeConfig
from distil.architecture import architecture_from_config
from distil.atomic import blocking_file, foreign_files, publish_dir, staging_dir, write_text
from distil.model_check import MODEL_FILE, check_model_dir
from distil.plan import parameter_counts

log = logging.getLogger(__name__)

# config.json fields that must agree for two models' tensors to mean the same thing
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHARD_PARAMS = 1_000_000_000  # parameters per output shard mergekit holds before writing it (its default is 5B)
RECIPE_FILES = ("merge.yaml", "mergekit_config.yml", "README.md")  # what a merged folder holds besides a model


class MergeError(ValueError):
    """Students that cannot be merged, or a merge section that names none; the message says what to change."""


def inputs(m: MergeConfig, student_base: str) -> tuple[list[dict], str | None]:
    """The students with their weight and density filled in, and the base (None for linear)."""
    if len(m.models) < 2:
        raise MergeError(f"merge.models names {len(m.models)} model(s); a merge needs at least two, e.g. "
                         "merge.models=[{path: runs/a/hf}, {path: runs/b/hf}]")
    students = [{"path": s["path"], "weight": float(s.get("weight", 1.0)), "density": float(s.get("density", m.density))}
                for s in m.models]
    return students, (None if m.method == "linear" else (m.base or student_base))


def shape(path: str | Path) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    return {k: config.get(k) for k in SHAPE_KEYS}


def tokenizer_identity(path: str | Path) -> str:
    """What decides token ids: the vocabulary with its special tokens (not how the files are spelled)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tok.all_special_tokens]).encode()).hexdigest()[:16]


def check_mergeable(paths: list[str], keys: list[str] | None = None) -> None:
    """MergeError (ModelInputError for a folder that is no model) unless every folder is a usable model of one
    architecture and one tokenizer; `keys` name where each path was set."""
    keys = keys or [f"merge.models[{i}].path" for i in range(len(paths))]
    for path, key in zip(paths, keys):
        check_model_dir(path, "model to merge", key)
    first = paths[0]
    for path in paths[1:]:
        a, b = shape(first), shape(path)
        if a != b:
            diff = {k: (a[k], b[k]) for k in SHAPE_KEYS if a[k] != b[k]}
            raise MergeError(f"{path} is another architecture than {first}: {diff}; only models of one architecture "
                             "merge (students of the same base model)")
    identities = {path: tokenizer_identity(path) for path in paths}
    if len(set(identities.values())) > 1:
        groups = {}
        for path, ident in identities.items():
            groups.setdefault(ident, []).append(path)
        raise MergeError("the models have different tokenizers (token ids mean different words, so their embedding "
                         f"rows cannot be averaged): {list(groups.values())}; merge only students of one base model")


def mergekit_config(m: MergeConfig, students: list[dict], base: str | None) -> dict:
    """The mergekit YAML of this merge."""
    def params(s: dict) -> dict:
        return {"weight": s["weight"], **({"density": s["density"]} if m.method == "ties" else {})}

    config = {"merge_method": m.method, "dtype": m.dtype,
              "models": [{"model": s["path"], "parameters": params(s)} for s in students]}
    if base is not None:
        config["base_model"] = base
    if m.method in ("linear", "ties"):
        config["parameters"] = {"normalize": m.normalize}
    return config


def memory_need(path: str | Path, n_models: int, dtype: str) -> int:
    """Bytes of memory the merge owns at most: mergekit loads one tensor of every model at a time and holds
    the output shard until it is written, so the largest tensor (the embedding) of each input plus the
    result, and one shard. The inputs are memory-mapped: their pages are reclaimable file cache, not counted.
    Qwen2.5-7B, two students and a base, bfloat16: about 6.4 GB (docs/align.md has a measurement)."""
    a = architecture_from_config(json.loads((Path(path) / "config.json").read_text()), str(path))
    total, largest = parameter_counts(a)
    return DTYPE_BYTES[dtype] * ((n_models + 1) * largest + min(total, SHARD_PARAMS))


def check_output(output_dir: str) -> None:
    """The merged model replaces m.output_dir as a whole: refuse a folder that holds more than a model."""
    if blocker := blocking_file(output_dir):
        raise MergeError(f"merge.output_dir={output_dir}: {blocker} is a file; pass a folder for the merged model")
    foreign = foreign_files(output_dir, lambda name: bool(MODEL_FILE.match(name)) or name in RECIPE_FILES)
    if foreign:
        raise MergeError(f"merge.output_dir={output_dir} holds more than a model ({foreign[:4]}) and the merge "
                         "replaces the folder as a whole; pass a new folder, e.g. runs/merged")


def merge(m: MergeConfig, student_base: str) -> Path:
    """Merge per the `merge` section into m.output_dir (swapped in whole); returns that folder."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    students, base = inputs(m, student_base)
    paths = [s["path"] for s in students] + ([base] if base else [])
    check_output(m.output_dir)
    if m.output_dir in paths or any(Path(p).resolve() == Path(m.output_dir).resolve() for p in paths):
        raise MergeError(f"merge.output_dir={m.output_dir} is one of the models merged; pass a new folder")
    check_mergeable(paths, [f"merge.models[{i}].path" for i in range(len(students))] + (["merge.base"] if base else []))
    recipe = mergekit_config(m, students, base)
    need = memory_need(paths[0], len(paths), m.dtype)
    log.info("merge %s of %d models%s: needs about %.2f GB of memory", m.method, len(students),
             f" against {base}" if base else "", need / 1e9)
    staged = staging_dir(m.output_dir)
    run_merge(MergeConfiguration.model_validate(recipe), str(staged),
              MergeOptions(copy_tokenizer=True, lazy_unpickle=True, quiet=True, out_shard_size=SHARD_PARAMS))
    write_text(staged / "merge.yaml", yaml.safe_dump({"merge": {**m.__dict__, "models": students, "base": base}},
                                                     sort_keys=False))
    publish_dir(staged, m.output_dir)
    check_model_dir(m.output_dir, "merged model", "merge.output_dir")
    return Path(m.output_dir)
