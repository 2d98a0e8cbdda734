"""Preference pairs for DPO from the student's own samples: alignment aimed at what the evaluation measures.

For each report of align.splits, chosen = its gold summary (for an 'unlabelled' report: the teacher's ok
summary, Stage 1's teacher.summarize), rejected = the worst of the policy's align.samples_per_report
samples by the faithfulness metrics: most unsupported numbers, then most repeated 4-grams, then the
lowest ROUGE-L against the chosen summary. So DPO pushes the student away from its own inventions and
loops, not from text it would never write.

Pairs file (align.pairs_path): one JSON line per report {id, lang, split, chosen_from, status, chosen,
rejected, rejected_scores, samples}, a distil.ledger.Ledger keyed by id, appended and fsynced one batch at a
time; a rerun samples only the reports not yet there. status "ok", or "same" when every sample equals
the chosen summary (no pair to learn from; kept, so a rerun does not sample it again). `<file>.meta.json`
holds the policy's fingerprint and the sampling settings: a rerun with another policy or settings is
refused rather than mixing two in one file.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from distil.config import ExperimentConfig
from distil.data import DataError, load_teacher_summaries, read_prepared
from distil.faithfulness import unsupported_numbers
from distil.fingerprint import model_identity
from distil.ledger import Ledger
from distil.prompts import PROMPT_VERSION
from distil.teacher_config import annotation_key
from eval.generate import Decoding, check_meta, open_engine, prediction_id, prompt_ids
from eval.metrics import repeated_ngram_share, rouge

log = logging.getLogger(__name__)


def sample_scores(sample: str, report: str, lang: str, chosen: str, rouge_mode: str) -> dict:
    """What decides how bad a sample is (unsupported numbers as a count: one invented dose is one too many)."""
    return {"unsupported_numbers": unsupported_numbers(sample, report, lang).count,
            "repeat4": round(repeated_ngram_share(sample), 6),
            "rouge_l": round(rouge(sample, chosen, lang, rouge_mode)["rougeL"], 6)}


def badness(scores: dict) -> tuple:
    """Sort key, larger = worse: more unsupported numbers, then more repetition, then less like the chosen one."""
    return scores["unsupported_numbers"], scores["repeat4"], -scores["rouge_l"]


def worst(samples: list[str], scores: list[dict], chosen: str) -> int | None:
    """Index of the rejected sample: the worst one that differs from the chosen summary (the first on a tie);
    None when every sample is the chosen summary."""
    candidates = [i for i, s in enumerate(samples) if s.strip() != chosen.strip()]
    return max(candidates, key=lambda i: (badness(scores[i]), -i)) if candidates else None


def pair_record(record: dict, chosen: str, chosen_from: str, samples: list[str], rouge_mode: str) -> dict:
    scores = [sample_scores(s, record["report"], record["lang"], chosen, rouge_mode) for s in samples]
    i = worst(samples, scores, chosen)
    return {"id": record["id"], "lang": record["lang"], "split": record["split"], "chosen_from": chosen_from,
            "status": "ok" if i is not None else "same", "chosen": chosen,
            "rejected": samples[i] if i is not None else None, "rejected_scores": scores[i] if i is not None else None,
            "samples": scores}


def reports_with_chosen(cfg: ExperimentConfig) -> tuple[list[tuple[dict, str, str]], int]:
    """(record, chosen summary, where it came from) for every report of align.splits, and how many reports of
    'unlabelled' have no usable teacher summary (left out)."""
    out, missing = [], 0
    for split in cfg.align.splits:
        records = read_prepared(Path(cfg.data.prepared_dir) / f"{split}.jsonl")
        if split == "unlabelled":
            if not cfg.data.key_info_path:
                raise DataError("align.splits has 'unlabelled', whose chosen answer is the teacher's summary, but "
                                "data.key_info_path is null: set it to the Stage 1 ledger (run with "
                                "teacher.summarize=true)")
            summaries = load_teacher_summaries(cfg.data.key_info_path, annotation_key(cfg.teacher, "summarize"))
            found = [(r, summaries[r["id"]], "teacher") for r in records if r["id"] in summaries]
            missing += len(records) - len(found)
            out += found
        else:
            unlabelled = [r["id"] for r in records if not r.get("summary")]
            if unlabelled:
                raise DataError(f"{cfg.data.prepared_dir}/{split}.jsonl: {len(unlabelled)} report(s) without a gold "
                                f"summary (e.g. {unlabelled[:3]}); a labelled split is needed, or name it 'unlabelled'")
            out += [(r, r["summary"], "gold") for r in records]
    ids = [r["id"] for r, _, _ in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"align.splits={cfg.align.splits}: a report id occurs in two of them; name each split once")
    if not out:
        raise DataError(f"align.splits={cfg.align.splits}: no reports with a chosen summary in {cfg.data.prepared_dir}")
    return out, missing


def make_pairs(cfg: ExperimentConfig, policy: str, limit: int | None = None) -> dict:
    """Sample, score and write the pairs of every report not yet in align.pairs_path; counts (never any text)."""
    a, e = cfg.align, replace(cfg.eval, temperature=cfg.align.temperature)
    wanted, missing = reports_with_chosen(cfg)
    if missing:
        log.warning("%d report(s) of 'unlabelled' have no usable teacher summary: no pair for them", missing)
    out_path = Path(a.pairs_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_identity(policy), "samples_per_report": a.samples_per_report, "temperature": a.temperature,
            "seed": e.seed, "max_new_tokens": e.max_new_tokens, "max_model_len": e.max_model_len, "backend": e.backend,
            "prompt_version": PROMPT_VERSION, "rouge_tokenizer": e.rouge_tokenizer}
    check_meta(out_path, meta, "pairs", "align.pairs_path")
    with Ledger(out_path, key=prediction_id) as ledger:
        done = {row["id"] for row in ledger.records}
        todo = [w for w in wanted if w[0]["id"] not in done][:limit]
        stats = {"reports": len(wanted), "already_done": len(done), "sampled": 0, "same": 0, "truncated": 0}
        if not todo:
            return stats
        engine = open_engine(policy, e)
        try:
            budget = e.max_model_len - e.max_new_tokens
            for start in range(0, len(todo), e.batch_size):
                batch = todo[start:start + e.batch_size]
                prompts = [prompt_ids(engine.tokenizer, r, "summarize", budget) for r, _, _ in batch]
                samples = [[] for _ in batch]
                for k in range(a.samples_per_report):  # a seed per round (GPU; CPU: the engine's generator goes on): another sample
                    completions = engine.generate([p for p, _ in prompts],
                                                  Decoding(e.max_new_tokens, a.temperature, e.seed + k))
                    for mine, c in zip(samples, completions):
                        mine.append(engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip())
                rows = [pair_record(r, chosen, source, mine, e.rouge_tokenizer)
                        for (r, chosen, source), mine in zip(batch, samples)]
                ledger.append(rows)
                stats["sampled"] += len(rows)
                stats["same"] += sum(row["status"] == "same" for row in rows)
                stats["truncated"] += sum(cut for _, cut in prompts)
                log.info("%s: %d/%d reports sampled", out_path.name, len(done) + stats["sampled"], len(wanted))
        finally:
            engine.close()
    return stats
