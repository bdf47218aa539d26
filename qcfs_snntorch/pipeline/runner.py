"""run(cfg): setup, then every wanted stage in the fixed order, then the summary."""

from __future__ import annotations

from ..config import RunConfig
from . import plots
from .context import RunContext
from .dependencies import NEEDS, fingerprints, plan
from .fingerprints import digest
from .setup import setup
from .stages import STAGE_CLASSES, Stage
from .tables import accuracy_table

__all__ = ["STAGES", "run", "walk"]

STAGES: tuple[Stage, ...] = tuple(cls() for cls in STAGE_CLASSES)


def walk(ctx: RunContext, stages: tuple[Stage, ...] = STAGES) -> None:
    """Run or (``resume=true``, same fingerprint, nothing upstream rerun) restore each wanted stage.

    A stage that runs on a resumed run directory first loses the files it writes (its ``writes``):
    nothing of an earlier experiment can be read back as this one's result.
    """
    cfg, run_dir = ctx.cfg, ctx.run_dir
    wanted = [stage for stage in stages if stage.wanted(cfg)]
    now = fingerprints(cfg, [stage.name for stage in wanted])
    ctx.digests = {name: digest(fingerprint) for name, fingerprint in now.items()}
    saved = {stage.name: (run_dir.saved_stage(stage.name) or {}).get("fingerprint") if cfg.resume else None for stage in wanted}
    reusable = plan(now, saved)
    reran: set[str] = set()  # stages that ran although reusable (their files could not be restored)
    for stage in wanted:
        fingerprint = now[stage.name]
        if reusable[stage.name] and not reran & set(NEEDS[stage.name].after) and stage.restore(ctx):
            run_dir.restore(stage.name, stage.outputs)
            continue
        if cfg.resume:
            run_dir.discard(stage.writes)
            ctx.accelerator.wait_for_everyone()
        with run_dir.stage(stage.name, fingerprint) as parts:
            parts.update(stage.run(ctx))
        reran.add(stage.name)


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
        walk(ctx)
    except KeyboardInterrupt:
        ctx.run_dir.fail("interrupted", f"interrupted during stage {ctx.run_dir.report.get('running_stage')!r}")
        raise
    except BaseException as exc:
        ctx.run_dir.fail("failed", " ".join(str(exc).split()) or type(exc).__name__)
        raise
    return summarise(ctx)
