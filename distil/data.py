"""Reading MultiClinSum, splitting it per language, and the Stage 1 -> Stage 2 join.

Prepared data is one JSONL file per split with records {id, lang, report, summary, split}; reports
without a gold summary (a release folder with fulltext/ only, a JSON record without `summary`) go to
a split of their own, `unlabelled` (summary null), never into train/valid/test.
Texts are kept verbatim (trailing newline included, as in the release files); prompt
formatting strips them later. Errors name the file or record id and say what to do.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from distil.atomic import write_text
from distil.combine import Answer, select
from distil.config import LANGUAGES
from distil.ledger import read_ledger
from distil.teacher_config import Teacher, annotation_key, is_annotation_of

SPLITS = ("train", "valid", "test")
UNLABELLED = "unlabelled"  # reports without a gold summary: a prepared file of their own
log = logging.getLogger(__name__)
RELEASE_DIR = re.compile(r"^(?P<name>.+)_(?P<lang>[a-z]{2})$")


class DataError(ValueError):
    """Bad input data; the message names the file or record and the fix."""


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _check_record(record: dict, where: str, languages: Iterable[str]) -> dict:
    """A record {id, lang, report, summary}; a missing or null summary makes it unlabelled (summary None)."""
    record = dict(record, summary=record.get("summary"))
    for key in ("id", "lang", "report"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: field {key!r} missing or not a string; each record needs id, lang, report "
                            "(and summary, or none for a report without one)")
    if record["summary"] is not None and not isinstance(record["summary"], str):
        raise DataError(f"{where}: field 'summary' of {record['id']!r} is not a string; give the text, or leave it "
                        "out (null) for a report without a gold summary")
    if record["lang"] not in languages:
        raise DataError(
            f"{where}: record {record['id']!r} has unknown language {record['lang']!r}; "
            f"supported: {sorted(languages)} (data.languages in the config)"
        )
    for key in ("report", "summary"):
        if record[key] is not None and not record[key].strip():
            raise DataError(f"{where}: record {record['id']!r} has an empty {key}; remove the record or fill it in"
                            + (" (leave the summary out for a report without one)" if key == "summary" else ""))
    return {key: record[key] for key in ("id", "lang", "report", "summary")}


def read_release_folder(folder: Path, languages: Iterable[str] = LANGUAGES) -> list[dict]:
    """One `<name>_<lang>/` folder of the release: fulltext/<id>.txt paired with summaries/<id>_sum.txt, or
    fulltext/ alone (reports without summaries: unlabelled)."""
    match = RELEASE_DIR.match(folder.name)
    if not match:
        raise DataError(f"{folder}: expected a release folder named <name>_<lang> (e.g. multiclinsum_gs_train_en)")
    lang = match["lang"]
    fulltext, summaries = folder / "fulltext", folder / "summaries"
    if not fulltext.is_dir():
        raise DataError(f"{folder}: missing sub-folder fulltext/; the release layout is fulltext/ (+ summaries/)")
    labelled = summaries.is_dir()
    records = []
    for report_path in sorted(fulltext.glob("*.txt"), key=lambda p: _natural_key(p.name)):
        summary_path = summaries / f"{report_path.stem}_sum.txt"
        if labelled and not summary_path.is_file():
            raise DataError(
                f"{report_path}: no summary file {summary_path}; add it or remove the report (reports without "
                "summaries go in a release folder of their own, fulltext/ only)"
            )
        record = {"id": report_path.stem, "lang": lang, "report": _read_text(report_path),
                  "summary": _read_text(summary_path) if labelled else None}
        records.append(_check_record(record, str(report_path), languages))
    if not records:
        raise DataError(f"{fulltext}: no *.txt reports found")
    return records


def read_json_records(path: Path, languages: Iterable[str] = LANGUAGES) -> list[dict]:
    """A .json list or a .jsonl file of {id, lang, report, summary} (summary left out: unlabelled)."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); one object per line") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        rows = [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with id, lang, report, summary")
        out.append(_check_record(row, where, languages))
    return out


def load_sources(sources: Iterable[str | Path], languages: Iterable[str] = LANGUAGES) -> list[dict]:
    """Every record of every source; a folder may be one release folder or hold several."""
    languages = tuple(languages)
    records: list[dict] = []
    for source in map(Path, sources):
        if source.is_file():
            records += read_json_records(source, languages)
        elif (source / "fulltext").is_dir():
            records += read_release_folder(source, languages)
        elif source.is_dir():
            subfolders = sorted(p for p in source.iterdir() if (p / "fulltext").is_dir())
            if not subfolders:
                raise DataError(f"{source}: no release folders (<name>_<lang>/fulltext) inside")
            for sub in subfolders:
                records += read_release_folder(sub, languages)
        else:
            raise DataError(f"{source}: no such file or folder (data.sources in the config)")
    seen: dict[str, int] = Counter(r["id"] for r in records)
    duplicates = sorted(i for i, n in seen.items() if n > 1)
    if duplicates:
        kinds = {r["summary"] is None for r in records if r["id"] == duplicates[0]}
        clash = " (one with a summary, one without)" if len(kinds) == 2 else ""
        raise DataError(f"duplicate report ids {duplicates[:5]}{clash} across {list(map(str, sources))}; ids must be "
                        "unique, labelled and unlabelled reports together")
    return records


def split_counts(n: int, fractions: list[float]) -> tuple[int, int, int]:
    """Sizes of train/valid/test for n reports: train and valid rounded, test takes the rest."""
    n_train = int(math.floor(n * fractions[0] + 0.5))
    n_valid = min(n - n_train, int(math.floor(n * fractions[1] + 0.5)))
    return n_train, n_valid, n - n_train - n_valid


def split_records(records: list[dict], fractions: list[float], seed: int) -> dict[str, list[dict]]:
    """Deterministic per-language split of the labelled records: sort ids, shuffle with `seed`, cut by
    `split_counts`; the unlabelled ones (summary None) are the `unlabelled` split, in id order."""
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("summary") is not None:
            by_lang[record["lang"]].append(record)
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    out[UNLABELLED] = [dict(r, split=UNLABELLED) for r in sorted(
        (r for r in records if r.get("summary") is None), key=lambda r: (r["lang"], _natural_key(r["id"])))]
    for lang in sorted(by_lang):
        group = sorted(by_lang[lang], key=lambda r: _natural_key(r["id"]))
        random.Random(seed).shuffle(group)
        n_train, n_valid, _ = split_counts(len(group), fractions)
        bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, len(group))}
        for split, (lo, hi) in bounds.items():
            out[split] += [dict(r, split=split) for r in group[lo:hi]]
    return out


def crop(record: dict, report_chars: int | None, summary_chars: int | None) -> dict:
    """The paper's character crop (2560 / 512), applied to train and valid only."""
    return dict(record,
                report=record["report"][:report_chars] if report_chars else record["report"],
                summary=record["summary"][:summary_chars] if summary_chars and record["summary"] else record["summary"])


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write atomically (distil.atomic: temp file + rename) so a killed run never leaves half a file."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise DataError(f"{path}: not found; run launch/prepare_data.py first (data.prepared_dir in the config)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows


def read_prepared(path: Path) -> list[dict]:
    """A prepared split: each line {id, lang, report, summary (text or null)}, ids unique. A file edited by
    hand or written by another program is refused here, naming the line, not deep inside a stage."""
    rows, seen = read_jsonl(path), set()
    for lineno, row in enumerate(rows, 1):
        bad = [k for k in ("id", "lang", "report") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if bad or not (row.get("summary") is None or isinstance(row["summary"], str)):
            raise DataError(f"{path}: record {lineno}: not a prepared record (needs id, lang, report as text and "
                            "summary as text or null); regenerate the folder with launch/prepare_data.py")
        if row["id"] in seen:
            raise DataError(f"{path}: record {lineno}: report {row['id']!r} appears twice; regenerate the folder "
                            "with launch/prepare_data.py")
        seen.add(row["id"])
    return rows


def dataset_stats(records: list[dict]) -> list[dict]:
    """The paper's Dataset I table: per language, count and mean/min/max characters (summaries: of the
    labelled reports), and how many reports have no summary."""
    rows = []
    for lang in sorted({r["lang"] for r in records}):
        group = [r for r in records if r["lang"] == lang]
        labelled = [r for r in group if r["summary"] is not None]
        row = {"lang": lang, "count": len(labelled), "unlabelled": len(group) - len(labelled)}
        for key, rows_with in (("report", group), ("summary", labelled)):
            lengths = [len(r[key]) for r in rows_with]
            row[key] = ({"mean": round(statistics.fmean(lengths), 1), "min": min(lengths), "max": max(lengths)}
                        if lengths else None)
        rows.append(row)
    return rows


def format_stats(rows: list[dict]) -> str:
    lines = ["| lang | reports | without summary | report mean | min | max | summary mean | min | max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rep, summ = r["report"], r["summary"]
        summary = f"{summ['mean']:.1f} | {summ['min']} | {summ['max']}" if summ else "- | - | -"
        lines.append(f"| {r['lang']} | {r['count']} | {r['unlabelled']} | {rep['mean']:.1f} | {rep['min']} | {rep['max']} "
                     f"| {summary} |")
    return "\n".join(lines)


def teacher_summaries_path(key_info_path: str | Path) -> Path:
    """Where Stage 1 writes the teacher's summaries of the reports without a gold one (teacher.summarize):
    a ledger of its own beside the key-information ledger, with the same keys and guarantees."""
    return Path(key_info_path).with_suffix(".teacher_summaries.jsonl")


def load_key_info(path: str | Path, annotation: dict) -> dict[str, str]:
    """The key information of one teacher by report id, from the Stage 1 ledger: its records with status
    'ok' under `annotation` ({teacher, prompt_version, sampling}: distil.teacher_config.annotation_key),
    so a ledger shared by several teachers or settings trains on the one the config names."""
    if not Path(path).is_file():
        raise DataError(f"{path}: key-information ledger not found; run Stage 1 (launch/annotate.py) "
                        "or set data.key_info_path: null with loss.gamma: 1.0 for summary-only training")
    return _teacher_answers(Path(path), annotation, "key_info")


def load_teacher_summaries(key_info_path: str | Path, annotation: dict) -> dict[str, str]:
    """The teacher's summaries by report id (teacher_summaries_path), selected like load_key_info."""
    path = teacher_summaries_path(key_info_path)
    if not path.is_file():
        raise DataError(f"{path}: no teacher summaries; loss.teacher_summary_weight > 0 trains on them: run Stage 1 "
                        "(launch/annotate.py) with teacher.summarize=true and 'unlabelled' in teacher.splits, or set "
                        "loss.teacher_summary_weight: 0")
    return _teacher_answers(path, annotation, "summary")


def _teacher_answers(path: Path, annotation: dict, field: str) -> dict[str, str]:
    return {i: row[field] for i, row in _teacher_rows(path, annotation, field).items()}


def _teacher_rows(path: Path, annotation: dict, field: str, required: bool = True) -> dict[str, dict]:
    """The usable records (status ok, a non-empty `field`) of `annotation` by report id. With `required`, a
    ledger that holds only other teachers' records is an error (the config names the wrong teacher)."""
    rows: dict[str, dict] = {}
    seen: set[str] = set()
    others: Counter = Counter()
    for lineno, row in enumerate(read_ledger(path), 1):
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{path}:{lineno}: ledger record without an id")
        if not is_annotation_of(row, annotation):
            others[f"{row.get('teacher')} ({row['teacher_model']})" if row.get("teacher_model") else row.get("teacher")] += 1
            continue
        if row["id"] in seen:
            raise DataError(f"{path}:{lineno}: report {row['id']!r} has two answers of teacher "
                            f"{annotation['teacher']!r} with the same prompt version and sampling; the ledger was "
                            "merged or edited by hand: keep one of them")
        seen.add(row["id"])
        if row.get("status", "ok") == "ok" and isinstance(row.get(field), str) and row[field].strip():
            rows[row["id"]] = row
    if required and others and not seen:
        raise DataError(f"{path}: no record of teacher {annotation['teacher']!r} (teacher.model: a folder is known by "
                        "the fingerprint of its files, distil/fingerprint.py, so it must be the folder Stage 1 used) with prompt "
                        f"{annotation['prompt_version']} and sampling {annotation['sampling']}, but "
                        f"{sum(others.values())} of other teachers or settings ({sorted(map(str, others))}); set the "
                        "teacher section to the one that wrote the ledger, or rerun Stage 1 with this config")
    return rows


def combined_answers(path: str | Path, teachers: list[Teacher], rule: str, task: str = "extract",
                     ) -> dict[str, list[Answer]]:
    """Several teachers' answers to `task` (key information; "summarize": the teacher summaries ledger at
    `path`) by report id, each report's chosen by `rule` (distil/combine.py; combine.text). A teacher without a
    record costs only its own answers (logged); none of them with a record is the error load_key_info gives."""
    path = Path(path)
    field = "key_info" if task == "extract" else "summary"
    if not path.is_file():
        raise DataError(f"{path}: no {'key-information ledger' if task == 'extract' else 'teacher summaries'}; run "
                        "Stage 1 (launch/annotate.py) with this config" + ("" if task == "extract" else
                                                                         " and teacher.summarize=true"))
    by_id: dict[str, list[Answer]] = {}
    absent = []
    for teacher in teachers:
        annotation = annotation_key(teacher.config, task)
        rows = _teacher_rows(path, annotation, field, required=False)
        if not rows:
            absent.append(teacher.name)
        for record_id, row in rows.items():
            by_id.setdefault(record_id, []).append(
                Answer(annotation["teacher"], row[field], teacher.weight, row.get("grounding"), teacher.order))
    if len(absent) == len(teachers):
        _teacher_rows(path, annotation_key(teachers[0].config, task), field)  # raises with the full story
    if absent:
        log.warning("%s: no usable answer of teacher(s) %s: trained on the others' (rerun Stage 1 for them)", path,
                    absent)
    chosen = {record_id: select(rule, answers) for record_id, answers in by_id.items()}
    names = {annotation_key(t.config, task)["teacher"]: t.name for t in teachers}
    wins = Counter(names[a.teacher] for answers in chosen.values() for a in answers)
    log.info("%s: %s answers per teacher under combine.text=%s (of %s usable): %s", path.name, task, rule,
             dict(Counter(names[a.teacher] for answers in by_id.values() for a in answers)), dict(wins))
    return chosen


def _example(base: dict, task: str, answer: str | Answer) -> dict:
    """An example of `task`; an Answer of one of several teachers adds its weight and author."""
    if isinstance(answer, str):
        return dict(base, task=task, answer=answer)
    return dict(base, task=task, answer=answer.text, weight=answer.weight, teacher=answer.teacher)


def training_examples(records: list[dict], key_info: dict[str, str | list[Answer]],
                      gamma: float) -> tuple[list[dict], dict]:
    """Both tasks per report: summarize (gold summary) and, when gamma < 1, extract (teacher key info: one
    teacher's text, or several teachers' answers as combined_answers chose them, one example each).

    A report without key info is trained on the summary task only and counted.
    """
    examples, missing = [], 0
    for record in records:
        base = {"id": record["id"], "lang": record["lang"], "report": record["report"]}
        examples.append(dict(base, task="summarize", answer=record["summary"]))
        if gamma < 1.0:
            answers = key_info.get(record["id"])
            if answers:
                examples += [_example(base, "extract", a) for a in ([answers] if isinstance(answers, str) else answers)]
            else:
                missing += 1
    counts = {"reports": len(records), "summarize": len(records),
              "extract": sum(e["task"] == "extract" for e in examples), "missing_key_info": missing}
    return examples, counts


def teacher_summary_examples(records: list[dict], summaries: dict[str, str | list[Answer]]) -> tuple[list[dict], int]:
    """The third kind of example: a report without a gold summary, answered by the teacher's summary (same
    prompt as summarization; several teachers': as combined_answers chose them). Returns the examples and how
    many reports have no usable teacher summary."""
    examples, missing = [], 0
    for r in records:
        answers = summaries.get(r["id"])
        if not answers:
            missing += 1
            continue
        base = {"id": r["id"], "lang": r["lang"], "report": r["report"]}
        examples += [_example(base, "teacher_summary", a) for a in ([answers] if isinstance(answers, str) else answers)]
    return examples, missing
