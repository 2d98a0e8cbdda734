"""Per-report scores -> the paper's results table (Markdown), CSV, JSON, plots, speed and cost.

Table layout (the paper's results table): one row per language x model, columns BERTScore
P/R/F1 and ROUGE-1/2/L, as percentages (mean over reports); "all" pools every language. Each
mean has a 95% bootstrap interval (eval.bootstrap_samples, seed eval.seed: the same resampled
reports for every metric of a group). A second table, Faithfulness, holds what ROUGE misses
(eval/scoring.py FAITHFULNESS: unsupported_numbers, novel_terms, repeat4; lower is better) beside
the gold summaries' own rates (ref_*). scores.json and scores.csv keep every score as a fraction
in [0, 1], as the per-report rows do; the Markdown tables show points (x100).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from distil.atomic import write_bytes, write_text
from distil.plan import gpu_hours_per_1000_reports

from eval.metrics import bootstrap_ci
from eval.scoring import FAITHFULNESS, GOLD, METRICS

HEADERS = {"bertscore_p": "BERTScore P", "bertscore_r": "BERTScore R", "bertscore_f1": "BERTScore F1",
           "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "copy4": "copy4",
           "unsupported_numbers": "unsupported numbers", "novel_terms": "novel terms", "repeat4": "repeat4"}
COUNTS = ("pred_numbers", "pred_numbers_unsupported", "ref_numbers", "ref_numbers_unsupported")  # summed
PLOTTED = ("bertscore_p", "bertscore_r", "bertscore_f1", "rouge1", "rouge2", "rougeL")


def aggregate(scores: dict[str, list[dict]], samples: int, seed: int) -> list[dict]:
    """Rows {model, lang, n, <metric>, <metric>_lo, <metric>_hi, <count>} for each model x (language..., all):
    the mean and interval of METRICS, FAITHFULNESS and GOLD, the sum of COUNTS."""
    out = []
    for model, rows in scores.items():
        langs = sorted({r["lang"] for r in rows})
        for lang in langs + ["all"]:
            group = [r for r in rows if lang in ("all", r["lang"])]
            if not group:
                continue
            agg = {"model": model, "lang": lang, "n": len(group)}
            for m in (*METRICS, *FAITHFULNESS, *GOLD):
                values = [r[m] for r in group]
                lo, hi = bootstrap_ci(values, samples, seed)
                agg.update({m: sum(values) / len(values), f"{m}_lo": lo, f"{m}_hi": hi})
            agg.update({c: sum(r[c] for r in group) for c in COUNTS})
            out.append(agg)
    return out


def _lang_order(rows: list[dict]) -> list[str]:
    langs = sorted({r["lang"] for r in rows} - {"all"})
    return langs + (["all"] if any(r["lang"] == "all" for r in rows) else [])


def markdown_table(agg: list[dict], intervals: bool = True) -> str:
    """The results table (percent, 2 decimals), then (`intervals`) the 95% intervals of the same cells."""
    models = list(dict.fromkeys(r["model"] for r in agg))
    cells = {(r["lang"], r["model"]): r for r in agg}
    head = "| Language | Model | n | " + " | ".join(HEADERS[m] for m in METRICS) + " |"
    rule = "|---|---|---:|" + "---:|" * len(METRICS)
    main, ci = [head, rule], [head, rule]
    for lang in _lang_order(agg):
        for model in models:
            r = cells.get((lang, model))
            if r is None:
                continue
            prefix = f"| {lang.upper() if lang != 'all' else 'All'} | {model} | {r['n']} | "
            main.append(prefix + " | ".join(f"{100 * r[m]:.2f}" for m in METRICS) + " |")
            ci.append(prefix + " | ".join(f"{100 * r[m + '_lo']:.1f}–{100 * r[m + '_hi']:.1f}" for m in METRICS) + " |")
    if not intervals:
        return "\n".join(main) + "\n"
    return "\n".join(main) + "\n\n95% bootstrap confidence intervals:\n\n" + "\n".join(ci) + "\n"


def faithfulness_table(agg: list[dict]) -> str:
    """What ROUGE misses, per language x model: each FAITHFULNESS mean (points) with its 95% interval, the gold
    summaries' mean beside it, and how many numbers the summaries write (how many the reports lack)."""
    models = list(dict.fromkeys(r["model"] for r in agg))
    cells = {(r["lang"], r["model"]): r for r in agg}
    lines = ["| Language | Model | n | " + " | ".join(f"{HEADERS[m]} | gold" for m in FAITHFULNESS)
             + " | numbers (unsupported) | gold numbers (unsupported) |",
             "|---|---|---:|" + "---:|---:|" * len(FAITHFULNESS) + "---:|---:|"]
    for lang in _lang_order(agg):
        for model in models:
            r = cells.get((lang, model))
            if r is None:
                continue
            values = " | ".join(f"{100 * r[m]:.2f} ({100 * r[m + '_lo']:.1f}–{100 * r[m + '_hi']:.1f}) | "
                                f"{100 * r['ref_' + m]:.2f}" for m in FAITHFULNESS)
            lines.append(f"| {lang.upper() if lang != 'all' else 'All'} | {model} | {r['n']} | {values} | "
                         f"{r['pred_numbers']} ({r['pred_numbers_unsupported']}) | "
                         f"{r['ref_numbers']} ({r['ref_numbers_unsupported']}) |")
    return "\n".join(lines) + "\n"


FAITHFULNESS_LEGEND = (
    "Lower is better. A cell is the mean over reports of each summary's share, in points, with its 95% interval; "
    "'gold' is the same share for the gold summaries of those reports. unsupported numbers = share of a summary's numbers "
    "(doses, lab values, ages, dates) that its report never writes, compared by value (1,056,000 = 1 056 000; "
    "11,7 = 11.7); novel terms = share of its content words (3+ letters, no stop words) whose stem no word of the "
    "report has, a proxy for invented findings; repeat4 = share of its word 4-grams that repeat an earlier 4-gram "
    "of the same summary (loops). Definitions: distil/faithfulness.py, eval/metrics.py.\n")


def write_csv(rows: list[dict], path: str | Path) -> None:
    text = io.StringIO(newline="")
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, text.getvalue())


def save_figure(fig, path: str | Path) -> None:
    """Rendered in memory, then written whole (a kill never leaves half a PNG)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_bytes(path, png.getvalue())


def speed(scores: dict[str, list[dict]], teacher_label: str, gpu_hour_price: float, gpu_count: int,
          teacher_gpu_count: int) -> list[dict]:
    """Per model: tokens/s, seconds per report, reports/s, GPU-hours per 1,000 reports and cost per report; vs
    the teacher: how many times faster and cheaper.

    cost per report = seconds per report / 3600 * GPUs * price per GPU-hour.
    """
    out = []
    for model, rows in scores.items():
        timed = [r for r in rows if "seconds" in r]
        if not timed:
            continue
        seconds, tokens = sum(r["seconds"] for r in timed), sum(r["gen_tokens"] for r in timed)
        gpus = teacher_gpu_count if model == teacher_label else gpu_count
        per_report = seconds / len(timed)
        out.append({"model": model, "reports": len(timed), "tokens_per_s": tokens / seconds if seconds else 0.0,
                    "seconds_per_report": per_report, "reports_per_s": 1 / per_report if per_report else 0.0,
                    "gpus": gpus, "gpu_hours_per_1000_reports": gpu_hours_per_1000_reports(seconds, len(timed), gpus),
                    "cost_per_report": per_report / 3600 * gpus * gpu_hour_price})
    teacher = next((r for r in out if r["model"] == teacher_label), None)
    if teacher is not None:
        for r in out:
            if r is not teacher:
                r["times_faster_than_teacher"] = teacher["seconds_per_report"] / r["seconds_per_report"]
                r["times_cheaper_than_teacher"] = teacher["cost_per_report"] / r["cost_per_report"]
    return out


def hardware_of(cfg) -> str | None:
    """None on a GPU run (the table counts GPUs); on CPU its description, since GPU counts and a GPU-hour
    price mean nothing there."""
    import torch

    if torch.cuda.is_available() and cfg.device != "cpu":
        return None
    return f"CPU ({os.cpu_count()} cores)"


def speed_markdown(rows: list[dict], cpu: str | None = None) -> str:
    """The speed table; on CPU (`cpu` = its description) the hardware replaces GPUs and the cost is not priced."""
    compare = any("times_faster_than_teacher" in r for r in rows)
    head = f"| Model | {'hardware' if cpu else 'GPUs'} | tokens/s | s/report | GPU-hours/1k reports | cost/report |" + \
        (" × faster | × cheaper |" if compare else "")
    lines = [head, "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if compare else "")]
    for r in rows:
        cost = "— (CPU)" if cpu else f"{r['cost_per_report']:.6f}"
        hours = "—" if cpu or r.get("gpu_hours_per_1000_reports") is None else f"{r['gpu_hours_per_1000_reports']:.3f}"
        line = (f"| {r['model']} | {cpu or r['gpus']} | {r['tokens_per_s']:.1f} | {r['seconds_per_report']:.3f} "
                f"| {hours} | {cost} |")
        if compare:
            ratio = [r.get("times_faster_than_teacher"), r.get("times_cheaper_than_teacher")]
            line += "".join(f" {x:.1f} |" if x is not None else " — |" for x in ratio)
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_metrics(agg: list[dict], path: str | Path) -> None:
    """One panel per metric: bars per language, one colour per model, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in agg))
    langs = _lang_order(agg)
    cells = {(r["lang"], r["model"]): r for r in agg}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=False)
    width = 0.8 / len(models)
    x = np.arange(len(langs))
    for ax, m in zip(axes.flat, PLOTTED):
        for k, model in enumerate(models):
            rs = [cells.get((lang, model)) for lang in langs]
            mean = [100 * r[m] if r else np.nan for r in rs]
            err = [[100 * (r[m] - r[m + "_lo"]) if r else 0 for r in rs],
                   [100 * (r[m + "_hi"] - r[m]) if r else 0 for r in rs]]
            ax.bar(x + (k - (len(models) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=model)
        ax.set_title(HEADERS[m])
        ax.set_xticks(x, [lang.upper() if lang != "all" else "All" for lang in langs])
        ax.set_ylabel("score (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Scores per language (mean over reports, 95% bootstrap CI)", y=0.99)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=len(models),
               bbox_to_anchor=(0.5, 0.955), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    save_figure(fig, path)
    plt.close(fig)


def plot_lengths(scores: dict[str, list[dict]], path: str | Path) -> None:
    """Prediction vs reference length in words, one point per report, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    top = 1
    for model, rows in scores.items():
        ref, pred = [r["ref_words"] for r in rows], [r["pred_words"] for r in rows]
        ax.scatter(ref, pred, s=18, alpha=0.7, label=model)
        top = max([top, *ref, *pred])
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="same length")
    ax.set_xlabel("reference summary (words)")
    ax.set_ylabel("prediction (words)")
    ax.set_title("Length of predictions vs references")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def terminal_summary(saved: dict, cfg, results: str | Path) -> str:
    """What an evaluation prints, from its scores.json (`saved`): the means of the results table, the
    faithfulness table and, when a teacher is compared, the speed table; the intervals of the first, the
    definitions, plots and the showcase are in results.md."""
    agg = saved["scores"]
    text = (f"## Results ({cfg.split} split, ROUGE tokenizer: {cfg.rouge_tokenizer})\n\n"
            f"{markdown_table(agg, intervals=False)}\n## Faithfulness (lower is better; gold = the gold summaries)\n\n"
            f"{faithfulness_table(agg)}")
    if any("times_faster_than_teacher" in r for r in saved["speed"]):
        cpu = None if saved["hardware"] == "gpu" else saved["hardware"]
        text += f"\n## Speed and cost\n\n{speed_markdown(saved['speed'], cpu)}"
    return text + f"\nIntervals, definitions, speed and plots: {results}\n"


def write_report(out_dir: str | Path, scores: dict[str, list[dict]], counts: dict[str, dict], cfg) -> str:
    """Write results.md, scores.csv/json, per_report.csv, speed.* and plots/; returns the Markdown."""
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    agg = aggregate(scores, cfg.bootstrap_samples, cfg.seed)
    table = markdown_table(agg)
    fast = speed(scores, cfg.teacher_label, cfg.gpu_hour_price, cfg.gpu_count, cfg.teacher_gpu_count)
    write_csv(agg, out_dir / "scores.csv")
    write_csv([dict(r, model=m) for m, rows in scores.items() for r in rows], out_dir / "per_report.csv")
    write_text(out_dir / "scores.json", json.dumps(
        {"rouge_tokenizer": cfg.rouge_tokenizer, "bertscore_model": cfg.bertscore_model,
         "bertscore_rescale": cfg.bertscore_rescale, "bootstrap_samples": cfg.bootstrap_samples,
         "scale": "fractions in [0, 1] (results.md shows points, x100)", "lower_is_better": list(FAITHFULNESS),
         "counts": counts, "scores": agg, "speed": fast, "hardware": hardware_of(cfg) or "gpu"}, indent=1))
    markdown = f"## Results ({cfg.split} split, ROUGE tokenizer: {cfg.rouge_tokenizer})\n\n{table}"
    gold = [r["ref_copy4"] for rows in scores.values() for r in rows if "ref_copy4" in r]
    if gold:
        markdown += (f"\ncopy4 = share of a prediction's word 4-grams found verbatim in its report (lower = more "
                     f"abstractive); the gold summaries: {100 * sum(gold) / len(gold):.2f}.\n")
    markdown += f"\n## Faithfulness: what ROUGE does not see\n\n{faithfulness_table(agg)}\n{FAITHFULNESS_LEGEND}"
    if fast:
        cpu = hardware_of(cfg)
        title = f"on {cpu}" if cpu else f"GPU-hour price {cfg.gpu_hour_price}"
        markdown += f"\n## Speed and cost ({title})\n\n{speed_markdown(fast, cpu)}"
    write_text(out_dir / "results.md", markdown)
    plot_metrics(agg, out_dir / "plots" / "metrics_by_language.png")
    plot_lengths(scores, out_dir / "plots" / "length.png")
    return markdown
