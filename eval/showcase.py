"""One report side by side: the report, its gold summary, the teacher's key information and each
model's summary, so a person can judge the outputs and not only the scores.

In results.md the numbers and content words of the gold summary and of each model's summary that
the report does not support (distil/faithfulness.py) are in bold and listed under the summary, so an
invention shows at a glance. Written to results.md and showcase.json only (never to the log): set
eval.showcase_id to a public report, such as one of the bundled sample's MultiClinSum reports.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from distil.atomic import write_json
from distil.data import DataError, load_key_info
from distil.faithfulness import unsupported_spans


def showcase_record(records: list[dict], record_id: str) -> dict:
    """The record of `record_id`; evaluate calls it before generating, so a wrong id costs no run."""
    record = next((r for r in records if r["id"] == record_id), None)
    if record is None:
        raise DataError(f"eval.showcase_id {record_id!r} is not in the evaluated split; pick an id of "
                        f"that split (e.g. {records[0]['id']!r}) or set it to null")
    return record


def showcase(records: list[dict], predictions: dict[str, dict[str, dict]], record_id: str,
             key_info_path: str | None, annotation: dict) -> dict:
    """{id, lang, report, gold_summary, teacher_key_info, summaries: {label: text}} for one report; the key
    information is the one of `annotation` (distil.teacher_config.annotation_key)."""
    record = showcase_record(records, record_id)
    key_info = None
    if key_info_path and Path(key_info_path).exists():
        key_info = load_key_info(key_info_path, annotation).get(record_id)
    return {"id": record_id, "lang": record["lang"], "report": record["report"], "gold_summary": record["summary"],
            "teacher_key_info": key_info,
            "summaries": {label: preds.get(record_id, {}).get("prediction") for label, preds in predictions.items()}}


def mark_unsupported(text: str, report: str, lang: str) -> tuple[str, list[str]]:
    """`text` (NFC) with each number and content word its report does not support in bold, and those
    pieces as written (each once, in order)."""
    text = unicodedata.normalize("NFC", text)
    spans = unsupported_spans(text, report, lang)
    out, at = [], 0
    for start, end in spans:
        out += [text[at:start], f"**{text[start:end]}**"]
        at = end
    return "".join(out) + text[at:], list(dict.fromkeys(text[s:e] for s, e in spans))


def showcase_markdown(item: dict) -> str:
    def block(title: str, text: str | None) -> str:
        body = "\n".join("> " + line for line in (text or "(none)").strip().splitlines())
        return f"**{title}**\n\n{body}\n"

    def checked(title: str, text: str | None) -> str:
        if not text:
            return block(title, text)
        marked, pieces = mark_unsupported(text, item["report"], item["lang"])
        return block(title, marked) + f"\nNot in the report: {', '.join(pieces) if pieces else 'nothing'}\n"

    parts = [f"## One report side by side: {item['id']} ({item['lang']})\n",
             "In bold: the numbers and content words of a summary that its report does not write "
             "(distil/faithfulness.py).\n", block("Report", item["report"]),
             checked("Gold summary", item["gold_summary"]),
             block("Teacher's key information", item["teacher_key_info"])]
    parts += [checked(f"Summary by {label}", text) for label, text in item["summaries"].items()]
    return "\n".join(parts)


def write_showcase(out_dir: str | Path, item: dict) -> str:
    write_json(Path(out_dir, "showcase.json"), item, indent=1)
    return showcase_markdown(item)
