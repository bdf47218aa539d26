"""run(cfg): setup, then every wanted stage in the fixed order, then the summary."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..progress import reporting
from . import plots
from .context import RunContext
from .dependencies import NEEDS, fingerprints, reusable
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


def plan(cfg: RunConfig, previous: dict, stages: tuple[Stage, ...] = STAGES) -> list[Step]:
    """The wanted stages in order, each marked reused when ``resume=true``, the resumed run's report
    (``previous``) recorded it under today's fingerprint (pipeline/dependencies.py) and no stage it
    reads from reruns. :func:`walk` and ``--dry-run`` both decide by this one rule.
    """
    wanted = [stage for stage in stages if stage.wanted(cfg)]
    now = fingerprints(cfg, [stage.name for stage in wanted])
    recorded = previous.get("stages", {}) if cfg.resume else {}
    saved = {stage.name: (recorded.get(stage.name) or {}).get("fingerprint") for stage in wanted}
    reuse = reusable(now, saved)
    return [Step(stage, now[stage.name], reuse[stage.name]) for stage in wanted]


def walk(ctx: RunContext, stages: tuple[Stage, ...] = STAGES) -> None:
    """Run or (``resume=true``, same fingerprint, nothing upstream rerun) restore each wanted stage.

    A stage that runs on a resumed run directory first loses the files it writes (its ``writes``):
    nothing of an earlier experiment can be read back as this one's result.
    """
    cfg, run_dir = ctx.cfg, ctx.run_dir
    steps = plan(cfg, run_dir.previous, stages)
    ctx.digests = {step.stage.name: digest(step.fingerprint) for step in steps}
    reran: set[str] = set()  # stages that ran although reusable (their files could not be restored)
    for step in steps:
        name = step.stage.name
        if step.reuse and not reran & set(NEEDS[name].after) and step.stage.restore(ctx):
            run_dir.restore(name, step.stage.outputs)
            continue
        if cfg.resume:
            run_dir.discard(step.stage.writes)
            ctx.accelerator.wait_for_everyone()
        with run_dir.stage(name, step.fingerprint) as parts:
            parts.update(step.stage.run(ctx))
        reran.add(name)


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
