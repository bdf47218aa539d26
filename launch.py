"""qcfs_snntorch's main job: timm model → QCFS ANN → SNN → accuracy at every T → fine-tuned SNN.

    accelerate launch launch.py                                   # recipe "quickstart"
    accelerate launch launch.py recipe=cifar10_jpeg_cpu train.epochs=5
    python launch.py recipe=quickstart stages=[convert,eval,finetune] model.checkpoint=runs/…/ann.safetensors
    python launch.py --help

Arguments are ``key.sub=value`` overrides of the recipe (``recipes/<name>.yaml``),
checked against the schema in ``qcfs_snntorch/config.py``. Every rank runs this script;
the main process chooses the run directory and writes every file.
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

import qcfs_snntorch as qs
from qcfs_snntorch import plots
from qcfs_snntorch.calibrate import calibrate_from_data
from qcfs_snntorch.calibrate_snn import calibrate_potentials
from qcfs_snntorch.checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_resume,
    load_weights,
    previous_report,
    save_weights,
)
from qcfs_snntorch.config import STAGES, ConfigError, list_recipes, load_config, to_yaml
from qcfs_snntorch.data import DataError, build_datasets
from qcfs_snntorch.evaluate import evaluate_ann, evaluate_snn
from qcfs_snntorch.export import ExportError, export_nir
from qcfs_snntorch.finetune import TimeAveraged, finetune_loss
from qcfs_snntorch.report import RunLog, accuracy_table, write_report
from qcfs_snntorch.stats import conversion_error, error_table, spike_stats, stats_tables
from qcfs_snntorch.train import TrainingDiverged, TrainingOutOfMemory, fit, latest_checkpoint, make_accelerator

USER_ERRORS = (
    ConfigError, DataError, CheckpointError, qs.UnknownModelError, qs.ConversionError, ExportError, TrainingDiverged,
    TrainingOutOfMemory,
)


def choose_run_dir(cfg, state: PartialState) -> Path:
    """Picked once on the main process and shared, so every rank writes to the same place."""
    chosen = [None]
    if state.is_main_process:
        if cfg.run_dir:
            path = Path(cfg.run_dir)
            if path.exists() and any(path.iterdir()) and not cfg.resume:
                raise ConfigError(f"run_dir {str(path)!r} already holds a run; add resume=true to continue it, or choose a new run_dir")
            if cfg.resume:
                check_resume(path, cfg)  # before config.yaml is rewritten: same model, schema-valid config
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path(cfg.output_dir) / f"{cfg.recipe}-{stamp}"
            n = 1
            while path.exists():
                n += 1
                path = Path(cfg.output_dir) / f"{cfg.recipe}-{stamp}-{n}"
        path.mkdir(parents=True, exist_ok=True)
        chosen = [str(path)]
    broadcast_object_list(chosen)
    return Path(chosen[0])


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    state = PartialState()
    set_seed(cfg.seed)

    # Everything that can fail on bad input fails here, before any work or any file.
    with state.main_process_first():
        train_set, eval_set, info = build_datasets(cfg.data, seed=cfg.seed)
    ann = qs.create_model(
        cfg.model.name,
        num_classes=info.num_classes,
        levels=cfg.model.levels,
        threshold=cfg.model.threshold,
        activations=cfg.model.activations,
        cifar_stem=cfg.model.cifar_stem,
        pretrained=cfg.model.pretrained,
        **{"in_chans": info.in_chans, **cfg.model.kwargs},
    )
    thresholds_lacking = not cfg.model.checkpoint
    if cfg.model.checkpoint:
        # With threshold_init=data the weights may come from the same network with ReLU
        # (no λ in the file): λ is then set from activation statistics below. A file that
        # holds λ keeps it: those are trained thresholds, not a starting point.
        relu_start = cfg.model.threshold_init == "data"
        thresholds_of = {f"{name}.threshold" for name, m in ann.named_modules() if isinstance(m, qs.QCFS)}
        thresholds_lacking = bool(load_weights(ann, cfg.model.checkpoint, may_lack=thresholds_of.__contains__ if relu_start else None))
    spiking_stages = {"convert", "eval", "finetune", "export"} & set(cfg.stages)
    if spiking_stages:
        verdict = qs.check(ann)
        if not verdict.convertible:
            raise qs.ConversionError(verdict)
    if "export" in cfg.stages:  # exportability depends on the architecture only: find out now, not after training
        with tempfile.TemporaryDirectory() as scratch:
            export_nir(qs.convert(ann), Path(scratch) / "probe.nir", eval_set[0][0].unsqueeze(0))

    run_dir = choose_run_dir(cfg, state)
    # Resuming: stages the report already records as complete are reused, not run again.
    done = previous_report(run_dir) if cfg.resume else {}
    accelerator = make_accelerator(cfg.mixed_precision, log_with=cfg.log_with, project_dir=run_dir)
    main_process = accelerator.is_main_process
    log = RunLog(run_dir, enabled=main_process)
    if main_process:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    if cfg.log_with:
        accelerator.init_trackers("tracking", config={"recipe": cfg.recipe, "model": cfg.model.name, "levels": cfg.model.levels})
    log(f"run directory: {run_dir}  ({accelerator.num_processes} process(es), {accelerator.device}, mixed_precision={cfg.mixed_precision})")
    log(f"model {cfg.model.name}: replaced {ann.qcfs_surgery}")
    log(f"dataset {info.name}: {len(train_set)} train / {len(eval_set)} eval images")

    loader_args = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, **loader_args)
    eval_loader = accelerator.prepare(DataLoader(eval_set, batch_size=cfg.data.eval_batch_size, **loader_args))
    # A resumed run whose ANN comes back from run_dir needs no calibration; one killed before its first checkpoint does.
    ann_from_run_dir = cfg.resume and ((run_dir / "ann.safetensors").is_file() or latest_checkpoint(run_dir / "checkpoints" / "ann"))
    if cfg.model.threshold_init == "data" and thresholds_lacking and not ann_from_run_dir:
        # λ from the inputs each QCFS sees (a high percentile), so training starts with every
        # level in use; BN statistics too unless they come from trained weights.
        batches = [images for images, _ in itertools.islice(iter(DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True)), 8)]
        calibrate_from_data(ann, batches, percentile=cfg.model.threshold_percentile,
                            update_bn=not (cfg.model.checkpoint or cfg.model.pretrained))
        log(f"λ initialised from data: {[round(m.threshold.item(), 3) for m in ann.modules() if isinstance(m, qs.QCFS)]}")
    sample = torch.stack([eval_set[i][0] for i in range(min(cfg.snn.stats_samples, len(eval_set)))]).to(accelerator.device)

    report = {
        "recipe": cfg.recipe,
        "model": cfg.model.name,
        "dataset": info.name,
        "levels": cfg.model.levels,
        "run_dir": str(run_dir),
        "status": "running",
        "stages": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "qcfs_snntorch": qs.__version__,
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": cfg.mixed_precision,
        },
    }

    def finish_stage(name: str, started: float) -> None:
        report["stages"][name] = {"seconds": round(time.perf_counter() - started, 2)}
        if main_process:
            write_report(run_dir / "report.json", report)

    def thresholds(model) -> dict:
        return {"thresholds": [round(m.threshold.item(), 4) for m in model.modules() if isinstance(m, qs.QCFS)]}

    # --- check ----------------------------------------------------------------------------
    if "check" in cfg.stages:
        started = time.perf_counter()
        verdict = qs.check(ann)
        log(verdict.summary())
        report["check"] = {"convertible": verdict.convertible, "problems": [str(p) for p in verdict.problems]}
        finish_stage("check", started)

    # --- train the QCFS ANN -----------------------------------------------------------------
    ann_done = len(done.get("ann", {}).get("history", [])) == cfg.train.epochs and (run_dir / "ann.safetensors").is_file()
    ann_reused = "train" in cfg.stages and "train" in done.get("stages", {}) and ann_done
    if ann_reused:
        load_weights(ann, run_dir / "ann.safetensors")
        report["ann"], report["stages"]["train"] = done["ann"], done["stages"]["train"]
        log(f"[ANN] training was complete: reusing {run_dir / 'ann.safetensors'}")
    elif "train" in cfg.stages:
        started = time.perf_counter()
        history = fit(
            ann,
            train_loader,
            cfg=cfg.train,
            accelerator=accelerator,
            checkpoint_dir=run_dir / "checkpoints" / "ann",
            evaluate=lambda m: evaluate_ann(m, eval_loader, accelerator),
            metrics=thresholds,
            resume=cfg.resume,
            log=log,
            label="ANN",
        )
        report["ann"] = {"top1": history[-1]["eval_top1"] if history else None, "history": history}
        if main_process:
            save_weights(ann, run_dir / "ann.safetensors", {"model": cfg.model.name, "levels": cfg.model.levels})
        finish_stage("train", started)
    ann = ann.to(accelerator.device).eval()
    if report.get("ann", {}).get("top1") is None:
        report["ann"] = {**report.get("ann", {}), "top1": evaluate_ann(ann, eval_loader, accelerator)}
    report["ann"].update(thresholds(ann))

    if not spiking_stages:
        return finish(report, run_dir, accelerator, log)

    # --- convert to an SNN --------------------------------------------------------------------
    started = time.perf_counter()
    snn = qs.convert(
        ann,
        fold_bn=cfg.snn.fold_bn,
        learn_threshold=cfg.finetune.learn_threshold,
        surrogate=cfg.finetune.surrogate,
        surrogate_width=cfg.finetune.surrogate_width,
        chunk_size=cfg.snn.chunk_size,
    ).to(accelerator.device)
    report["convert"] = {"neurons": len(snn.neurons()), "fold_bn": cfg.snn.fold_bn}
    finish_stage("convert", started)

    # --- accuracy at every T, spike statistics, per-layer error ---------------------------------
    same_ann = ann_reused or ("train" not in cfg.stages and "train" not in done.get("stages", {}))  # not retrained here
    if "eval" in cfg.stages and "eval" in done.get("stages", {}) and same_ann and done.get("snn", {}).get("timesteps") == list(cfg.snn.timesteps):
        report.update({k: done[k] for k in ("snn", "spikes", "conversion_error") if k in done})
        report["stages"]["eval"] = done["stages"]["eval"]
        log("[SNN] evaluation was complete: reusing its results")
        log.table(accuracy_table(report))
    elif "eval" in cfg.stages:
        started = time.perf_counter()
        top1 = evaluate_snn(snn, eval_loader, cfg.snn.timesteps, accelerator)
        report["snn"] = {"timesteps": list(cfg.snn.timesteps), "top1": top1}
        if main_process:
            report["spikes"] = spike_stats(snn, sample, cfg.snn.stats_timesteps)
            report["conversion_error"] = conversion_error(ann, snn, sample, cfg.snn.timesteps)
            for table in stats_tables(report["spikes"]):
                log.table(table)
            log.table(error_table(report["conversion_error"]))
            plots.plot_firing_rates(report["spikes"], run_dir / "firing_rates.png")
            plots.plot_conversion_error(report["conversion_error"], run_dir / "conversion_error.png")
            accelerator.log({f"snn/firing_rate/{n['name']}": n["firing_rate"] for n in report["spikes"]["neurons"]})
        finish_stage("eval", started)
        log.table(accuracy_table(report))

    # --- conversion-time calibration of v(0), one SNN per target T ---------------------------------
    if cfg.snn.calibrate and ("eval" in cfg.stages or "finetune" in cfg.stages):
        started = time.perf_counter()
        calib_x = torch.stack([train_set[i][0] for i in range(min(cfg.snn.calibrate_samples, len(train_set)))]).to(accelerator.device)
        calibrated = {"methods": list(cfg.snn.calibrate), "timesteps": [], "top1": [], "layers": {}}
        for steps in sorted(set(cfg.snn.calibrate_timesteps) | ({cfg.finetune.timesteps} if "finetune" in cfg.stages else set())):
            candidate = copy.deepcopy(snn)
            fitted = calibrate_potentials(ann, candidate, calib_x, steps, cfg.snn.calibrate)
            calibrated["timesteps"].append(steps)
            calibrated["top1"].append(evaluate_snn(candidate, eval_loader, [steps], accelerator)[0])
            calibrated["layers"][str(steps)] = fitted["layers"]
            log(f"[SNN] calibrated ({'+'.join(cfg.snn.calibrate)}) for T={steps}: top-1 {calibrated['top1'][-1]:.4f}")
            if steps == cfg.finetune.timesteps:
                snn = candidate  # fine-tuning starts from the SNN calibrated for its T
        report["calibration"] = calibrated
        finish_stage("calibrate", started)

    # --- hybrid fine-tuning of the SNN ------------------------------------------------------------
    phases = [*cfg.finetune.progressive, cfg.finetune.timesteps]  # progressive: e.g. T = 4, then 2
    snn_done = len(done.get("finetune", {}).get("history", [])) == cfg.finetune.epochs * len(phases) and (run_dir / "snn.safetensors").is_file()
    if "finetune" in cfg.stages and "finetune" in done.get("stages", {}) and snn_done and same_ann:
        load_weights(snn, run_dir / "snn.safetensors")
        report["finetune"], report["stages"]["finetune"] = done["finetune"], done["stages"]["finetune"]
        log(f"[SNN] fine-tuning was complete: reusing {run_dir / 'snn.safetensors'}")
    elif "finetune" in cfg.stages:
        started = time.perf_counter()
        steps = cfg.finetune.timesteps
        before = evaluate_snn(snn, eval_loader, [steps], accelerator)[0]
        log(f"[SNN] top-1 at T={steps} before fine-tuning: {before:.4f}")
        set_seed(cfg.seed)  # the same RNG stream whether or not the ANN was trained in this process (resume)
        history = []
        for phase in phases:
            wrapped = TimeAveraged(snn, phase, bn=cfg.finetune.bn, per_step=cfg.finetune.loss == "tet",
                                   timesteps_choices=cfg.finetune.timesteps_choices, seed=cfg.seed,
                                   teacher=ann if cfg.finetune.distill else None)
            phase_history = fit(
                wrapped,
                train_loader,
                cfg=cfg.finetune,
                accelerator=accelerator,
                checkpoint_dir=run_dir / "checkpoints" / ("snn" if len(phases) == 1 else f"snn_T{phase}"),
                evaluate=lambda m: evaluate_snn(m.snn, eval_loader, [m.timesteps], accelerator)[0],
                resume=cfg.resume,
                log=log,
                loss_fn=finetune_loss(wrapped, loss=cfg.finetune.loss, label_smoothing=cfg.finetune.label_smoothing,
                                      distill=cfg.finetune.distill, temperature=cfg.finetune.distill_temperature),
                label=f"SNN T={phase}",
            )
            history += [{**entry, "timesteps": phase} for entry in phase_history]
        timesteps = sorted(set(cfg.snn.timesteps) | {steps})
        after = evaluate_snn(snn, eval_loader, timesteps, accelerator)
        report["finetune"] = {
            "timesteps": steps,
            "top1_before": before,
            "top1_after": after[timesteps.index(steps)],
            "snn_after": {"timesteps": timesteps, "top1": after},
            "history": history,
        }
        if main_process:
            save_weights(snn, run_dir / "snn.safetensors", {"model": cfg.model.name, "timesteps": steps})
        finish_stage("finetune", started)
        log(f"[SNN] top-1 at T={steps}: {before:.4f} before, {report['finetune']['top1_after']:.4f} after fine-tuning")
        log.table(accuracy_table(report))

    if main_process and "snn" in report:
        plots.plot_accuracy_vs_timesteps(
            {t: 100 * a for t, a in zip(report["snn"]["timesteps"], report["snn"]["top1"])},
            run_dir / "accuracy_vs_timesteps.png",
            ann=100 * report["ann"]["top1"],
            finetuned={t: 100 * a for t, a in zip(*report["finetune"]["snn_after"].values())} if "finetune" in report else None,
            title=f"{cfg.model.name} on {info.name}",
        )

    # --- NIR export of the final SNN -------------------------------------------------------------
    if "export" in cfg.stages:
        started = time.perf_counter()
        if main_process:
            export_nir(snn, run_dir / "snn.nir", sample[:1])
        report["export"] = {"nir": str(run_dir / "snn.nir")}
        finish_stage("export", started)
        log(f"NIR graph: {run_dir / 'snn.nir'} (deviations from the model: docs/NIR.md)")

    return finish(report, run_dir, accelerator, log)


def finish(report: dict, run_dir: Path, accelerator, log) -> dict:
    report["status"] = "complete"
    if accelerator.is_main_process:
        write_report(run_dir / "report.json", report)
    log(f"report: {run_dir / 'report.json'}")
    accelerator.end_training()
    return report


HELP = f"""usage: [accelerate launch] launch.py [recipe=NAME] [key.sub=value ...]

recipes: {', '.join(list_recipes())}
stages:  {', '.join(STAGES)} (e.g. stages=[convert,eval] model.checkpoint=PATH)
keys:    see qcfs_snntorch/config.py (model.*, data.*, train.*, snn.*, finetune.*, seed, run_dir, resume, ...)
Set QCFS_SNNTORCH_TRACEBACK=1 to see the full traceback of an error."""


if __name__ == "__main__":
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(HELP)
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except USER_ERRORS as exc:
        if os.environ.get("QCFS_SNNTORCH_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:  # outside training (fit translates its own): evaluation, statistics, export
        if os.environ.get("QCFS_SNNTORCH_TRACEBACK"):
            raise
        print("error: out of accelerator memory outside training (evaluation, spike statistics or export): lower "
              "data.eval_batch_size, snn.chunk_size or snn.stats_samples; add resume=true to keep the stages already done",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: checkpoints already written are complete; rerun the same command with run_dir=<the run "
              "directory> resume=true to continue", file=sys.stderr)
        sys.exit(130)
