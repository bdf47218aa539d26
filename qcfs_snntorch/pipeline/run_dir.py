"""The run directory: where it is, the log, and report.json with one part per stage.

report.json is rewritten atomically whenever a stage starts or ends, so at any moment it
says what is complete, what was running (``status: "running"``, ``running_stage``) and,
after a failure, what went wrong (``status: "failed"``, ``error``). Each stage's entry
under ``stages`` holds its wall time and its fingerprint: the settings its result depends
on, which ``resume=true`` compares before reusing it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.table import Table

from ..config import ConfigError
from ..training.checkpoints import atomic_write_text

__all__ = ["RunDir", "RunLog", "choose_run_dir", "read_report"]


class RunLog:
    """Messages to the console and ``log.txt``, from the main process only."""

    def __init__(self, run_dir: Path | None, enabled: bool = True):
        # Wide enough for the per-T tables even when stdout is not a terminal (rich's default is 80).
        self.console = Console(highlight=False, width=None if Console().is_terminal else 120)
        self.path = (run_dir / "log.txt") if (run_dir and enabled) else None
        self.enabled = enabled

    def __call__(self, message: str, console: bool = True) -> None:
        """One line to log.txt and (``console=False``: progress a bar already shows there) to the console."""
        if not self.enabled:
            return
        if console:
            self.console.print(message, markup=False, soft_wrap=True)  # one line per message: greppable
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


def read_report(run_dir: str | Path) -> dict:
    """The report.json a run directory holds, or {} if there is none (or it is unreadable)."""
    try:
        report = json.loads((Path(run_dir) / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def choose_run_dir(cfg, state: PartialState, accept: Callable[[Path], None] | None = None) -> Path:
    """Picked once on the main process and shared, so every rank writes to the same place.

    ``accept(path)`` may refuse an existing directory (a resumed run of another model) by
    raising :class:`~qcfs_snntorch.config.ConfigError`; every rank then raises it.
    """
    chosen: list = [None, None]
    if state.is_main_process:
        try:
            chosen = [str(_pick(cfg, accept)), None]
        except ConfigError as exc:
            chosen = [None, str(exc)]
    broadcast_object_list(chosen)
    if chosen[1] is not None:
        raise ConfigError(chosen[1])
    return Path(chosen[0])


def _pick(cfg, accept) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if path.exists() and any(path.iterdir()) and not cfg.resume:
            raise ConfigError(f"run_dir {str(path)!r} already holds a run; add resume=true to continue it, or "
                              "choose a new run_dir")
        if accept is not None:
            accept(path)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output_dir) / f"{cfg.recipe}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(cfg.output_dir) / f"{cfg.recipe}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunDir:
    """One run's directory and its report; only the main process writes."""

    def __init__(self, path: Path, report: dict, *, previous: dict | None = None, writer: bool = True):
        self.path, self.report, self.writer = path, report, writer
        self.previous = previous or {}  # the report of the run being resumed

    def file(self, name: str) -> Path:
        return self.path / name

    def write(self) -> None:
        if self.writer:
            atomic_write_text(self.path / "report.json", json.dumps(self.report, indent=2) + "\n")

    def saved_stage(self, name: str) -> dict | None:
        """The resumed run's entry for stage ``name`` (seconds, fingerprint), if it completed."""
        return self.previous.get("stages", {}).get(name)

    def restore(self, name: str, keys: tuple[str, ...]) -> None:
        """Take stage ``name``'s report parts from the resumed run's report."""
        self.report.update({key: self.previous[key] for key in keys if key in self.previous})
        self.report["stages"][name] = self.previous["stages"][name]
        self.write()

    def discard(self, names: tuple[str, ...]) -> None:
        """Remove these files of the run directory (a stage that reruns: they are another experiment's)."""
        if self.writer:
            for name in names:
                self.file(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def stage(self, name: str, fingerprint: dict) -> Iterator[dict]:
        """Time a stage; its report parts (the dict yielded) and entry are written when it ends."""
        self.report["running_stage"] = name
        self.report["stages"].pop(name, None)
        self.write()
        started = time.perf_counter()
        parts: dict = {}
        yield parts
        self.report.update(parts)
        self.report["stages"][name] = {"seconds": round(time.perf_counter() - started, 2), "fingerprint": fingerprint}
        self.report.pop("running_stage", None)
        self.write()

    def finish(self) -> dict:
        self.report["status"] = "complete"
        self.report.pop("running_stage", None)
        self.write()
        return self.report

    def fail(self, status: str, error: str) -> None:
        """Record how the run ended early: ``failed`` (with the error's paragraph) or ``interrupted``."""
        self.report["status"] = status
        self.report["error"] = error
        self.write()
