"""One report side by side: the report, its gold summary, the teacher's key information and each
model's summary, so a person can judge the outputs and not only the scores.

Written to results.md and showcase.json only (never to the log): set eval.showcase_id to a public
report, such as one of the bundled sample's MultiClinSum reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from distil.data import DataError, load_key_info


def showcase_record(records: list[dict], record_id: str) -> dict:
    """The record of `record_id`; evaluate calls it before generating, so a wrong id costs no run."""
    record = next((r for r in records if r["id"] == record_id), None)
    if record is None:
        raise DataError(f"eval.showcase_id {record_id!r} is not in the evaluated split; pick an id of "
                        f"that split (e.g. {records[0]['id']!r}) or set it to null")
    return record


def showcase(records: list[dict], predictions: dict[str, dict[str, dict]], record_id: str,
             key_info_path: str | None) -> dict:
    """{id, lang, report, gold_summary, teacher_key_info, summaries: {label: text}} for one report."""
    record = showcase_record(records, record_id)
    key_info = load_key_info(key_info_path).get(record_id) if key_info_path and Path(key_info_path).exists() else None
    return {"id": record_id, "lang": record["lang"], "report": record["report"], "gold_summary": record["summary"],
            "teacher_key_info": key_info,
            "summaries": {label: preds.get(record_id, {}).get("prediction") for label, preds in predictions.items()}}


def showcase_markdown(item: dict) -> str:
    def block(title: str, text: str | None) -> str:
        body = "\n".join("> " + line for line in (text or "(none)").strip().splitlines())
        return f"**{title}**\n\n{body}\n"

    parts = [f"## One report side by side: {item['id']} ({item['lang']})\n", block("Report", item["report"]),
             block("Gold summary", item["gold_summary"]), block("Teacher's key information", item["teacher_key_info"])]
    parts += [block(f"Summary by {label}", text) for label, text in item["summaries"].items()]
    return "\n".join(parts)


def write_showcase(out_dir: str | Path, item: dict) -> str:
    Path(out_dir, "showcase.json").write_text(json.dumps(item, indent=1, ensure_ascii=False))
    return showcase_markdown(item)
