"""Run outputs: the log, report.json (written atomically) and rich tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoint import atomic_write_text

__all__ = ["RunLog", "accuracy_table", "write_report"]


class RunLog:
    """Messages to the console and ``log.txt``, from the main process only."""

    def __init__(self, run_dir: Path | None, enabled: bool = True):
        self.console = Console(highlight=False)
        self.path = (run_dir / "log.txt") if (run_dir and enabled) else None
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        self.console.print(message, markup=False)
        if self.path:
            with self.path.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def table(self, table: Table) -> None:
        if not self.enabled:
            return
        self.console.print(table)
        if self.path:
            with self.path.open("a") as f:
                Console(file=f, width=120).print(table)


def write_report(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False) + "\n")


def accuracy_table(report: dict) -> Table:
    """ANN vs SNN top-1 at every T (and after fine-tuning, where it ran)."""
    snn = report.get("snn", {})
    after = report.get("finetune", {}).get("snn_after", {})
    table = Table(title=f"{report.get('model')} on {report.get('dataset')}: top-1 (%)")
    table.add_column("T", justify="right")
    table.add_column("SNN", justify="right")
    if after:
        table.add_column(f"SNN fine-tuned at T={report['finetune']['timesteps']}", justify="right")
    table.add_column("gap to ANN", justify="right")
    ann = report.get("ann", {}).get("top1")
    after_by_t = dict(zip(after.get("timesteps", []), after.get("top1", [])))
    for t, acc in zip(snn.get("timesteps", []), snn.get("top1", [])):
        best = max(acc, after_by_t.get(t, acc))
        row = [str(t), f"{100 * acc:.2f}"]
        if after:
            row.append(f"{100 * after_by_t[t]:.2f}" if t in after_by_t else "")
        row.append(f"{100 * (ann - best):+.2f}" if ann is not None else "")
        table.add_row(*row)
    if ann is not None:
        table.caption = f"ANN (QCFS, L={report.get('levels')}): {100 * ann:.2f}%"
    return table
