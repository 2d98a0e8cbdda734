"""Stage 2: distil-tuning a student with the Hugging Face Trainer on DeepSpeed ZeRO.

`DistilTrainer` adds one thing to `transformers.Trainer`: the distil-tuning loss
L = gamma * L_sum + (1 - gamma) * L_ext (+ w * L_teacher on teacher summaries) over assistant tokens,
in one forward pass over packed rows, normalized per kind by the token counts of the whole optimizer
step (distil/loss.py), with the teacher's top-k
distributions as an optional per-token term (loss.kd_alpha, distil/kd_loss.py; plus a `_save` that
keeps tied weights tied). `train()` is the recipe: config -> backend -> model, data -> Trainer.train
(resuming when it can; a finished run is refused) -> export. The caller adds its own callbacks
(launch/train.py: the generation eval of eval/callback.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from distil.atomic import publish_dir, write_json, write_text
from distil.backend import choose_backend
from distil.checkpoints import (STUDENT_FILE, FinishedRunError, finished_run_message, latest_complete_checkpoint,
                                other_student_message, without_tied_copies)
from distil.config import ExperimentConfig, dump_config, teachers
from distil.dataset import load_train_rows
from distil.fingerprint import model_identity
from distil.kd_loss import KDTerm
from distil.loss import (KINDS, STUDENT_EXTRACT, STUDENT_SUMMARY, chunked, chunked_cross_entropy, is_onpolicy,
                         kind_weights, step_loss, task_token_counts)
from distil.model_check import check_model_dir
from distil.packing import attention_inputs, collate_packed
from distil.preemption import SaveAndStopCallback
from distil.tokenization import IGNORE

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def packed_loss(model, batch: dict, weights: list[float], step_counts: torch.Tensor, chunk_tokens: int,
                kd: KDTerm | None = None, world_size: int = 1):
    """One forward over a packed micro-batch -> (its share of the step loss, parts [6], outputs);
    `weights` per kind of example (distil.loss.kind_weights).

    Only positions that carry a label go through lm_head (`logits_to_keep`), so the logits are
    [labelled tokens, vocab], never [all tokens, vocab]; lm_head runs inside the model's own forward,
    which keeps ZeRO-3's parameter gathering intact. The example boundaries go in as the collator made
    them (position_ids, cu_seq_lens_q/k, max_length_q/k), so no attention layer derives them again.
    The fp32 work on the logits (cross-entropy, KD) goes a chunk of positions at a time; the loss
    itself is distil.loss.step_loss.
    """
    targets, tasks = batch["target_ids"][0], batch["task_ids"][0]
    labelled = (targets != IGNORE).nonzero().squeeze(1)
    outputs = model(input_ids=batch["input_ids"], **attention_inputs(batch), logits_to_keep=labelled, use_cache=False)
    logits = outputs.logits[0]
    token_ce = chunked_cross_entropy(logits, targets[labelled], chunk_tokens)
    kd_per_token = None
    if kd is not None and "teacher_ids" in batch:
        divergence = chunked(kd.divergence, chunk_tokens, logits, batch["teacher_ids"][0],
                             batch["teacher_log_probs"][0], is_onpolicy(tasks[labelled]))
        kd_per_token = divergence * batch["teacher_mask"][0].to(divergence.dtype)
    token_weights = batch["token_weights"][0][labelled] if "token_weights" in batch else None
    loss, parts = step_loss(token_ce, kd_per_token, tasks[labelled], weights, kd.alpha if kd else 0.0, step_counts,
                            world_size, token_weights)
    return loss + 0.0 * logits.sum(), parts, outputs  # 0*sum keeps the graph when nothing is labelled


class KeepTiedWeights:
    """Trainer mixin: tied weights stay tied in what it saves (under ZeRO 0-2 lm_head.weight arrives as a copy)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict:
            state_dict = without_tied_copies(state_dict, self.accelerator.unwrap_model(self.model))
        super()._save(output_dir, state_dict=state_dict)


class DistilTrainer(KeepTiedWeights, Trainer):
    """Trainer whose loss is the distil-tuning loss; everything else is the stock Trainer."""

    # compute_loss already divides by the step's token counts, so no further 1/GAS scaling.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, gamma: float, lm_head_chunk_tokens: int, kd: KDTerm | None = None,
                 trace_dir: Path | None = None, teacher_summary_weight: float = 0.0, onpolicy_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = kind_weights(gamma, teacher_summary_weight, onpolicy_weight)
        self.lm_head_chunk_tokens = lm_head_chunk_tokens
        self.kd = kd
        self.trace_dir = trace_dir
        self._since_log = self._fresh_log()

    @staticmethod
    def _fresh_log() -> dict:
        # sums: CE per kind, KD per kind; counts: labelled tokens per kind, tokens with the teacher's top-k
        return {"sums": torch.zeros(2 * KINDS, dtype=torch.float64), "count": torch.zeros(KINDS + 1, dtype=torch.float64),
                "tokens": 0, "time": time.perf_counter()}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Collect the step's micro-batches and count its labelled tokens per task over all ranks."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        counts = torch.zeros(KINDS, dtype=torch.float64)
        for batch in batches:
            counts += task_token_counts(batch["target_ids"], batch["task_ids"], batch.get("token_weights")).cpu()
        counts = counts.to(device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batches, counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step_counts = num_items_in_batch
        if step_counts is None:  # outside the training loop (e.g. evaluate): this micro-batch alone
            step_counts = task_token_counts(inputs["target_ids"], inputs["task_ids"], inputs.get("token_weights"))
        loss, sums, outputs = packed_loss(model, inputs, self.weights, step_counts, self.lm_head_chunk_tokens, self.kd,
                                          world_size=self.accelerator.num_processes)
        if model.training:
            self._record(inputs, sums)
        return (loss, outputs) if return_outputs else loss

    def _record(self, inputs, sums) -> None:
        counts = task_token_counts(inputs["target_ids"], inputs["task_ids"], inputs.get("token_weights")).double().cpu()
        kd_tokens = inputs["teacher_mask"].sum().double().cpu().view(1) if "teacher_mask" in inputs else torch.zeros(1)
        self._since_log["sums"] += sums.double().cpu()
        self._since_log["count"] += torch.cat([counts, kd_tokens.double()])
        self._since_log["tokens"] += inputs["input_ids"].numel()
        if self.trace_dir is not None:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            with open(self.trace_dir / f"rank{self.args.process_index}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.global_step, "host": socket.gethostname(),
                                    "examples": inputs["example_ids"]}) + "\n")

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add L_sum, L_ext, L_teacher (loss_teacher_sum), the KD divergence per token (loss_kd; kd_onpolicy: on the
        student's own samples) and tokens/s (all ranks) to each log line."""
        if "loss" in logs:
            acc = self._since_log
            totals = torch.cat([acc["sums"], acc["count"], torch.tensor([float(acc["tokens"])], dtype=torch.float64)])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
            sums, count, tokens = totals[:2 * KINDS], totals[2 * KINDS:3 * KINDS + 1], totals[-1].item()
            for kind, name in enumerate(("loss_sum", "loss_ext", "loss_teacher_sum")):
                if count[kind] > 0:
                    logs[name] = round((sums[kind] / count[kind]).item(), 6)
            if count[KINDS] > 0:
                logs["loss_kd"] = round((sums[KINDS:].sum() / count[KINDS]).item(), 6)
            own = count[STUDENT_SUMMARY] + count[STUDENT_EXTRACT]
            if own > 0:
                logs["kd_onpolicy"] = round(((sums[KINDS + STUDENT_SUMMARY] + sums[KINDS + STUDENT_EXTRACT]) / own).item(), 6)
            elapsed = time.perf_counter() - acc["time"]
            logs["tokens_per_s"] = round(tokens / max(elapsed, 1e-9), 1)
            self._since_log = self._fresh_log()
        super().log(logs, *args, **kwargs)


class SaveConfigCallback(TrainerCallback):
    """Store the resolved experiment config in every checkpoint, so a checkpoint explains itself."""

    def __init__(self, config_text: str):
        self.config_text = config_text

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / "experiment.yaml").write_text(self.config_text)


class ParamFingerprintCallback(TrainerCallback):
    """At the end, each rank writes sum and sum of squares of every parameter (ZeRO-3: gathered),
    so a test can check that all ranks hold the same model. On with train.trace_data."""

    def __init__(self, trace_dir: Path):
        self.trace_dir = trace_dir

    def on_train_end(self, args, state, control, model=None, **kwargs):
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            prints = {name: [p.double().sum().item(), p.double().square().sum().item()]
                      for name, p in model.named_parameters()}
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        (self.trace_dir / f"params_rank{args.process_index}.json").write_text(json.dumps(prints))


def collective_timeout(seconds: int) -> timedelta:
    """Make every process group of this run give up on a silent peer after `seconds`. DeepSpeed passes its
    timeout to the world group only; the ZeRO data-parallel groups come from torch's new_group(), which
    falls back to torch's module-level default (30 min for gloo) and has no setting for it, so set it."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def training_arguments(cfg: ExperimentConfig, on_cpu: bool) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=t.output_dir, deepspeed=t.deepspeed, use_cpu=on_cpu,
        per_device_train_batch_size=t.micro_batch_rows, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a share of the steps (warmup_ratio is gone)
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, num_train_epochs=t.num_epochs,
        max_steps=t.max_steps, bf16=t.precision == "bf16", fp16=t.precision == "fp16", seed=t.seed,
        data_seed=t.seed, logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=t.report_to,
        gradient_checkpointing=cfg.model.gradient_checkpointing, remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers, ddp_backend="gloo" if on_cpu else None,
        ddp_timeout=t.collective_timeout_s,
        log_on_each_node=False,  # logs, progress and reports from global rank 0 only, not each node's first rank
    )


def train(cfg: ExperimentConfig, callbacks: list[TrainerCallback] = ()) -> Path | None:
    """Run Stage 2 under the DeepSpeed launcher; returns the exported model folder (rank 0) or None.

    Raises FinishedRunError when train.output_dir holds a run that already reached the planned steps
    and was exported (nothing to train, nothing to export).
    """
    import deepspeed

    backend = choose_backend(cfg.model.attn_implementation, precision=cfg.train.precision)
    timeout = collective_timeout(cfg.train.collective_timeout_s)
    deepspeed.init_distributed(dist_backend=backend.dist_backend, timeout=timeout)  # before from_pretrained (ZeRO-3)
    args = training_arguments(cfg, backend.on_cpu)
    if backend.on_cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    onpolicy = cfg.onpolicy.round >= 0  # a round of launch/onpolicy.py: the student's samples come too
    kd = KDTerm(cfg.loss.kd_alpha, cfg.loss.kd_beta, cfg.loss.kd_temperature,
                cfg.onpolicy.beta if onpolicy else None) if cfg.loss.kd_alpha > 0 or onpolicy else None
    rows, _ = load_train_rows(tokenizer, cfg.data.prepared_dir, cfg.data.key_info_path, cfg.loss.gamma,
                              cfg.train.max_length, cfg.train.pack_length, kd=cfg.loss.kd_alpha > 0,
                              student=cfg.model.name_or_path, teachers=teachers(cfg), text_rule=cfg.combine.text,
                              teacher_summary_weight=cfg.loss.teacher_summary_weight,
                              onpolicy=cfg if onpolicy else None)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, dtype=DTYPES[cfg.train.precision], attn_implementation=backend.attn_implementation)
    config_text = dump_config(cfg)
    trace_dir = Path(cfg.train.output_dir) / "data_trace" if cfg.train.trace_data else None
    preemption = SaveAndStopCallback.from_env()  # SLURM's pre-termination signal (slurm/stage2.sbatch)
    fingerprint = [ParamFingerprintCallback(trace_dir)] if trace_dir else []
    own = [SaveConfigCallback(config_text), *fingerprint, preemption]
    trainer = DistilTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collate_packed, processing_class=tokenizer,
        callbacks=own + list(callbacks), gamma=cfg.loss.gamma, lm_head_chunk_tokens=cfg.loss.lm_head_chunk_tokens,
        kd=kd, trace_dir=trace_dir, teacher_summary_weight=cfg.loss.teacher_summary_weight,
        onpolicy_weight=cfg.onpolicy.weight if onpolicy else 0.0,
    )
    student = {"model": cfg.model.name_or_path, "identity": model_identity(cfg.model.name_or_path)}
    if not train_resumably(trainer, cfg.train, student, config_text, preemption) or not cfg.train.export:
        return None
    started = time.perf_counter()
    hf = export_model(trainer, Path(cfg.train.output_dir) / "hf", "exported student", "train.output_dir")
    if hf is not None:  # what the export cost (on-policy rounds report it, distil/onpolicy.py)
        write_json(Path(cfg.train.output_dir) / "export.json", {"seconds": round(time.perf_counter() - started, 3)})
    return hf


def train_resumably(trainer: Trainer, run, started: dict, config_text: str, preemption: SaveAndStopCallback,
                    section: str = "train", model_key: str = "model.name_or_path") -> bool:
    """Train, resuming from the newest complete checkpoint in run.output_dir (`run` has the train section's
    output_dir, resume, num_epochs, max_steps, export); refuse a finished run or another model's checkpoints
    (`started`: {model, identity} of the model this run starts from; `section`, `model_key` name the keys in
    the errors). False when it stopped early on request (SLURM's time limit): the next run resumes."""
    args = trainer.args
    resume = latest_complete_checkpoint(run.output_dir) if run.resume == "auto" else None
    if resume:
        other = other_student_message(run.output_dir, started["identity"], started["model"], section, model_key)
        if other:
            raise FinishedRunError(other)
        planned_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
        finished = finished_run_message(resume, planned_steps, run, section)
        if finished:
            raise FinishedRunError(finished)
        log.info("resuming from %s (%d optimizer steps planned)", resume, planned_steps)
    if args.process_index == 0:
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(run.output_dir) / "experiment.yaml", config_text)
        write_json(Path(run.output_dir) / STUDENT_FILE, started)
        log.info("resolved config: %s", Path(run.output_dir) / "experiment.yaml")
        log.debug("resolved config:\n%s", config_text)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_state()
    if preemption.stopped:
        log.warning("stopped early on request (%s): the next run resumes from the checkpoint just saved",
                    preemption.stop_file)
        return False
    return True


def export_model(trainer: Trainer, hf_dir: Path, role: str, key: str) -> Path | None:
    """The trained model, consolidated, swapped in at `hf_dir` whole and checked like any model input before
    it is announced; returns it on rank 0 (None on the others). Collective: every rank calls it."""
    staged = hf_dir.with_name(f".{hf_dir.name}.new")  # one name on every rank: save_model is collective under ZeRO-3
    if trainer.args.process_index == 0:
        shutil.rmtree(staged, ignore_errors=True)  # a killed export's leftovers
    trainer.save_model(str(staged))  # consolidated: ZeRO-3 gathers the weights (see ds_configs/zero3.json)
    if trainer.args.process_index == 0:
        publish_dir(staged, hf_dir)
        check_model_dir(hf_dir, role, key)
    return hf_dir if trainer.args.process_index == 0 else None
