"""The command line: ``accelerate launch launch.py [--dry-run] [recipe=NAME] [key.sub=value ...]``.

Every rank runs this; the main process chooses the run directory and writes every file.
Each error a user can cause ends the program with one paragraph on stderr and exit code
2 (``QCFS_SNNTORCH_TRACEBACK=1`` shows the traceback instead); Ctrl-C or SIGTERM ends it
with 130 after marking the report as interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from ..check import ConversionError
from ..config import STAGES, ConfigError, RunConfig, key_help, list_recipes, load_config, to_yaml
from ..data import DataError
from ..export import ExportError
from ..models import ModelError
from ..training import CheckpointError, TrainingDiverged, TrainingOutOfMemory, TrainingSetupError
from .paths import check_paths
from .run_dir import read_report
from .runner import plan, run

__all__ = ["USAGE", "USER_ERRORS", "dry_run", "entry", "help_text", "main"]

USER_ERRORS = (
    ConfigError, DataError, CheckpointError, ModelError, ConversionError, ExportError, TrainingDiverged,
    TrainingOutOfMemory, TrainingSetupError,
)

USAGE = f"""usage: [accelerate launch] launch.py [--dry-run] [recipe=NAME] [key.sub=value ...]
       qcfs-snntorch [--dry-run] [recipe=NAME] [key.sub=value ...]

  --dry-run  print the resolved config (recipe + overrides) and the stages that would run
             (with resume=true, which would be reused), then stop: nothing is written or trained
  -h, --help this text

recipes: {', '.join(list_recipes())}
stages:  {', '.join(STAGES)} (e.g. stages=[convert,eval] model.checkpoint=PATH)
Set QCFS_SNNTORCH_TRACEBACK=1 to see the full traceback of an error."""


def _shown(value) -> str:
    """A default as it is written on the command line (YAML/JSON: null, true, [1, 2])."""
    return json.dumps(value, ensure_ascii=False)


def help_text() -> str:
    """The usage, then every schema key with its type, default and meaning (from the dataclasses in config.py)."""
    rows = key_help()
    heads = [f"{key} ({kind}) = {_shown(default)}" for key, kind, default, _ in rows]
    width = min(max(map(len, heads)), 50)  # a longer head gets a line of its own
    lines = [USAGE, "", "keys (key.sub=value; type = default, then the meaning):"]
    for head, (*_, meaning) in zip(heads, rows):
        lines.append(f"  {head.ljust(width)}  {meaning}" if len(head) <= width else f"  {head}\n  {'':{width}}  {meaning}")
    return "\n".join(lines)


def dry_run(cfg: RunConfig) -> str:
    """The resolved config and the plan: what a run of ``cfg`` would do, decided as :func:`~.runner.walk` decides."""
    previous = read_report(cfg.run_dir) if cfg.resume and cfg.run_dir else {}
    steps = {step.stage.name: step for step in plan(cfg, previous)}
    lines = ["# resolved config", to_yaml(cfg).rstrip(), "", "# stages"]
    for stage in STAGES:
        step = steps.get(stage)
        verb = ("skipped" if step is None else
                f"reuse (recorded in {cfg.run_dir}/report.json under the same settings; it reruns if its files are gone)"
                if step.reuse else "run")
        lines.append(f"{stage}: {verb}")
    if cfg.resume and not previous:
        lines.append(f"(resume=true: {cfg.run_dir} holds no report.json yet, so every stage runs)")
    return "\n".join(lines)


OUT_OF_MEMORY = ("out of accelerator memory outside training (evaluation, spike statistics or export): lower "
                 "data.eval_batch_size, snn.chunk_size or snn.stats_samples; add resume=true to keep the stages already done")
INTERRUPTED = ("interrupted: checkpoints already written are complete; rerun the same command with run_dir=<the run "
               "directory> resume=true to continue")


def _terminate(signum, frame):
    raise KeyboardInterrupt  # the report records where the run stopped


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text())
        return 0
    dry = "--dry-run" in argv
    argv = [arg for arg in argv if arg != "--dry-run"]
    traceback = bool(os.environ.get("QCFS_SNNTORCH_TRACEBACK"))
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        pass
    try:
        cfg = load_config(argv)
        if dry:
            print(dry_run(cfg))
            check_paths(cfg)  # after the plan: what the run would refuse is shown with what it would do
            return 0
        run(cfg)
    except USER_ERRORS as exc:
        if traceback:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:  # outside training (fit translates its own)
        if traceback:
            raise
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The ``qcfs-snntorch`` console script."""
    sys.exit(main())
