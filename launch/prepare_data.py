"""Prepare MultiClinSum for both stages: per-language train/valid/test JSONL.

    python launch/prepare_data.py --input ../shared/data/multiclinsum_gs_train_en --output data/prepared --stats
    python launch/prepare_data.py --config launch/configs/paper_qwen25_05b.yaml --stats

--input takes release folders (<name>_<lang>/fulltext + summaries/, or a folder holding several)
and JSON/JSONL files of {id, lang, report, summary}. Without --input/--output the config's
data.sources / data.prepared_dir are used, with its split and crop settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distil.config import ConfigError, DataConfig, load_config
from distil.data import SPLITS, DataError, crop, dataset_stats, format_stats, load_sources, split_records, write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (data section)")
    parser.add_argument("--input", nargs="+", help="release folders or JSON/JSONL files (default: data.sources)")
    parser.add_argument("--output", help="output folder (default: data.prepared_dir)")
    parser.add_argument("--stats", action="store_true", help="print the Dataset I table per language")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.crop_report_chars=2560")
    args = parser.parse_args(argv)
    try:
        data = load_config(args.config, args.overrides).data if args.config else DataConfig()
        records = load_sources(args.input or data.sources, data.languages)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output or data.prepared_dir)
    splits = split_records(records, data.split_fractions, data.split_seed)
    for split in SPLITS:
        rows = splits[split]
        if split != "test":
            rows = [crop(r, data.crop_report_chars, data.crop_summary_chars) for r in rows]
        write_jsonl(output / f"{split}.jsonl", rows)
    counts = {split: len(splits[split]) for split in SPLITS}
    (output / "manifest.json").write_text(json.dumps(
        {"sources": [str(s) for s in (args.input or data.sources)], "counts": counts,
         "split_fractions": data.split_fractions, "split_seed": data.split_seed,
         "crop_report_chars": data.crop_report_chars, "crop_summary_chars": data.crop_summary_chars}, indent=2))
    print(f"wrote {output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.stats:
        print(format_stats(dataset_stats(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
