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
        # Wide enough for the per-T tables even when stdout is not a terminal (rich's default is 80).
        self.console = Console(highlight=False, width=None if Console().is_terminal else 120)
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
    """SNN top-1 at every T and its gap to the ANN, before and (where it ran) after fine-tuning."""
    snn = report.get("snn", {})
    after = report.get("finetune", {}).get("snn_after", {})
    ann = report.get("ann", {}).get("top1")
    table = Table(title=f"{report.get('model')} on {report.get('dataset')}: top-1 (%)")
    columns = ["T", "SNN", "gap"] + (["fine-tuned", "gap"] if after else [])
    for name in columns:
        table.add_column(name, justify="right")
    after_by_t = dict(zip(after.get("timesteps", []), after.get("top1", [])))

    def cells(acc):
        if acc is None:
            return ["", ""]
        return [f"{100 * acc:.2f}", f"{100 * (ann - acc):+.2f}" if ann is not None else ""]

    for t, acc in zip(snn.get("timesteps", []), snn.get("top1", [])):
        table.add_row(str(t), *cells(acc), *(cells(after_by_t.get(t)) if after else []))
    if ann is not None:
        table.caption = f"ANN (QCFS, L={report.get('levels')}): {100 * ann:.2f}%; gap = ANN − SNN"
        if after:
            table.caption += f"; fine-tuned at T={report['finetune']['timesteps']}"
    return table
