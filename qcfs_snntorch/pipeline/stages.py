"""The stages of a run, one small class each, in the order the runner walks them.

Every stage has the same three methods:

- ``wanted(cfg)``: does this run do it;
- ``run(ctx)``: do it; set ``ctx.ann`` / ``ctx.snn`` for the next stages and return the
  report parts it owns (the keys in ``outputs``);
- ``restore(ctx)``: with ``resume=true`` and an unchanged fingerprint, bring its result
  back from the run directory instead (False: it cannot, so it runs).

What a stage's result depends on (its fingerprint, and the stages it reads from) is not
here but in the one table of :mod:`.dependencies`. ``writes`` names the files of the run
directory it writes: a stage that reruns on a resumed run loses them first. Its training
checkpoints live under ``checkpoints/`` and are kept only when written under compatible
settings (:meth:`.context.RunContext.checkpoints`).
"""

from __future__ import annotations

import copy
from collections import Counter

from accelerate.utils import set_seed

from ..calibration import calibrate_potentials
from ..compensation import compensated_ops
from ..convert import convert, preferred_memory_format, to_memory_format
from ..export import export_nir
from ..qcfs import set_threshold_gradient
from ..spiking import SpikingModel
from ..stats import conversion_error, spike_stats
from ..tracing import qcfs_layers
from ..training import (
    CheckpointDir,
    Classification,
    SpikingFinetune,
    broadcast_state,
    evaluate_ann,
    evaluate_ann_at_levels,
    evaluate_snn,
    evaluate_snn_exits,
    fit,
    load_weights,
    read_metadata,
    save_weights,
)
from . import plots
from .context import RunContext
from .load import weights_metadata
from .setup import initial_thresholds, thresholds_from_data
from .tables import early_exit_table, error_table, stats_tables

__all__ = ["STAGE_CLASSES", "Calibrate", "Check", "Convert", "Eval", "Export", "Finetune", "Stage", "Train"]

class Stage:
    name: str = ""
    outputs: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def wanted(self, cfg) -> bool:
        return self.name in cfg.stages

    def run(self, ctx: RunContext) -> dict:
        raise NotImplementedError

    def restore(self, ctx: RunContext) -> bool:
        return True


class Check(Stage):
    """Report what converts and what does not (the verdict setup computed once)."""

    name, outputs = "check", ("check",)


    def run(self, ctx: RunContext) -> dict:
        verdict = ctx.verdict
        ctx.log(verdict.summary())
        return {"check": {"convertible": verdict.convertible, "problems": [str(p) for p in verdict.problems],
                          "counts": verdict.counts(), "compensated": [str(p) for p in verdict.compensated]}}


def _thresholds(model) -> dict:
    return {"thresholds": [round(act.threshold.item(), 4) for act in qcfs_layers(model)]}


class Train(Stage):
    """Train the QCFS ANN (λ was set from data in setup where asked; with ``train.relu_epochs``, again from
    the ReLU network its first epochs trained); save ``ann.safetensors``."""

    name, outputs, writes = "train", ("ann",), ("ann.safetensors",)

    def run(self, ctx: RunContext) -> dict:
        cfg = ctx.cfg
        initial_thresholds(ctx)  # a checkpoint training continues from brings its own λ back
        set_threshold_gradient(ctx.ann, cfg.train.threshold_gradient)
        if ctx.accelerator.device.type == "cuda":  # cuDNN's fastest layout; a CPU trained no faster in it (docs/BENCHMARKS.md)
            to_memory_format(ctx.ann, preferred_memory_format(ctx.ann))
        history = fit(
            ctx.ann, ctx.train_loader(), cfg=cfg.train, accelerator=ctx.accelerator,
            checkpoints=ctx.checkpoints("ann", ctx.checkpoint_fingerprint(self.name)),
            task=Classification(cfg.train.label_smoothing, levels_choices=cfg.train.levels_choices, seed=cfg.seed,
                                relu_epochs=cfg.train.relu_epochs, measure_thresholds=lambda m: thresholds_from_data(ctx, m)),
            evaluate=lambda m: evaluate_ann(m, ctx.selection, ctx.accelerator), metrics=_thresholds,
            resume=cfg.resume, log=ctx.log, label="ANN", name="train",
        )
        ctx.ann.eval()
        ctx.ann_accuracy = ctx.accuracy(lambda loader: evaluate_ann(ctx.ann, loader, ctx.accelerator))
        if ctx.accelerator.is_main_process:
            save_weights(ctx.ann, ctx.run_dir.file("ann.safetensors"), weights_metadata(ctx, "ann"))
        ctx.log(f"[ANN] test top-1 {ctx.ann_accuracy['top1']:.4f}" + _val_text(ctx.ann_accuracy))
        return {"ann": {**ctx.ann_accuracy, "history": history, **_thresholds(ctx.ann)}}

    def restore(self, ctx: RunContext) -> bool:
        path = ctx.run_dir.file("ann.safetensors")
        if not path.is_file():
            return False
        load_weights(ctx.ann, path)
        ctx.thresholds_lacking = False  # the trained λ came back with the weights
        ctx.ann.eval()
        saved = ctx.run_dir.previous.get("ann", {})
        ctx.ann_accuracy = {"val_top1": saved.get("val_top1"), "top1": saved.get("top1")}
        ctx.log(f"[ANN] training was complete: reusing {path}")
        return True


def _val_text(accuracy: dict) -> str:
    return f" (validation {accuracy['val_top1']:.4f})" if accuracy.get("val_top1") is not None else ""


class Convert(Stage):
    """QCFS → IF neurons. Where this run did not train the ANN, it is measured first."""

    name, outputs = "convert", ("convert", "ann")

    def wanted(self, cfg) -> bool:
        return bool(set(cfg.stages) & {"convert", "eval", "calibrate", "finetune", "export"})

    def _convert(self, ctx: RunContext) -> None:
        cfg = ctx.cfg
        initial_thresholds(ctx)  # no train stage: the ANN as built, with λ from data where asked
        ctx.ann.eval()
        ctx.snn = convert(ctx.ann, fold_bn=cfg.snn.fold_bn, learn_threshold=cfg.finetune.learn_threshold,
                          surrogate=cfg.finetune.surrogate, surrogate_width=cfg.finetune.surrogate_width,
                          detach_reset=cfg.finetune.detach_reset, chunk_size=cfg.snn.chunk_size,
                          max_spikes=cfg.snn.max_spikes, neuron=cfg.snn.neuron, strict=cfg.snn.strict,
                          verify=False).to(ctx.accelerator.device)

    def run(self, ctx: RunContext) -> dict:
        parts = {}
        initial_thresholds(ctx)
        if ctx.ann_accuracy is None:
            ctx.ann.eval()
            ctx.ann_accuracy = ctx.accuracy(lambda loader: evaluate_ann(ctx.ann, loader, ctx.accelerator))
            parts["ann"] = {**ctx.ann_accuracy, **_thresholds(ctx.ann)}
            ctx.log(f"[ANN] test top-1 {ctx.ann_accuracy['top1']:.4f}" + _val_text(ctx.ann_accuracy))
        self._convert(ctx)
        compensated = Counter(op.kind for op in compensated_ops(ctx.snn.net))
        return {**parts, "convert": {"neurons": len(ctx.snn.neurons()), "fold_bn": ctx.cfg.snn.fold_bn,
                                     "max_spikes": ctx.cfg.snn.max_spikes, "neuron": ctx.cfg.snn.neuron,
                                     "compensated": dict(compensated)}}

    def restore(self, ctx: RunContext) -> bool:
        if ctx.ann_accuracy is None:
            saved = ctx.run_dir.previous.get("ann", {})
            ctx.ann_accuracy = {"val_top1": saved.get("val_top1"), "top1": saved.get("top1")}
        self._convert(ctx)
        return True


def _lists(exits: dict) -> dict:
    """The per-τ measurements of an early-exit result (one list entry per threshold)."""
    return {key: exits[key] for key in ("top1", "mean_steps", "p95_steps", "max_steps")}


def _exit_menu(cfg, val: dict | None, test: dict, evaluated: list[int], reference: int) -> dict:
    """The early-exit report: every τ on both splits, and the τ chosen on validation (else test):
    the fewest mean steps within ``snn.early_exit_tolerance`` of the accuracy at the fixed reference T."""
    chooser = val or test
    bar = chooser["top1"][evaluated.index(reference)] - cfg.early_exit_tolerance
    menu = _lists(chooser["early_exit"])
    fitting = [i for i, acc in enumerate(menu["top1"]) if acc >= bar]
    chosen = min(fitting, key=lambda i: menu["mean_steps"][i]) if fitting else None

    def at_chosen(result):
        return {key: value[chosen] for key, value in _lists(result["early_exit"]).items()}

    return {
        "rule": cfg.early_exit_rule, "max_timesteps": max(evaluated), "thresholds": list(cfg.early_exit),
        "val": _lists(val["early_exit"]) if val else None, "test": _lists(test["early_exit"]),
        "reference": {"timesteps": reference, "top1": test["top1"][evaluated.index(reference)],
                      "val_top1": val["top1"][evaluated.index(reference)] if val else None},
        "chosen": None if chosen is None else {"threshold": cfg.early_exit[chosen], "chosen_on": "val" if val else "test",
                                               "val": at_chosen(val) if val else None, "test": at_chosen(test)},
    }


def spiking_accuracy(ctx: RunContext, snn: SpikingModel, timesteps: list[int]) -> tuple[dict, dict | None]:
    """``snn``'s top-1 at every T (validation and test) and its early-exit menu, one pass per split."""
    cfg = ctx.cfg.snn
    reference = min(cfg.early_exit_reference, max(timesteps))
    evaluated = sorted(set(timesteps) | ({reference} if cfg.early_exit else set()))

    def run(loader):
        return evaluate_snn_exits(snn, loader, evaluated, ctx.accelerator, exit_thresholds=cfg.early_exit,
                                  exit_rule=cfg.early_exit_rule)

    val, test = run(ctx.val) if ctx.val is not None else None, run(ctx.test)
    rows = [evaluated.index(t) for t in timesteps]
    accuracy = {"timesteps": list(timesteps), "top1": [test["top1"][i] for i in rows],
                "val_top1": [val["top1"][i] for i in rows] if val else None}
    return accuracy, (_exit_menu(cfg, val, test, evaluated, reference) if cfg.early_exit else None)


class Eval(Stage):
    """The converted SNN at every T (and the ANN at L = B·T), early exit, spike statistics, per-layer error."""

    name, outputs, writes = "eval", ("snn", "spikes", "conversion_error"), ("firing_rates.png", "conversion_error.png")


    def run(self, ctx: RunContext) -> dict:
        cfg, accelerator = ctx.cfg, ctx.accelerator
        timesteps = list(cfg.snn.timesteps)
        accuracy, exits = spiking_accuracy(ctx, ctx.snn, timesteps)
        # An SNN of B-spike neurons at T steps approximates the ANN at L = B·T.
        levels = [cfg.snn.max_spikes * t for t in timesteps]
        at_levels = evaluate_ann_at_levels(ctx.ann, ctx.test, levels, accelerator)
        parts = {"snn": {**accuracy, "max_spikes": cfg.snn.max_spikes, "ann_at_levels": {"levels": levels, "top1": at_levels},
                         **({"early_exit": exits} if exits else {})}}
        if exits:
            ctx.log.table(early_exit_table(exits))
        if accelerator.is_main_process:
            sample = ctx.statistics_batch()
            parts["spikes"] = spike_stats(ctx.snn, sample, cfg.snn.stats_timesteps)
            parts["conversion_error"] = conversion_error(ctx.ann, ctx.snn, sample, timesteps)
            for table in stats_tables(parts["spikes"]):
                ctx.log.table(table)
            ctx.log.table(error_table(parts["conversion_error"]))
            plots.plot_firing_rates(parts["spikes"], ctx.run_dir.file("firing_rates.png"))
            plots.plot_conversion_error(parts["conversion_error"], ctx.run_dir.file("conversion_error.png"))
            accelerator.log({f"snn/firing_rate/{n['name']}": n["firing_rate"] for n in parts["spikes"]["neurons"]})
        return parts


class Calibrate(Stage):
    """v(0) fitted per layer or channel for each T (no training); the SNN fine-tuning starts from
    is the calibrated one for its T, unless the plain one is better on the validation split."""

    name, outputs, writes = "calibrate", ("calibration",), ("calibrated.safetensors",)

    def wanted(self, cfg) -> bool:
        return bool(cfg.snn.calibrate) and bool(set(cfg.stages) & {"calibrate", "eval", "finetune"})


    def targets(self, cfg) -> list[int]:
        extra = {cfg.finetune.timesteps} if "finetune" in cfg.stages else set()
        return sorted(set(cfg.snn.calibrate_timesteps) | extra)

    def run(self, ctx: RunContext) -> dict:
        cfg, accelerator = ctx.cfg, ctx.accelerator
        x = ctx.calibration_batch()
        result = {"methods": list(cfg.snn.calibrate), "timesteps": [], "top1": [], "val_top1": [], "layers": {}}
        start = None
        for steps in self.targets(cfg):
            candidate = copy.deepcopy(ctx.snn)
            fitted = calibrate_potentials(ctx.ann, candidate, x, steps, cfg.snn.calibrate)
            broadcast_state(candidate, accelerator)  # every rank fine-tunes and evaluates rank 0's v(0)
            accuracy = ctx.accuracy(lambda loader, c=candidate, t=steps: evaluate_snn(c, loader, [t], accelerator)[0])
            result["timesteps"].append(steps)
            result["top1"].append(accuracy["top1"])
            result["val_top1"].append(accuracy["val_top1"])
            result["layers"][str(steps)] = fitted["layers"]
            ctx.log(f"[SNN] calibrated ({'+'.join(cfg.snn.calibrate)}) for T={steps}: test top-1 {accuracy['top1']:.4f}"
                    + _val_text(accuracy))
            if "finetune" in cfg.stages and steps == cfg.finetune.timesteps:
                start = self._choose(ctx, candidate, steps, accuracy, result)
        if start is not None:
            ctx.snn = start
            if accelerator.is_main_process:
                save_weights(ctx.snn, ctx.run_dir.file("calibrated.safetensors"), weights_metadata(ctx, "calibrated"))
        return {"calibration": result}

    def _choose(self, ctx: RunContext, candidate: SpikingModel, steps: int, accuracy: dict, result: dict) -> SpikingModel:
        """The calibrated SNN, unless the plain conversion is better at ``steps`` on the validation split."""
        if ctx.val is None:
            result["finetune_start"] = "calibrated"
            return candidate
        plain = evaluate_snn(ctx.snn, ctx.val, [steps], ctx.accelerator)[0]
        keep = accuracy["val_top1"] >= plain
        result["finetune_start"] = "calibrated" if keep else "plain"
        result["plain_val_top1"] = plain
        ctx.log(f"[SNN] fine-tuning starts from the {result['finetune_start']} SNN (validation top-1 at T={steps}: "
                f"calibrated {accuracy['val_top1']:.4f}, plain {plain:.4f})")
        return candidate if keep else ctx.snn

    def restore(self, ctx: RunContext) -> bool:
        if "finetune" not in ctx.cfg.stages:
            return True
        path = ctx.run_dir.file("calibrated.safetensors")
        if not path.is_file():
            return False
        load_weights(ctx.snn, path)
        return True


class _BestOnValidation:
    """The fine-tuned SNN with the best validation accuracy so far, the SNN before fine-tuning included
    (epoch 0), kept in ``best.safetensors`` beside the training checkpoints of the last phase: it
    belongs to them, so it is read back only when they are (the same settings) and removed with them."""

    FILE = "best.safetensors"

    def __init__(self, ctx: RunContext, checkpoints: CheckpointDir, score: float):
        self.ctx, self.path = ctx, checkpoints.path / self.FILE
        self.score, self.epoch = score, 0
        saved = read_metadata(self.path) if ctx.cfg.resume and self.path.is_file() else {}
        if saved.get("val_top1", -1.0) > score:
            self.score, self.epoch = saved["val_top1"], saved["epoch"]
        else:
            self._save()

    def _save(self) -> None:
        if self.ctx.accelerator.is_main_process:
            save_weights(self.ctx.snn, self.path, {**weights_metadata(self.ctx, "snn"), "val_top1": self.score,
                                                   "epoch": self.epoch})

    def offer(self, score: float, epoch: int) -> None:
        if score > self.score:
            self.score, self.epoch = score, epoch
            self._save()

    def keep(self) -> None:
        self.ctx.accelerator.wait_for_everyone()
        load_weights(self.ctx.snn, self.path)


class Finetune(Stage):
    """Hybrid fine-tuning of the SNN through T steps (progressively over several T if asked).

    With ``finetune.keep=best`` (the default) and a validation split, the SNN kept is the one of
    the epoch with the best validation accuracy at T, the SNN before fine-tuning included: on a
    model already at its ANN, more training can only lose."""

    # snn_best.safetensors: where an earlier release kept the best epoch (now in the checkpoints of the stage)
    name, outputs, writes = "finetune", ("finetune",), ("snn.safetensors", "snn_best.safetensors")

    def _task(self, ctx: RunContext, steps: int) -> SpikingFinetune:
        f = ctx.cfg.finetune
        return SpikingFinetune(steps, loss=f.loss, label_smoothing=f.label_smoothing, tet_weight=f.tet_weight,
                               tet_target=f.tet_target, bn=f.bn, timesteps_choices=f.timesteps_choices, seed=ctx.cfg.seed,
                               distill=f.distill, temperature=f.distill_temperature, teacher=ctx.ann if f.distill else None)

    def run(self, ctx: RunContext) -> dict:
        cfg, accelerator = ctx.cfg, ctx.accelerator
        steps = cfg.finetune.timesteps
        before = ctx.accuracy(lambda loader: evaluate_snn(ctx.snn, loader, [steps], accelerator)[0])
        ctx.log(f"[SNN] test top-1 at T={steps} before fine-tuning: {before['top1']:.4f}" + _val_text(before))
        set_seed(cfg.seed)  # the same RNG stream whether or not the ANN was trained in this process (resume)
        phases = [*cfg.finetune.progressive, steps]  # progressive: e.g. T = 4, then 2
        fingerprint = ctx.checkpoint_fingerprint(self.name)
        folders = [ctx.checkpoints("snn" if len(phases) == 1 else f"snn_T{phase}", {**fingerprint, "phase": phase})
                   for phase in phases]
        best = None
        if cfg.finetune.keep == "best" and ctx.val is not None:
            best = _BestOnValidation(ctx, folders[-1], before["val_top1"])
        history = []
        for phase, folder in zip(phases, folders):
            # Epochs are numbered from the first of this experiment: a resumed phase continues the count.
            first = folder.epochs_done() + 1 if cfg.resume else 1
            epochs = iter(range(first, cfg.finetune.epochs + 1))

            def evaluate(model, t=phase, epochs=epochs):
                score = evaluate_snn(model, ctx.selection, [t], accelerator)[0]
                if best is not None and t == steps:
                    best.offer(score, next(epochs))
                return score

            history += [{**entry, "timesteps": phase} for entry in fit(
                ctx.snn, ctx.train_loader(), cfg=cfg.finetune, accelerator=accelerator, checkpoints=folder,
                task=self._task(ctx, phase), evaluate=evaluate, resume=cfg.resume, log=ctx.log, label=f"SNN T={phase}",
                name="finetune",
            )]
        kept = "last epoch"
        if best is not None:
            best.keep()
            kept = f"epoch {best.epoch} (best validation top-1 at T={steps}, {best.score:.4f}; 0 = before fine-tuning)"
            ctx.log(f"[SNN] keeping the SNN of {kept}")
        timesteps = sorted(set(cfg.snn.timesteps) | {steps})
        after, exits = spiking_accuracy(ctx, ctx.snn, timesteps)
        at = timesteps.index(steps)
        if accelerator.is_main_process:
            save_weights(ctx.snn, ctx.run_dir.file("snn.safetensors"), weights_metadata(ctx, "snn"))
        ctx.log(f"[SNN] test top-1 at T={steps}: {before['top1']:.4f} before, {after['top1'][at]:.4f} after fine-tuning")
        return {"finetune": {
            "timesteps": steps,
            "top1_before": before["top1"], "top1_after": after["top1"][at],
            "val_top1_before": before["val_top1"], "val_top1_after": after["val_top1"][at] if after["val_top1"] else None,
            "snn_after": {**after, **({"early_exit": exits} if exits else {})},
            "kept": kept, "kept_epoch": best.epoch if best is not None else len(history),
            "history": history,
        }}

    def restore(self, ctx: RunContext) -> bool:
        path = ctx.run_dir.file("snn.safetensors")
        if not path.is_file():
            return False
        load_weights(ctx.snn, path)
        ctx.log(f"[SNN] fine-tuning was complete: reusing {path}")
        return True


class Export(Stage):
    """The final SNN as a NIR graph, ``snn.nir``."""

    name, outputs, writes = "export", ("export",), ("snn.nir",)


    def run(self, ctx: RunContext) -> dict:
        path = ctx.run_dir.file("snn.nir")
        ops = compensated_ops(ctx.snn.net)
        if ops:  # NIR has no node for them: the run goes on, the report says why there is no file
            reason = f"not written: {len(ops)} compensated operation(s) NIR cannot express (snn.strict=true refuses them)"
            ctx.log(f"NIR graph {reason}: " + ", ".join(f"{op.where} ({op.kind})" for op in ops[:5]) + (" …" if len(ops) > 5 else ""))
            return {"export": {"nir": None, "portable": reason}}
        portable = "not written"
        if ctx.accelerator.is_main_process:
            portable = export_nir(ctx.snn, path, ctx.statistics_batch()[:1], portable=ctx.cfg.snn.nir_portable).metadata["portable"]
        ctx.log(f"NIR graph: {path}; portable (the node types every NIR consumer maps): {portable} (docs/NIR.md)")
        return {"export": {"nir": str(path), "portable": portable}}

    def restore(self, ctx: RunContext) -> bool:
        return ctx.run_dir.file("snn.nir").is_file()


STAGE_CLASSES: tuple[type[Stage], ...] = (Check, Train, Convert, Eval, Calibrate, Finetune, Export)
