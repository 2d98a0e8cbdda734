"""Evaluation: summarize the held-out reports with each model, score per language, print the table.

    python launch/evaluate.py --config launch/configs/paper_qwen25_05b.yaml \
        --models base=Qwen/Qwen2.5-0.5B-Instruct standard=runs/std/hf distil=runs/distil/hf
    python launch/evaluate.py --config launch/configs/tiny_cpu.yaml \
        --models base=runs/tiny/student-init student=runs/tiny/student/hf

Writes eval.output_dir (predictions, scores, results.md, plots). A rerun resumes: reports that
already have a prediction are not generated again. Label a model `teacher` (eval.teacher_label)
to get the student vs teacher speed and cost comparison. Saved predictions belong to the model a
folder holds (a fingerprint of its files, distil/fingerprint.py), not to its path's spelling: a
folder retrained in place is refused until its old predictions are deleted.
Exit status 0 = every model scored and results.md written, 2 = bad input (config, data, a model
folder that distil/model_check.py refuses, predictions of another model), with nothing written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from distil.atomic import blocking_file
from distil.backend import scoped_environ
from distil.config import ConfigError, load_config
from distil.data import DataError
from distil.logs import engine_log_env, route_libraries, setup
from distil.model_check import check_model_dir


LABEL = re.compile(r"^[A-Za-z0-9_-]+$")


def split_models(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """--models LABEL=PATH items -> {label: path}; items whose key has a dot are config overrides
    (section.key=value) that followed --models on the command line."""
    models, overrides = {}, []
    for item in items:
        label, sep, path = item.partition("=")
        if sep and "." in label:
            overrides.append(item)
            continue
        if not sep or not LABEL.match(label) or not path:
            raise ValueError(f"--models {item!r}: expected LABEL=PATH with a label of letters, digits, - or _, "
                             "e.g. distil=runs/distil/hf")
        if label in models:
            raise ValueError(f"--models: label {label!r} given twice")
        models[label] = path
    return models, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--models", nargs="+", required=True, metavar="LABEL=PATH",
                        help="models to evaluate: a Hugging Face folder or hub name per label")
    parser.add_argument("--verbose", action="store_true", help="print the engines' logs too (vLLM)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.backend=hf")
    args = parser.parse_args(argv)
    try:
        models, late_overrides = split_models(args.models)
        cfg = load_config(args.config, list(args.overrides) + late_overrides)
        if blocker := blocking_file(cfg.eval.output_dir):
            raise ConfigError(f"{cfg.source}: eval.output_dir={cfg.eval.output_dir}: {blocker} "
                              "is a file; pass a folder")
        for label, path in models.items():  # all of them before the first engine starts
            check_model_dir(path, f"model {label}", f"--models {label}")
        log_file = setup(Path(cfg.eval.output_dir) / "evaluate.log", args.verbose)  # nothing written before
        from eval.evaluate import evaluate

        route_libraries()
        with scoped_environ(engine_log_env(log_file)):
            markdown = evaluate(cfg, models)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
