"""The ``rich`` tables a run prints (and :func:`render` prints for a user's own results).

Each builds from plain report dicts (as stored in report.json), so a finished run's
tables can be printed again from its report.
"""

from __future__ import annotations

from rich.table import Table

__all__ = ["accuracy_table", "early_exit_table", "error_table", "render", "stats_tables"]


def _fmt(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _gap(reference, value) -> str:
    return "" if reference is None or value is None else f"{100 * (reference - value):+.2f}"


def accuracy_table(report: dict) -> Table:
    """Test top-1 at every T: the SNN, the ANN at L = T (what the SNN approximates), the gap,
    and the fine-tuned SNN where fine-tuning ran."""
    snn = report.get("snn", {})
    after = report.get("finetune", {}).get("snn_after", {})
    ann = report.get("ann", {}).get("top1")
    at_levels = dict(zip(snn.get("timesteps", []), snn.get("ann_at_levels", {}).get("top1", [])))
    after_by_t = dict(zip(after.get("timesteps", []), after.get("top1", [])))
    spikes = snn.get("max_spikes", 1)
    signed = report.get("convert", {}).get("neuron") == "signed"
    table = Table(title=f"{report.get('model')} on {report.get('dataset')}: test top-1 (%)"
                        + (f", graded spikes (≤ {spikes} per step)" if spikes > 1 else "") + (", signed neurons" if signed else ""))
    columns = ["T", "ANN at L=T" if spikes == 1 else f"ANN at L={spikes}·T", "SNN", "gap"] + (["fine-tuned", "gap"] if after else [])
    for name in columns:
        table.add_column(name, justify="right")
    for t, acc in zip(snn.get("timesteps", []), snn.get("top1", [])):
        row = [str(t), _percent(at_levels.get(t)), _percent(acc), _gap(ann, acc)]
        if after:
            row += [_percent(after_by_t.get(t)), _gap(ann, after_by_t.get(t))]
        table.add_row(*row)
    if ann is not None:
        table.caption = (f"ANN (QCFS, L={report.get('levels')}): {100 * ann:.2f}%; gap = ANN − SNN. "
                         "An SNN at T steps approximates the ANN at L = T (B·T with B spikes per step): a low value "
                         "there is quantization sensitivity, a gap between it and the SNN is conversion error")
        if after:
            table.caption += f"; fine-tuned at T={report['finetune']['timesteps']}"
    return table


def early_exit_table(exits: dict) -> Table:
    """Accuracy against mean and 95th-percentile steps for each early-exit threshold τ (validation and test)."""
    ref = exits["reference"]
    table = Table(title=f"Early exit ({exits['rule']}, at most {exits['max_timesteps']} steps): top-1 (%) and steps")
    for name in ("τ", "val top-1", "val mean", "val p95", "test top-1", "test mean", "test p95"):
        table.add_column(name, justify="right")
    val, test = exits.get("val") or {}, exits["test"]
    chosen = (exits.get("chosen") or {}).get("threshold")
    for i, tau in enumerate(exits["thresholds"]):
        cells = [f"{tau:g}" + (" ←" if tau == chosen else "")]
        cells += [_percent(val["top1"][i]), f"{val['mean_steps'][i]:.2f}", f"{val['p95_steps'][i]:.0f}"] if val else ["", "", ""]
        cells += [_percent(test["top1"][i]), f"{test['mean_steps'][i]:.2f}", f"{test['p95_steps'][i]:.0f}"]
        table.add_row(*cells)
    table.caption = (f"fixed T = {ref['timesteps']}: test {_percent(ref['top1'])}"
                     + (f", validation {_percent(ref['val_top1'])}" if ref.get("val_top1") is not None else "")
                     + ("; ← the τ chosen on " + exits["chosen"]["chosen_on"] if chosen is not None else "; no τ within tolerance"))
    return table


def stats_tables(stats: dict) -> list[Table]:
    """Tables (neurons, layers, compensated ops if any, totals) for a :func:`~qcfs_snntorch.stats.spike_stats` result."""
    t = stats["timesteps"]
    neurons = Table(title=f"Firing rates (T = {t})")
    signed = any(n.get("negative_events") for n in stats["neurons"])  # a column only where negative spikes happened
    for col in ("layer", "neurons", "rate (events/neuron/step)", "events/sample", *(("negative/sample",) if signed else ()),
                "spikes/sample"):
        neurons.add_column(col, justify="left" if col == "layer" else "right")
    for n in stats["neurons"]:
        negative = (_fmt(n["negative_events"]),) if signed else ()
        neurons.add_row(n["name"], str(n["neurons"]), _fmt(n["firing_rate"]), _fmt(n["events"]), *negative, _fmt(n["spikes"]))

    layers = Table(title=f"Synaptic operations per sample (T = {t})")
    for col in ("layer", "type", "MACs/step", "input rate", "op", "ops", "energy µJ (est.)"):
        layers.add_column(col, justify="left" if col in ("layer", "type", "op") else "right")
    for lay in stats["layers"]:
        layers.add_row(lay["name"], lay["type"], _fmt(lay["macs"]), _fmt(lay["input_rate"]), lay["op"], _fmt(lay["ops"]),
                       _fmt(lay["energy_uj"]))

    tot, em = stats["totals"], stats["energy_model"]
    caption = f"energy: estimate, {em['pj_per_mac']} pJ/MAC, {em['pj_per_ac']} pJ/AC"
    totals = Table(title="Totals per sample", caption=caption)
    totals.add_column("quantity")
    totals.add_column("value", justify="right")
    for key, value in tot.items():
        if not isinstance(value, dict):  # compensated MACs by kind: in their own table
            totals.add_row(key, _fmt(value))
    if not stats.get("compensated"):
        return [neurons, layers, totals]
    compensated = Table(title=f"Compensated operations per sample (T = {t}): multiply-accumulates, not spikes")
    for col in ("op", "at", "kind", "MACs (all steps)", "ANN MACs", "energy µJ (est.)"):
        compensated.add_column(col, justify="left" if col in ("op", "at", "kind") else "right")
    for c in stats["compensated"]:
        compensated.add_row(c["op"], c["where"], c["kind"], _fmt(c["macs"]), _fmt(c["ann_macs"]), _fmt(c["energy_uj"]))
    return [neurons, layers, compensated, totals]


def error_table(errors: dict) -> Table:
    """Relative conversion error per layer (rows) and T (columns) of a :func:`~qcfs_snntorch.stats.conversion_error` result."""
    table = Table(title="Conversion error |ANN − SNN rate·θ| / mean ANN activation")
    table.add_column("layer")
    table.add_column("ANN mean", justify="right")
    for t in errors["timesteps"]:
        table.add_column(f"T={t}", justify="right")
    for row in errors["layers"]:
        table.add_row(row["name"], _fmt(row["ann_mean"]), *(_fmt(r, ".1%") if r is not None else "–" for r in row["relative"]))
    out = errors["output"]
    table.add_row("output (logits)", "", *(_fmt(r, ".1%") if r is not None else "–" for r in out["relative"]))
    table.add_row("argmax agreement", "", *(_fmt(a, ".1%") for a in out["agreement"]))
    return table


def render(stats: dict | None = None, errors: dict | None = None, console=None) -> None:
    """Print :func:`~qcfs_snntorch.stats.spike_stats` and/or :func:`~qcfs_snntorch.stats.conversion_error` results."""
    from rich.console import Console

    console = console or Console()
    for table in (stats_tables(stats) if stats else []) + ([error_table(errors)] if errors else []):
        console.print(table)
