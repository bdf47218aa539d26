"""The command line: ``accelerate launch launch.py [recipe=NAME] [key.sub=value ...]``.

Every rank runs this; the main process chooses the run directory and writes every file.
Each error a user can cause ends the program with one paragraph on stderr and exit code
2 (``QCFS_SNNTORCH_TRACEBACK=1`` shows the traceback instead); Ctrl-C or SIGTERM ends it
with 130 after marking the report as interrupted.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from ..check import ConversionError
from ..config import STAGES, ConfigError, list_recipes, load_config
from ..data import DataError
from ..export import ExportError
from ..models import ModelError
from ..training import CheckpointError, TrainingDiverged, TrainingOutOfMemory, TrainingSetupError
from .runner import run

__all__ = ["HELP", "USER_ERRORS", "entry", "main"]

USER_ERRORS = (
    ConfigError, DataError, CheckpointError, ModelError, ConversionError, ExportError, TrainingDiverged,
    TrainingOutOfMemory, TrainingSetupError,
)

HELP = f"""usage: [accelerate launch] launch.py [recipe=NAME] [key.sub=value ...]
       qcfs-snntorch [recipe=NAME] [key.sub=value ...]

recipes: {', '.join(list_recipes())}
stages:  {', '.join(STAGES)} (e.g. stages=[convert,eval] model.checkpoint=PATH)
keys:    see qcfs_snntorch/config.py (model.*, data.*, train.*, snn.*, finetune.*, seed, run_dir, resume, ...)
Set QCFS_SNNTORCH_TRACEBACK=1 to see the full traceback of an error."""

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
        print(HELP)
        return 0
    traceback = bool(os.environ.get("QCFS_SNNTORCH_TRACEBACK"))
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        pass
    try:
        run(load_config(argv))
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
