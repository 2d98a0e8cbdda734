"""Alignment after distil-tuning: DPO on the student's own worst samples (the MediPhi recipe's last step),
with TRL's DPOTrainer on DeepSpeed ZeRO.

`AlignTrainer` adds one thing to trl.DPOTrainer: tied weights stay tied in what it saves (KeepTiedWeights,
as for Stage 2). `align()` is the recipe: config -> the pairs of launch/make_pairs.py -> the policy and its
frozen reference -> DPOTrainer.train (resuming from the newest complete checkpoint in align.output_dir; a
finished run is refused) -> the aligned model at align.output_dir/hf. The optimizer, precision, DeepSpeed
config, schedule and checkpointing follow the train section; learning rate, epochs and batch the align one.
TRL logs the loss, rewards/chosen, rewards/rejected, rewards/margins and the policy's log-probabilities.

TRL 1.16's DPO has no padding-free mode (its padding_free warns and pads), so pairs are padded per
micro-batch: align.pairs_per_device bounds that padding. A report too long for train.max_length loses its
tail, never any of either answer, as in Stage 2.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from distil.align_config import policy_path
from distil.backend import choose_backend
from distil.config import ExperimentConfig, dump_config
from distil.data import DataError, read_prepared
from distil.fingerprint import model_identity
from distil.ledger import read_ledger
from distil.logs import verbose
from distil.preemption import SaveAndStopCallback
from distil.prompts import build_messages
from distil.tokenization import answer_ids, render_prompt, report_within
from distil.trainer import DTYPES, KeepTiedWeights, SaveConfigCallback, collective_timeout, export_model, \
    train_resumably

log = logging.getLogger(__name__)

PADDED = {"sdpa_varlen": "sdpa", "torch_varlen": "sdpa"}  # the packed-row kernels; DPO batches are padded


def dpo_rows(pairs: list[dict], reports: dict[str, dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """TRL's conversational preference rows {prompt, chosen, rejected} of the ok pairs, the report cut so
    that prompt + the longer answer fit `max_length` tokens; and how many pairs did not fit at all."""
    rows, too_long = [], 0
    empty_prompt = {lang: len(tokenizer(render_prompt(tokenizer, "summarize", lang, ""), add_special_tokens=False)
                              ["input_ids"]) for lang in {p["lang"] for p in pairs}}
    for pair in pairs:
        if pair["status"] != "ok":
            continue
        record = reports.get(pair["id"])
        if record is None:
            raise DataError(f"pair of report {pair['id']!r}: the report is in none of align.splits under "
                            "data.prepared_dir; make the pairs again from this data (delete align.pairs_path)")
        lang = record["lang"]
        longest = max(len(answer_ids(tokenizer, "summarize", lang, pair[k])) for k in ("chosen", "rejected"))
        budget = max_length - longest
        if budget <= empty_prompt[lang]:
            too_long += 1
            continue
        report, _ = report_within(tokenizer, "summarize", lang, record["report"], budget)
        rows.append({"prompt": build_messages("summarize", lang, report.strip()),
                     "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
                     "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}]})
    return rows, too_long


def load_pairs(cfg: ExperimentConfig, tokenizer) -> list[dict]:
    path = Path(cfg.align.pairs_path)
    if not path.is_file():
        raise DataError(f"align.pairs_path={path}: no pairs; make them first: python launch/make_pairs.py --config "
                        f"{cfg.source}")
    pairs = read_ledger(path)
    reports = {r["id"]: r for split in cfg.align.splits
               for r in read_prepared(Path(cfg.data.prepared_dir) / f"{split}.jsonl")}
    rows, too_long = dpo_rows(pairs, reports, tokenizer, cfg.train.max_length)
    same = sum(p["status"] == "same" for p in pairs)
    log.info("%d preference pairs from %s (%d reports where every sample was the chosen summary, %d whose answers "
             "alone exceed train.max_length=%d: left out)", len(rows), path, same, too_long, cfg.train.max_length)
    if not rows:
        raise DataError(f"align.pairs_path={path}: no usable pair ({len(pairs)} records, {same} without a rejected "
                        f"sample, {too_long} too long for train.max_length); sample more (align.samples_per_report, "
                        "align.temperature) or raise train.max_length")
    return rows


def dpo_arguments(cfg: ExperimentConfig, on_cpu: bool):
    from trl import DPOConfig

    t, a = cfg.train, cfg.align
    return DPOConfig(
        output_dir=a.output_dir, deepspeed=t.deepspeed, use_cpu=on_cpu,
        per_device_train_batch_size=a.pairs_per_device, gradient_accumulation_steps=a.gradient_accumulation_steps,
        learning_rate=a.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, num_train_epochs=a.num_epochs,
        max_steps=a.max_steps, bf16=t.precision == "bf16", fp16=t.precision == "fp16", seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=t.report_to,
        gradient_checkpointing=cfg.model.gradient_checkpointing,  # TRL's default is on; the model section decides
        dataloader_num_workers=t.dataloader_workers, ddp_backend="gloo" if on_cpu else None,
        ddp_timeout=t.collective_timeout_s, log_on_each_node=False,
        beta=a.beta, loss_type=[a.loss_type], max_length=t.max_length,
    )


def align(cfg: ExperimentConfig) -> Path | None:
    """DPO under the DeepSpeed launcher; returns the aligned model folder (rank 0) or None."""
    import datasets
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    class AlignTrainer(KeepTiedWeights, DPOTrainer):
        """DPOTrainer whose checkpoints and export keep tied weights tied."""

    a = cfg.align
    policy = policy_path(a, cfg.train.output_dir)
    reference = a.reference or policy
    backend = choose_backend(cfg.model.attn_implementation, precision=cfg.train.precision)
    attention = PADDED.get(backend.attn_implementation, backend.attn_implementation)
    timeout = collective_timeout(cfg.train.collective_timeout_s)
    deepspeed.init_distributed(dist_backend=backend.dist_backend, timeout=timeout)  # before the models (ZeRO-3)
    args = dpo_arguments(cfg, backend.on_cpu)
    if backend.on_cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(policy)
    rows = load_pairs(cfg, tokenizer)

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.train.precision],
                                                    attn_implementation=attention)

    if not verbose():  # TRL tokenizes the pairs with datasets.map: its bars are noise in the job's log
        datasets.disable_progress_bars()
    config_text = dump_config(cfg)
    preemption = SaveAndStopCallback.from_env()  # SLURM's pre-termination signal (slurm/align.sbatch)
    trainer = AlignTrainer(model=load(policy), ref_model=load(reference), args=args,
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                           callbacks=[SaveConfigCallback(config_text), preemption])
    run = replace(cfg.train, output_dir=a.output_dir, num_epochs=a.num_epochs, max_steps=a.max_steps, export=True)
    started = {"model": policy, "identity": model_identity(policy)}
    log.info("DPO of %s against %s: beta %g, loss %s, %d pairs, attention %s", policy,
             "itself as it starts" if reference == policy else reference, a.beta, a.loss_type, len(rows), attention)
    if not train_resumably(trainer, run, started, config_text, preemption, "align", "align.policy"):
        return None
    return export_model(trainer, Path(a.output_dir) / "hf", "aligned student", "align.output_dir")
