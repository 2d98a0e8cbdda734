"""BERTScore P/R/F1 per report with bert-score, one model per language (eval.bertscore_model).

One `bert_score.BERTScorer` is loaded per model and reused across languages and rounds (the
training callback scores every N steps, so reloading would cost time and memory). Rescaling
is done here with bert-score's own baseline files, (x - b) / (1 - b), so that one loaded model
serves several languages and empty predictions (which bert-score 0.3.13 cannot encode under
transformers 5) get bert-score's rule: raw score 0, rescaled like any other.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from pathlib import Path

import torch

from distil.config import EvalConfig

log = logging.getLogger(__name__)


def resolve_model(name: str) -> str:
    """`pkg:<package>/<sub-folder>` -> the folder inside that installed package; anything else as is."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"eval.bertscore_model {name!r}: Python package {package!r} is not installed; "
                         f"pip install it or name a model folder")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not (folder / "config.json").is_file():
        raise ValueError(f"eval.bertscore_model {name!r}: no config.json in {folder}")
    return str(folder)


def num_layers_for(name: str, cfg: EvalConfig) -> int:
    """Layer from eval.bertscore_num_layers, else bert-score's table of tuned layers."""
    from bert_score.utils import model2layers

    if name in cfg.bertscore_num_layers:
        return cfg.bertscore_num_layers[name]
    if name in model2layers:
        return model2layers[name]
    raise ValueError(f"eval.bertscore_num_layers: bert-score has no layer for model {name!r}; "
                     f"add it, e.g. bertscore_num_layers: {{{name!r}: 6}} (the last layer of a 6-layer model)")


def read_baseline(path: str | Path, num_layers: int) -> tuple[float, float, float]:
    """(P, R, F) baseline of one layer from a bert-score TSV (header LAYER,P,R,F; row = layer)."""
    with open(path, newline="") as f:
        rows = {int(r["LAYER"]): r for r in csv.DictReader(f)}
    if num_layers not in rows:
        raise ValueError(f"{path}: no baseline for layer {num_layers} (layers {min(rows)}..{max(rows)})")
    r = rows[num_layers]
    return float(r["P"]), float(r["R"]), float(r["F"])


def rescale(value: float, baseline: float) -> float:
    """bert-score's baseline rescaling: 0 at the baseline, 1 at a perfect match."""
    return (value - baseline) / (1.0 - baseline)


def _device(cfg: EvalConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


class BertScore:
    """Scores (prediction, reference) pairs of one language with that language's configured model."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self._scorers: dict[str, object] = {}

    def _scorer(self, lang: str):
        if lang not in self.cfg.bertscore_model:
            raise ValueError(f"eval.bertscore_model has no model for language {lang!r}; "
                             f"configured: {sorted(self.cfg.bertscore_model)}")
        name = self.cfg.bertscore_model[lang]
        if name not in self._scorers:
            import bert_score

            self._scorers[name] = bert_score.BERTScorer(
                model_type=resolve_model(name), num_layers=num_layers_for(name, self.cfg),
                batch_size=self.cfg.bertscore_batch_size, device=_device(self.cfg))
            log.info("BERTScore model for %s: %s", lang, name)
        return name, self._scorers[name]

    def baseline(self, lang: str) -> tuple[float, float, float]:
        name = self.cfg.bertscore_model[lang]
        path = self.cfg.bertscore_baseline.get(lang)
        if path is None:
            import bert_score

            path = Path(bert_score.__file__).parent / "rescale_baseline" / lang / f"{name}.tsv"
            if not path.is_file():
                raise ValueError(f"eval.bertscore_rescale: bert-score ships no baseline for {name!r} in {lang!r}; "
                                 f"set eval.bertscore_baseline.{lang} to a TSV or eval.bertscore_rescale: false")
        return read_baseline(path, num_layers_for(name, self.cfg))

    def score(self, predictions: list[str], references: list[str], lang: str) -> list[dict[str, float]]:
        """[{bertscore_p, bertscore_r, bertscore_f1}] per pair; an empty prediction has raw scores 0."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        _, scorer = self._scorer(lang)
        raw = [(0.0, 0.0, 0.0)] * len(predictions)
        kept = [i for i, p in enumerate(predictions) if p.strip()]
        if kept:
            with torch.no_grad():
                p, r, f = scorer.score([predictions[i] for i in kept], [references[i] for i in kept])
            for j, i in enumerate(kept):
                raw[i] = (p[j].item(), r[j].item(), f[j].item())
        if self.cfg.bertscore_rescale:
            b = self.baseline(lang)
            raw = [tuple(rescale(v, bv) for v, bv in zip(triple, b)) for triple in raw]
        return [{"bertscore_p": p, "bertscore_r": r, "bertscore_f1": f} for p, r, f in raw]
