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

import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

import qcfs_snntorch as qs
from qcfs_snntorch.checkpoint import CheckpointError, atomic_write_text, load_weights, save_weights
from qcfs_snntorch.config import STAGES, ConfigError, list_recipes, load_config, to_yaml
from qcfs_snntorch.data import DataError, build_datasets
from qcfs_snntorch.evaluate import evaluate_ann, evaluate_snn
from qcfs_snntorch.finetune import TimeAveraged
from qcfs_snntorch.report import RunLog, accuracy_table, write_report
from qcfs_snntorch.train import TrainingDiverged, fit, make_accelerator

USER_ERRORS = (ConfigError, DataError, CheckpointError, qs.UnknownModelError, qs.ConversionError, TrainingDiverged)


def choose_run_dir(cfg, accelerator: Accelerator) -> Path:
    """Picked once on the main process and shared, so every rank writes to the same place."""
    chosen = [None]
    if accelerator.is_main_process:
        if cfg.run_dir:
            path = Path(cfg.run_dir)
            if path.exists() and any(path.iterdir()) and not cfg.resume:
                raise ConfigError(f"run_dir {str(path)!r} already holds a run; add resume=true to continue it, or choose a new run_dir")
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
    accelerator = make_accelerator(cfg.mixed_precision)
    set_seed(cfg.seed)

    # Build everything that can fail on bad input before any work is done.
    with accelerator.main_process_first():
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
    if cfg.model.checkpoint:
        load_weights(ann, cfg.model.checkpoint)
    if set(cfg.stages) & {"convert", "eval", "finetune", "export"}:
        report_check = qs.check(ann)
        if not report_check.convertible:
            raise qs.ConversionError(report_check)

    run_dir = choose_run_dir(cfg, accelerator)
    main_process = accelerator.is_main_process
    log = RunLog(run_dir, enabled=main_process)
    if main_process:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    log(f"run directory: {run_dir}  ({accelerator.num_processes} process(es), {accelerator.device}, mixed_precision={cfg.mixed_precision})")
    log(f"model {cfg.model.name}: replaced {ann.qcfs_surgery}; dataset {info.name}: {len(train_set)} train / {len(eval_set)} eval")

    loader_args = dict(num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, **loader_args)
    eval_loader = accelerator.prepare(DataLoader(eval_set, batch_size=cfg.data.eval_batch_size, **loader_args))

    report = {
        "recipe": cfg.recipe,
        "model": cfg.model.name,
        "dataset": info.name,
        "levels": cfg.model.levels,
        "run_dir": str(run_dir),
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

    # --- check ---------------------------------------------------------------------------
    if "check" in cfg.stages:
        started = time.perf_counter()
        result = qs.check(ann)
        log(result.summary())
        report["check"] = {"convertible": result.convertible, "problems": [str(p) for p in result.problems]}
        finish_stage("check", started)

    # --- train the QCFS ANN ---------------------------------------------------------------
    if "train" in cfg.stages:
        started = time.perf_counter()
        history = fit(
            ann,
            train_loader,
            cfg=cfg.train,
            accelerator=accelerator,
            checkpoint_dir=run_dir / "checkpoints" / "ann",
            evaluate=lambda m: evaluate_ann(m, eval_loader, accelerator),
            resume=cfg.resume,
            log=log,
            label="ANN",
        )
        ann = ann.to(accelerator.device)
        report["ann"] = {"top1": history[-1]["eval_top1"] if history else evaluate_ann(ann, eval_loader, accelerator), "history": history}
        if main_process:
            save_weights(ann, run_dir / "ann.safetensors", {"model": cfg.model.name, "levels": cfg.model.levels})
        finish_stage("train", started)
    ann = ann.to(accelerator.device).eval()
    report["ann"] = report.get("ann") or {"top1": evaluate_ann(ann, eval_loader, accelerator)}
    report["ann"]["thresholds"] = [round(m.threshold.item(), 4) for m in ann.modules() if isinstance(m, qs.QCFS)]

    # --- convert to an SNN -----------------------------------------------------------------
    snn = None
    if set(cfg.stages) & {"convert", "eval", "finetune", "export"}:
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

    # --- accuracy at every T -----------------------------------------------------------------
    if "eval" in cfg.stages:
        started = time.perf_counter()
        top1 = evaluate_snn(snn, eval_loader, cfg.snn.timesteps, accelerator)
        report["snn"] = {"timesteps": list(cfg.snn.timesteps), "top1": top1}
        finish_stage("eval", started)
        log.table(accuracy_table(report))

    # --- hybrid fine-tuning of the SNN ---------------------------------------------------------
    if "finetune" in cfg.stages:
        started = time.perf_counter()
        steps = cfg.finetune.timesteps
        before = evaluate_snn(snn, eval_loader, [steps], accelerator)[0]
        log(f"[SNN] top-1 at T={steps} before fine-tuning: {before:.4f}")
        trainable = TimeAveraged(snn, steps, bn=cfg.finetune.bn)
        history = fit(
            trainable,
            train_loader,
            cfg=cfg.finetune,
            accelerator=accelerator,
            checkpoint_dir=run_dir / "checkpoints" / "snn",
            evaluate=lambda m: evaluate_snn(m.snn, eval_loader, [steps], accelerator)[0],
            resume=cfg.resume,
            log=log,
            label=f"SNN T={steps}",
        )
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

    report["status"] = "complete"
    if main_process:
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
