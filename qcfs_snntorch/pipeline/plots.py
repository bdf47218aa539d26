"""PNG plots of evaluation results, from plain dicts (as stored in report.json).

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
without pyplot: no global backend switch, no display needed, nothing left open.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_accuracy_vs_timesteps", "plot_conversion_error", "plot_firing_rates", "plot_report"]


def _by_t(points: Mapping) -> tuple[list[int], list[float]]:
    # JSON turns int keys into strings: accept both.
    items = sorted((int(t), float(v)) for t, v in points.items())
    return [t for t, _ in items], [v for _, v in items]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_timesteps(
    snn: Mapping,
    path: str | Path,
    *,
    ann: float | None = None,
    finetuned: Mapping | None = None,
    ann_at_levels: Mapping | None = None,
    early_exit: Mapping | None = None,
    title: str = "SNN accuracy vs time steps",
) -> Path:
    """Accuracy against T (log₂ axis): ``snn``, ``finetuned`` and ``ann_at_levels`` (the ANN with
    its QCFS at L = T, what the SNN approximates) map T → accuracy (%); ``ann`` is a line."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ts, acc = _by_t(snn)
    if ann_at_levels:
        lt, lacc = _by_t(ann_at_levels)
        ax.plot(lt, lacc, "^:", color="tab:gray", label="ANN at L = T")
    ax.plot(ts, acc, "o-", label="converted SNN")
    if early_exit:  # mean steps → accuracy (%), one point per threshold τ
        ax.plot(list(early_exit), list(early_exit.values()), "x", color="tab:green", markersize=8, label="early exit (mean steps)")
    if finetuned:
        ft_ts, ft_acc = _by_t(finetuned)
        ax.plot(ft_ts, ft_acc, "s--", label="fine-tuned SNN")
        ts = sorted(set(ts) | set(ft_ts))
    if ann is not None:
        ax.axhline(float(ann), color="gray", linestyle=":", label=f"QCFS ANN ({float(ann):.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.set_xlabel("time steps T")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _layer_bars(names: list[str], values: list[float], path, *, color: str, ylabel: str, title: str) -> Path:
    """One bar per layer, labelled by module path: the shape of every per-layer plot here."""
    fig = Figure(figsize=(max(6, 0.35 * len(names) + 2), 4))
    ax = fig.add_subplot()
    ax.bar(range(len(names)), values, color=color)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_firing_rates(stats: Mapping, path: str | Path, *, title: str | None = None) -> Path:
    """Bar chart of each neuron layer's firing rate from a :func:`~qcfs_snntorch.stats.spike_stats` result."""
    return _layer_bars(
        [n["name"] for n in stats["neurons"]],
        [n["firing_rate"] for n in stats["neurons"]],
        path,
        color="tab:blue",
        ylabel="spikes / neuron / step",
        title=title or f"Firing rate per layer (T = {stats['timesteps']})",
    )


def plot_conversion_error(errors: Mapping, path: str | Path, *, timesteps: int | None = None, title: str | None = None) -> Path:
    """Relative conversion error per layer at one T (default: the smallest) from :func:`~qcfs_snntorch.stats.conversion_error`."""
    all_t = list(errors["timesteps"])
    t = min(all_t) if timesteps is None else int(timesteps)
    if t not in all_t:
        raise ValueError(f"T={t} is not among the evaluated time steps {all_t}")
    k = all_t.index(t)
    return _layer_bars(
        [row["name"] for row in errors["layers"]],
        [100 * (row["relative"][k] or 0.0) for row in errors["layers"]],  # None (silent ANN layer) → 0
        path,
        color="tab:red",
        ylabel="|ANN − SNN rate·θ| / mean ANN activation (%)",
        title=title or f"Conversion error per layer (T = {t})",
    )


def _exit_points(exits: Mapping | None) -> dict | None:
    if not exits:
        return None
    return {steps: 100 * acc for steps, acc in zip(exits["test"]["mean_steps"], exits["test"]["top1"])}


def plot_report(report: Mapping, path: str | Path) -> Path:
    """The accuracy–latency plot of a run's report (test split)."""
    snn, after = report["snn"], report.get("finetune", {}).get("snn_after")
    return plot_accuracy_vs_timesteps(
        {t: 100 * a for t, a in zip(snn["timesteps"], snn["top1"])},
        path,
        ann=100 * report["ann"]["top1"] if report.get("ann", {}).get("top1") is not None else None,
        finetuned={t: 100 * a for t, a in zip(after["timesteps"], after["top1"])} if after else None,
        ann_at_levels={t: 100 * a for t, a in zip(snn["timesteps"], snn.get("ann_at_levels", {}).get("top1", []))},
        early_exit=_exit_points((after or snn).get("early_exit")),
        title=f"{report.get('model')} on {report.get('dataset')} (test split)",
    )
