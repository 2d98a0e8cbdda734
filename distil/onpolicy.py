"""On-policy distillation in rounds: the student writes, the teacher grades every token, the student learns.

Offline distillation trains on the teacher's text; at inference the student conditions on its own tokens,
which it never trained on, and its errors compound. Here (GKD, Agarwal et al. 2024) each round r, in its
folder onpolicy.output_dir/round-NNN/:

  1. sample  the current student (round 0: model.name_or_path, then round r-1's export) answers its share of
             the reports of onpolicy.splits (round_share) to each prompt of onpolicy.tasks, with vLLM at
             onpolicy.temperature -> samples.jsonl: {id, task, lang, input_ids = prompt + the sampled answer,
             prompt_tokens, finish_reason, truncated}, a distil.ledger.Ledger keyed by task and id.
  2. score   the teacher (Stage 1's pool: vLLM replicas on Ray, kept up across rounds) scores exactly those
             token sequences by prefill: its top-k (teacher.topk_logprobs) at every sampled token -> topk/, a
             store like Stage 1's (distil/teacher_topk.py), its index a ledger keyed by report.
  3. train   launch/train.py under DeepSpeed with onpolicy.round=r: the round's share of the supervised
             examples (distil/dataset.py) plus the samples as two more kinds (student_summary,
             student_extract), KD only with onpolicy.beta, weighted by onpolicy.weight (distil/loss.py)
             -> train/hf, the next round's student. round.json keeps each phase's seconds.

Every step writes a ledger or checkpoints, so a kill anywhere resumes where it stopped: no report is sampled
or scored twice, none is lost, and the round trains on exactly its samples. The last round's export is
published at onpolicy.output_dir/hf.

Here: what every step agrees on (the shares, the folders, the samples as training examples). The steps
themselves: eval/samples.py (1), teacher_serving/score_samples.py (2), launch/onpolicy.py (the rounds, 3).
"""

from __future__ import annotations

import random
from pathlib import Path

from distil.config import ExperimentConfig
from distil.data import DataError, read_prepared
from distil.ledger import read_ledger
from distil.loss import kind_weights
from distil.prompts import STUDENT_KIND, TASK_IDS
from distil.teacher_topk import TopkStore, TopkStoreError, token_count
from distil.tokenization import IGNORE

SAMPLES, STORE, TRAIN, ROUND = "samples.jsonl", "topk", "train", "round.json"


def round_share(n: int, rounds: int, r: int, seed: int) -> list[int]:
    """Indices (of n items) that round r of `rounds` takes: a seeded shuffle cut into `rounds` near-equal
    contiguous shares, so the rounds together take every item once."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[r * n // rounds:(r + 1) * n // rounds])


def supervised_share(n: int, rounds: int, r: int, seed: int, weight: float) -> list[int]:
    """Round r's share of the n supervised examples; none at weight 1, where they weigh 0 (the samples alone)."""
    return [] if weight >= 1.0 else round_share(n, rounds, r, seed)


def add_up(before: dict | None, now: dict) -> dict:
    """A phase's counts over the runs a kill split a round into: each run counts only what it did itself (a
    resumed run finds the answers sampled), so the round's counts are the sums; `samples` (the share) is the round's."""
    if not before:
        return now
    return {k: v if k == "samples" or not isinstance(v, (int, float)) else round(before.get(k, 0) + v, 3)
            for k, v in now.items()}


def round_dir(output_dir: str | Path, r: int) -> Path:
    return Path(output_dir) / f"round-{r:03d}"


def sampled_tasks(cfg: ExperimentConfig) -> list[str]:
    """The prompts the student answers: onpolicy.tasks less those whose kind weighs 0 (extract at gamma 1)."""
    weights = kind_weights(cfg.loss.gamma, 0.0, 1.0)
    return [t for t in cfg.onpolicy.tasks if weights[TASK_IDS[STUDENT_KIND[t]]] > 0]


def round_reports(cfg: ExperimentConfig, r: int) -> list[dict]:
    """The reports round r samples: its share of onpolicy.splits, read in split order."""
    records = []
    for split in cfg.onpolicy.splits:
        records += read_prepared(Path(cfg.data.prepared_dir) / f"{split}.jsonl")
    if not records:
        raise DataError(f"onpolicy.splits={cfg.onpolicy.splits}: no reports in {cfg.data.prepared_dir}")
    return [records[i] for i in round_share(len(records), cfg.onpolicy.rounds, r, cfg.onpolicy.seed)]


def policy_of(cfg: ExperimentConfig, r: int) -> str:
    """The student that samples round r: model.name_or_path first, then the previous round's export."""
    return cfg.model.name_or_path if r == 0 else str(round_dir(cfg.onpolicy.output_dir, r - 1) / TRAIN / "hf")


def sample_key(row: dict) -> str:
    return f"{row['task']}:{row['id']}"


def answer_tokens(ids: list[int], finish_reason: str, end_of_turn: int, stop_ids: set[int]) -> list[int]:
    """The sampled answer as it is trained on: an answer that ended by itself ends with its stop token (the
    engine may leave it out), one cut at max_new_tokens has none."""
    ids = list(ids)
    if finish_reason == "stop" and (not ids or ids[-1] not in stop_ids):
        ids.append(end_of_turn)
    return ids


def end_of_turn_id(tokenizer, task: str = "summarize") -> int:
    """The token that closes an assistant turn in the tokenizer's chat template."""
    from distil.tokenization import answer_ids

    return answer_ids(tokenizer, task, "en", "x")[-1]


def student_examples(cfg: ExperimentConfig, tokenizer) -> tuple[list[dict], int]:
    """Step 3's on-policy examples of round onpolicy.round: each sample of samples.jsonl as it was sampled
    (labels over its answer), with the teacher's top-k of the round's store; and how many samples have
    none (their scoring failed: left out, counted)."""
    folder = round_dir(cfg.onpolicy.output_dir, cfg.onpolicy.round)
    samples = read_ledger(folder / SAMPLES)
    if not samples:
        raise DataError(f"{folder / SAMPLES}: no samples of round {cfg.onpolicy.round}; launch/onpolicy.py samples "
                        "and scores a round before it trains it (run that, not launch/train.py, for on-policy rounds)")
    store = TopkStore(folder / STORE, vocab_size=token_count(tokenizer))
    store.check_tokenizer(tokenizer, cfg.model.name_or_path)
    examples, missing = [], 0
    for row in samples:
        n = row["prompt_tokens"]
        example = {"id": row["id"], "task": STUDENT_KIND[row["task"]], "input_ids": row["input_ids"],
                   "labels": [IGNORE] * n + row["input_ids"][n:], "truncated": row["truncated"]}
        try:
            example["teacher_topk"] = store.lookup(example)
        except TopkStoreError as exc:
            raise DataError(f"{folder}: {exc}") from None
        if example["teacher_topk"] is None:
            missing += 1
            continue
        examples.append(example)
    return examples, missing


def publish_final(cfg: ExperimentConfig) -> Path:
    """The last round's export at onpolicy.output_dir/hf, swapped in whole: its files hard-linked (no second copy
    of a 7B model; copied where the filesystem cannot link); done again only when that export is newer."""
    import os
    import shutil

    from distil.atomic import publish_dir

    last = round_dir(cfg.onpolicy.output_dir, cfg.onpolicy.rounds - 1) / TRAIN / "hf"
    final = Path(cfg.onpolicy.output_dir) / "hf"
    if (final / "config.json").is_file() and (final / "config.json").stat().st_mtime >= (last / "config.json").stat().st_mtime:
        return final

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    staged = final.with_name(".hf.new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(last, staged, copy_function=link_or_copy)
    publish_dir(staged, final)
    return final
