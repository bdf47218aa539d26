"""Mean ± std over seeds of the accuracies in finished runs' report.json files.

Each argument is ``LABEL=GLOB``: the runs matching GLOB (one per seed) form one row.
Prints JSON (one object per row) and, with ``--markdown``, a table of percentages.

    python benchmarks/seeds_table.py default='/tmp/headline/s*' d0='/tmp/grid/d0_s*' --markdown
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path


def read_report(run_dir: str) -> dict:
    report = json.loads((Path(run_dir) / "report.json").read_text())
    if report.get("status") != "complete":
        raise SystemExit(f"{run_dir}: status {report.get('status')!r}, not 'complete'")
    return report


def run_numbers(report: dict) -> dict[str, float]:
    """The accuracies of one run, as percentages, keyed by what they measure."""
    numbers: dict[str, float] = {}
    if "ann" in report:
        numbers["ann.test"] = 100 * report["ann"]["top1"]
        numbers["ann.val"] = 100 * report["ann"]["val_top1"]
    snn = report.get("snn")
    if snn:
        for t, test, val in zip(snn["timesteps"], snn["top1"], snn["val_top1"]):
            numbers[f"snn.T{t}.test"], numbers[f"snn.T{t}.val"] = 100 * test, 100 * val
        for level, top1 in zip(snn["ann_at_levels"]["levels"], snn["ann_at_levels"]["top1"]):
            numbers[f"ann_at_L{level}.test"] = 100 * top1
        numbers.update(early_exit_numbers("snn.exit", snn.get("early_exit")))
    totals = report.get("spikes", {}).get("totals")
    if totals:
        steps = report["spikes"]["timesteps"]
        numbers[f"spikes.T{steps}.events"] = totals["events"]
        numbers[f"spikes.T{steps}.payload_bits"] = totals["payload_bits"]
    finetune = report.get("finetune")
    if finetune:
        numbers["finetune.before.test"] = 100 * finetune["top1_before"]
        if finetune.get("val_top1_before") is not None:
            numbers["finetune.before.val"] = 100 * finetune["val_top1_before"]
        numbers["finetune.after.test"] = 100 * finetune["top1_after"]
        numbers["finetune.after.val"] = 100 * finetune["val_top1_after"]
        after = finetune["snn_after"]
        for t, test in zip(after["timesteps"], after["top1"]):
            numbers[f"finetune.T{t}.test"] = 100 * test
        for t, val in zip(after["timesteps"], after.get("val_top1") or []):
            numbers[f"finetune.T{t}.val"] = 100 * val
        numbers.update(early_exit_numbers("finetune.exit", after.get("early_exit")))
        if "ann" in report:
            numbers["finetune.gap.test"] = numbers["ann.test"] - numbers["finetune.after.test"]
    return numbers


def early_exit_numbers(prefix: str, early_exit: dict | None) -> dict[str, float]:
    """The early exit at the threshold chosen on validation: test top-1 and mean steps (absent if none was chosen)."""
    chosen = (early_exit or {}).get("chosen")
    if not chosen:
        return {}
    return {f"{prefix}.threshold": chosen["threshold"], f"{prefix}.test": 100 * chosen["test"]["top1"],
            f"{prefix}.mean_steps": chosen["test"]["mean_steps"]}


def summarize(run_dirs: list[str]) -> dict[str, str]:
    per_run = [run_numbers(read_report(d)) for d in run_dirs]
    keys = [k for k in per_run[0] if all(k in numbers for numbers in per_run)]
    summary = {}
    for key in keys:
        values = [numbers[key] for numbers in per_run]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = f"{statistics.mean(values):.2f} ± {spread:.2f}"
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", metavar="LABEL=GLOB")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--keys", nargs="*", help="only these keys in the markdown table")
    args = parser.parse_args()
    rows = {}
    for row in args.rows:
        label, _, pattern = row.partition("=")
        run_dirs = sorted(d for d in glob.glob(pattern) if Path(d, "report.json").is_file())
        if not run_dirs:
            raise SystemExit(f"{label}: no run directory with a report.json matches {pattern!r}")
        rows[label] = {"runs": len(run_dirs), **summarize(run_dirs)}
    print(json.dumps(rows, indent=1))
    if args.markdown:
        keys = args.keys or [k for k in next(iter(rows.values())) if k != "runs"]
        print("| setting | runs | " + " | ".join(keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for label, row in rows.items():
            print(f"| {label} | {row['runs']} | " + " | ".join(row.get(k, "") for k in keys) + " |")


if __name__ == "__main__":
    main()
