"""run(cfg): setup, then every wanted stage in the fixed order, then the summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import RunConfig
from ..progress import reporting
from . import plots
from .context import RunContext
from .fingerprints import digest
from .setup import setup
from .stages import STAGE_CLASSES, Stage
from .tables import accuracy_table

__all__ = ["STAGES", "Step", "plan", "run", "walk"]

STAGES: tuple[Stage, ...] = tuple(cls() for cls in STAGE_CLASSES)


@dataclass(frozen=True)
class Step:
    """One wanted stage of a run: the fingerprint its result is recorded under, and whether it is reused."""

    stage: Stage
    fingerprint: dict
    reuse: bool


def plan(cfg: RunConfig, previous: dict, act: Callable[[Step], bool] | None = None,
         stages: tuple[Stage, ...] = STAGES) -> list[Step]:
    """The wanted stages in order, each marked reused when ``resume=true``, the resumed run's report
    (``previous``) recorded it under the same fingerprint, and no stage it reads from reran.

    ``act(step)`` does the step and says whether it was in fact reused (its files may be gone):
    :func:`walk` runs the stages through it; ``--dry-run`` calls this without ``act``, so both
    decide by this one rule.
    """
    digests: dict[str, str] = {}
    reran: set[str] = set()
    steps = []
    for stage in stages:
        if not stage.wanted(cfg):
            continue
        fingerprint = {**stage.fingerprint(cfg), "after": {d: digests[d] for d in stage.after if d in digests}}
        saved = previous.get("stages", {}).get(stage.name) if cfg.resume else None
        step = Step(stage, fingerprint, saved is not None and saved.get("fingerprint") == fingerprint
                    and not reran & set(stage.after))
        if act is not None:
            step = Step(stage, fingerprint, act(step))
        if not step.reuse:
            reran.add(stage.name)
        digests[stage.name] = digest(fingerprint)
        steps.append(step)
    return steps


def walk(ctx: RunContext, stages: tuple[Stage, ...] = STAGES) -> None:
    """Run or (``resume=true``, same fingerprint, nothing upstream rerun) restore each wanted stage."""
    run_dir = ctx.run_dir

    def act(step: Step) -> bool:
        if step.reuse and step.stage.restore(ctx):
            run_dir.restore(step.stage.name, step.stage.outputs)
            return True
        with run_dir.stage(step.stage.name, step.fingerprint) as parts:
            parts.update(step.stage.run(ctx))
        return False

    plan(ctx.cfg, run_dir.previous, act, stages)


def summarise(ctx: RunContext) -> dict:
    report = ctx.run_dir.report
    if "snn" in report:
        ctx.log.table(accuracy_table(report))
        if ctx.accelerator.is_main_process:
            plots.plot_report(report, ctx.run_dir.file("accuracy_vs_timesteps.png"))
    report = ctx.run_dir.finish()
    ctx.log(f"report: {ctx.run_dir.file('report.json')}")
    ctx.accelerator.end_training()
    return report


def run(cfg: RunConfig) -> dict:
    """The whole run the config describes; returns the report (also in ``run_dir/report.json``).

    A failure is recorded in the report (``status: "failed"`` and the error's paragraph, or
    ``"interrupted"``) before it propagates.
    """
    ctx = setup(cfg)
    try:
        with reporting(cfg.progress_interval, ctx.log, enabled=ctx.accelerator.is_main_process):
            walk(ctx)
    except KeyboardInterrupt:
        ctx.run_dir.fail("interrupted", f"interrupted during stage {ctx.run_dir.report.get('running_stage')!r}")
        raise
    except BaseException as exc:
        ctx.run_dir.fail("failed", " ".join(str(exc).split()) or type(exc).__name__)
        raise
    return summarise(ctx)
