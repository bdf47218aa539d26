"""The run: setup, then the stages check → train → convert → eval → calibrate → finetune → export.

- :mod:`.setup` builds the :class:`~.context.RunContext` (every bad input refused first);
- :mod:`.stages` holds one small class per stage; :mod:`.runner` walks them in order,
  reusing a stage on ``resume=true`` when its fingerprint (:mod:`.fingerprints`) matches;
- :mod:`.run_dir` writes report.json and the log; :mod:`.tables` and :mod:`.plots` show them;
- :mod:`.cli` is the command line (``launch.py`` and the ``qcfs-snntorch`` script).
"""

from .runner import STAGES, run

__all__ = ["STAGES", "run"]
