"""Evaluation during training: every eval.callback_steps steps, summarize a few reports with the
current weights (real greedy generation, not the argmax of teacher-forced logits) and log
ROUGE-1/2/L, BERTScore, copy4 and what ROUGE misses: unsupported_numbers, novel_terms and repeat4
(eval/scoring.py FAITHFULNESS; lower is better), all as fractions in [0, 1] with the prefix gen_.

Only the main process generates; the other ranks go on to the next step and wait for it in the
gradient all-reduce, so keep eval.callback_subset small. The weights must be whole on rank 0:
ZeRO stage 0-2 (ZeRO-3 shards them; the callback refuses it at train start; evaluate the
exported model with launch/evaluate.py instead). Results go to the trainer's log history
(trainer_state.json in every checkpoint), to <train.output_dir>/generation_eval.jsonl and to
the log as numbers only. Memory stays flat across rounds: prompts are encoded once, the
BERTScore model is loaded once, generation runs under no_grad (bench/eval_memory.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from distil.backend import PACKED_ROWS_ONLY
from distil.config import ExperimentConfig
from distil.data import DataError, read_prepared
from eval.bertscore import BertScore
from eval.generate import Decoding, HfEngine, prompt_ids
from eval.scoring import FAITHFULNESS, METRICS, score_predictions

log = logging.getLogger(__name__)


class GenerationEvalCallback(TrainerCallback):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg.eval
        path = Path(cfg.data.prepared_dir) / f"{cfg.eval.callback_split}.jsonl"
        self.records = read_prepared(path)[: cfg.eval.callback_subset]
        if not self.records:
            raise DataError(f"{path} is empty: eval.callback_steps needs reports to summarize; "
                            "set eval.callback_split to a split that has some")
        self.bertscore = BertScore(cfg.eval)
        self.out_path = Path(cfg.train.output_dir) / "generation_eval.jsonl"
        self._prompts: list[list[int]] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("eval.callback_steps > 0 needs the whole weights on rank 0 (DeepSpeed ZeRO stage <= 2); "
                             "with ZeRO-3 set eval.callback_steps=0 and run launch/evaluate.py on the exported model")

    def evaluate_now(self, model, tokenizer) -> dict[str, float]:
        """Generate for the subset with `model` as it is now and return the mean of each metric."""
        if self._prompts is None:
            budget = model.config.max_position_embeddings - self.cfg.callback_max_new_tokens
            budget = min(budget, self.cfg.max_model_len - self.cfg.callback_max_new_tokens)
            self._prompts = [prompt_ids(tokenizer, r, "summarize", budget)[0] for r in self.records]
        was_training, attention = model.training, model.config._attn_implementation
        model.eval()
        if attention in PACKED_ROWS_ONLY:  # packed training rows only; generation batches and caches need sdpa
            model.set_attn_implementation("sdpa")
        try:
            engine = HfEngine(model, tokenizer)
            predictions = {}
            for start in range(0, len(self.records), self.cfg.batch_size):
                batch = self.records[start:start + self.cfg.batch_size]
                decoding = Decoding(self.cfg.callback_max_new_tokens, 0.0, self.cfg.seed, self.cfg.repetition_penalty,
                                    self.cfg.frequency_penalty)
                completions = engine.generate(self._prompts[start:start + len(batch)], decoding)
                for record, c in zip(batch, completions):
                    text = tokenizer.decode(c.token_ids, skip_special_tokens=True).strip()
                    predictions[record["id"]] = {"id": record["id"], "lang": record["lang"], "prediction": text}
        finally:
            model.train(was_training)
            if attention in PACKED_ROWS_ONLY:
                model.set_attn_implementation(attention)
        rows, counts = score_predictions(self.records, predictions, self.cfg.rouge_tokenizer, self.bertscore)
        metrics = {f"gen_{m}": round(sum(r[m] for r in rows) / len(rows), 6) for m in (*METRICS, *FAITHFULNESS)}
        metrics["gen_empty"] = counts["empty"]
        return metrics

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        steps = self.cfg.callback_steps
        if steps <= 0 or state.global_step % steps != 0 or not state.is_world_process_zero:
            return
        metrics = self.evaluate_now(model, processing_class)
        entry = {"step": state.global_step, **metrics}
        state.log_history.append(entry)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("generation eval at step %d on %d reports: %s", state.global_step, len(self.records), metrics)
