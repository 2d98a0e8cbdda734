"""Prepare MultiClinSum for both stages: per-language train/valid/test JSONL.

    python launch/prepare_data.py --input ../shared/data/multiclinsum_gs_train_en --output data/prepared --stats
    python launch/prepare_data.py --config launch/configs/paper_qwen25_05b.yaml --stats

--input takes release folders (<name>_<lang>/fulltext + summaries/, or a folder holding several)
and JSON/JSONL files of {id, lang, report, summary}. Reports without a gold summary (a release folder
with fulltext/ only, records without `summary`) go to unlabelled.jsonl, never into train/valid/test. Without --input/--output the config's
data.sources / data.prepared_dir are used, with its split and crop settings; key=value overrides
apply to the config, or to the defaults when there is no --config.

The output folder is replaced as a whole (built beside it, then swapped in): a kill leaves the old
splits or the new ones, never a mix. It refuses an input inside the output, an output holding files
it did not write, and inputs with no report. Exit status 0 = written, 2 = bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distil.atomic import blocking_file, foreign_files, publish_dir, staging_dir, write_json
from distil.config import ConfigError, load_config
from distil.data import SPLITS, UNLABELLED, DataError, crop, dataset_stats, format_stats, load_sources, split_records, write_jsonl


PREPARED = (*SPLITS, UNLABELLED)
OWN_FILES = {f"{split}.jsonl" for split in PREPARED} | {"manifest.json"}


def check_paths(inputs: list[str], output: Path, where: str) -> None:
    """An input inside the output folder (or the folder itself) would be replaced by its own split; an output
    under a file would end in a traceback at the first write. `where` names it as the user set it."""
    out = output.resolve()
    for source in map(Path, inputs):
        src = source.resolve()
        if src == out or out in src.parents:
            raise DataError(f"--input {source} and {where}: the input is inside the output folder, and "
                            "preparing replaces that folder as a whole; write the prepared splits to another "
                            "folder, e.g. --output data/prepared")
    blocker = blocking_file(output)
    if blocker == output:
        raise DataError(f"{where} is a file; pass a folder (it is created, or replaced as a whole)")
    if blocker:
        raise DataError(f"{where}: {blocker} is a file; pass a folder that is not under a file, e.g. "
                        "--output data/prepared")
    foreign = foreign_files(output, OWN_FILES.__contains__)
    if foreign:
        raise DataError(f"{where} holds files prepare_data did not write ({foreign[:5]}), and preparing "
                        "replaces the folder as a whole; move them out, or write to another folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (data section); without it the defaults + overrides")
    parser.add_argument("--input", nargs="+", help="release folders or JSON/JSONL files (default: data.sources)")
    parser.add_argument("--output", help="output folder (default: data.prepared_dir)")
    parser.add_argument("--stats", action="store_true", help="print the Dataset I table per language")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.crop_report_chars=2560")
    args = parser.parse_args(argv)
    try:
        data = load_config(args.config, args.overrides).data
        inputs = args.input or data.sources
        output = Path(args.output or data.prepared_dir)
        check_paths(inputs, output, f"--output {output}" if args.output else f"data.prepared_dir={output}")
        records = load_sources(inputs, data.languages)
        if not records:
            raise DataError(f"no reports in {inputs} (languages {data.languages}); nothing was written, "
                            f"{output} is left as it was")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = split_records(records, data.split_fractions, data.split_seed)
    staged = staging_dir(output)  # every split and the manifest, then one swap: never a mix of old and new
    for split in PREPARED:
        rows = splits[split]
        if split != "test":  # the unlabelled reports are training inputs too: cropped like train
            rows = [crop(r, data.crop_report_chars, data.crop_summary_chars) for r in rows]
        write_jsonl(staged / f"{split}.jsonl", rows)
    counts = {split: len(splits[split]) for split in PREPARED}
    write_json(staged / "manifest.json",
               {"sources": [str(s) for s in inputs], "counts": counts,
                "split_fractions": data.split_fractions, "split_seed": data.split_seed,
                "crop_report_chars": data.crop_report_chars, "crop_summary_chars": data.crop_summary_chars})
    publish_dir(staged, output)
    print(f"wrote {output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.stats:
        print(format_stats(dataset_stats(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
