"""A run's exported NIR file in the public NIR consumers, and what each of their rules costs.

Not part of CI: the consumers pin other versions of nir and nirtorch than this project
(sinabs 3.1.3 pins nir ≤ 1.0.4, which brings nirtorch 2.0.2), so the measurement runs in
separate virtual environments, and this script installs nothing. On a finished run (the
default quickstart: ``OMP_NUM_THREADS=1 python launch.py run_dir=/tmp/nirq_full``):

    # 1. this project's venv: our SNN, the exported files, the ablation of NIR's IF rules
    OMP_NUM_THREADS=1 python benchmarks/nir_consumers.py prepare --run-dir /tmp/nirq_full --out /tmp/nirbench
    # 2. the consumers as pip resolves them together (sinabs' pin: nir 1.0.4, nirtorch 2.0.2) ...
    python3.11 -m venv /tmp/nirvenv && /tmp/nirvenv/bin/pip install torch==2.14.1 sinabs norse snntorch nirtorch
    OMP_NUM_THREADS=1 /tmp/nirvenv/bin/python benchmarks/nir_consumers.py consumers --out /tmp/nirbench --label sinabs-pinned
    #    ... and with the current nir 1.0.8 / nirtorch 2.6 (sinabs without its pin, to see its neurons alone)
    python3.11 -m venv /tmp/nirvenv2 && /tmp/nirvenv2/bin/pip install torch==2.14.1 norse snntorch nir nirtorch matplotlib
    /tmp/nirvenv2/bin/pip install --no-deps sinabs pbr
    OMP_NUM_THREADS=1 /tmp/nirvenv2/bin/python benchmarks/nir_consumers.py consumers --out /tmp/nirbench --label current-nir
    # 3. this project's venv: the tables, written into docs/NIR.md between their markers
    python benchmarks/nir_consumers.py table --out /tmp/nirbench --doc docs/NIR.md

Every accuracy is top-1 on the run's test split after T = 8, 16, 32 steps (the prediction
after T steps: the argmax of the mean output over the first T steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch

TIMESTEPS = (8, 16, 32)
ROOT = Path(__file__).resolve().parents[1]

# -- shared by both environments: a NIR graph run through nirtorch.nir_to_torch with a plain node map --------


class RuleIF(torch.nn.Module):
    """An IF neuron following a chosen set of rules: what a consumer of a NIR IF node might run.

    ``v_initial``: start from the node's metadata ``v_initial`` (else 0); ``subtract``: reset
    by subtracting the threshold (else to ``v_reset``, 0 when the file has none);
    ``fire_ge``: fire on ``v >= v_threshold`` (else NIR's ``>``).
    """

    def __init__(self, node, *, v_initial: bool = True, subtract: bool = True, fire_ge: bool = True):
        super().__init__()
        as_tensor = partial(torch.as_tensor, dtype=torch.float32)
        self.threshold, self.r = as_tensor(np.asarray(node.v_threshold)), as_tensor(np.asarray(node.r))
        start = node.metadata.get("v_initial") if v_initial else None
        self.start = as_tensor(np.asarray(start)) if start is not None else torch.zeros_like(self.threshold)
        reset = getattr(node, "v_reset", None)
        self.reset = as_tensor(np.asarray(reset)) if reset is not None else torch.zeros_like(self.threshold)
        self.subtract, self.fire_ge = subtract, fire_ge

    def forward(self, x, state=None):
        v = (self.start.expand_as(x) if state is None else state) + self.r * x
        spikes = (v >= self.threshold) if self.fire_ge else (v > self.threshold)
        v = v - spikes * self.threshold if self.subtract else torch.where(spikes, self.reset.expand_as(v), v)
        return spikes.float(), v


def _affine(node):
    # nirtorch's default Affine map (2.0.2 and 2.6) sets ``weight.bias`` instead of ``bias``: the bias is lost.
    linear = torch.nn.Linear(node.weight.shape[1], node.weight.shape[0])
    linear.weight.data, linear.bias.data = torch.as_tensor(node.weight), torch.as_tensor(node.bias)
    return linear


def _flatten(node):
    # NIR's dims exclude the batch; nirtorch's default map passes them to torch as they are, which is right
    # only for dims counted from the end (what this project writes since issue 22; older files count from 0).
    shift = lambda d: int(d) + 1 if int(d) >= 0 else int(d)  # noqa: E731
    return torch.nn.Flatten(shift(node.start_dim), shift(node.end_dim))


def plain_module(graph, **rules):
    import nir
    import nirtorch

    node_map = {nir.IF: partial(RuleIF, **rules), nir.Affine: _affine, nir.Flatten: _flatten}
    return nirtorch.nir_to_torch(graph, node_map)


def run_stepwise(module, x: torch.Tensor, steps: int, read=None) -> torch.Tensor:
    """Per-step outputs ``[T, B, …]`` of a module called once per step as ``out, state = module(x, state)``.

    ``read(out, state)`` picks the output from what the module returns (default: ``out``).
    """
    read = read or (lambda out, state: out)
    outputs = []
    with torch.no_grad():
        out, state = module(x)  # nirtorch 2.0.2's modules take their first state from a default argument
        outputs.append(read(out, state))
        for _ in range(steps - 1):
            out, state = module(x, state)
            outputs.append(read(out, state))
    return torch.stack(outputs)


def output_node(graph) -> tuple[str, list[str]]:
    """The graph's Output node and the nodes feeding it."""
    import nir

    (name,) = [name for name, node in graph.nodes.items() if isinstance(node, nir.Output)]
    return name, [src for src, dst in graph.edges if dst == name]


def read_output(graph):
    """``read`` for modules of ``nirtorch.load`` (sinabs, norse): the graph's output from the returned state.

    ``nirtorch.load``'s module returns the last node it ran (depth first: in a residual network a
    branch, not the classifier) and keeps every node's value in ``state.cache``. The Output node
    is there where the consumer maps it to a module (sinabs: Identity); where it maps it to
    nothing (norse) its value is the sum of its inputs' values.
    """
    name, sources = output_node(graph)

    def read(out, state):
        if name in state.cache:
            return state.cache[name]
        return torch.stack([state.cache[src] for src in sources]).sum(0)

    return read


def accuracies(per_step: torch.Tensor, labels: torch.Tensor) -> list[float]:
    means = per_step.float().cumsum(0)
    return [round(100.0 * (means[t - 1].argmax(-1) == labels).float().mean().item(), 1) for t in TIMESTEPS]


def _failure(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text} ({Path(last.filename).name}:{last.lineno})"


def _measure(results: dict, key: str, fn) -> None:
    try:
        results[key] = {"result": fn()}
    except Exception as exc:  # a consumer failing is a result, not an error of this script
        results[key] = {"error": _failure(exc)}
    print(key, results[key], flush=True)


# -- step 1 (this project's venv) -----------------------------------------------------------------------------


def _load_run(run_dir: Path):
    """The run's final SNN (fine-tuned, else calibrated, else converted), its test split and 256 training images."""
    sys.path.insert(0, str(ROOT))
    from qcfs_snntorch.config import load_config
    from qcfs_snntorch.convert import convert
    from qcfs_snntorch.data import build_datasets, sample_batch
    from qcfs_snntorch.pipeline.setup import build_ann
    from qcfs_snntorch.training import load_weights

    cfg = load_config([f"recipe={run_dir / 'config.yaml'}", f"model.checkpoint={run_dir / 'ann.safetensors'}"])
    data = build_datasets(cfg.data, cfg.seed)
    ann, _ = build_ann(cfg, data)
    snn = convert(ann.eval(), fold_bn=cfg.snn.fold_bn, verify=False)
    for name in ("snn.safetensors", "calibrated.safetensors"):
        if (run_dir / name).is_file():
            load_weights(snn, run_dir / name)
            break
    x, y = zip(*(data.test[i] for i in range(len(data.test))))
    train_x, _ = sample_batch(data.calibration, 256, cfg.seed)
    return snn.eval(), torch.stack(x), torch.as_tensor(y), train_x, name if (run_dir / name).is_file() else "converted"


def prepare(args) -> None:
    import nir

    from qcfs_snntorch.export import export_nir, simulate_nir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    snn, x, y, train_x, weights = _load_run(Path(args.run_dir))
    np.savez(out / "test.npz", x=x.numpy(), y=y.numpy())
    steps = max(TIMESTEPS)
    results = {"run_dir": str(args.run_dir), "weights": weights, "images": len(y)}
    with torch.no_grad():
        ours = snn(x, timesteps=steps)
    results["our SNN"] = {"result": accuracies(ours, y)}
    graphs = {}
    for form, portable in (("portable", True), ("metadata", False)):
        export_nir(snn, out / f"{form}.nir", x[:1], portable=portable)
        graphs[form] = nir.read(out / f"{form}.nir")
        results[f"{form} nodes"] = sorted({type(n).__name__ for n in graphs[form].nodes.values()})
        simulated = simulate_nir(graphs[form], x, steps)
        results[f"simulate_nir, {form} file"] = {"result": accuracies(simulated, y)}
        differs = (simulated - ours).abs().flatten(2).amax(-1) > 1e-4  # [T, B]: float rounding at exact ties
        results[f"outputs unlike our SNN's, {form} file"] = {
            "result": f"{int(differs.sum())} of {differs.numel()} image-steps, in {int(differs.any(0).sum())} images"}
        _measure(results, f"simulate_nir, {form} file, NIR's rules (qcfs_semantics=False)", lambda g=graphs[form]: accuracies(simulate_nir(g, x, steps, qcfs_semantics=False), y))
    for label, rules in ABLATION.items():
        _measure(results, f"nirtorch.nir_to_torch, portable file, IF: {label}", lambda r=rules: accuracies(run_stepwise(plain_module(graphs["portable"], **r), x, steps), y))
    factor = _reset_to_zero_factor(snn, graphs["portable"], train_x, results)
    export_nir(snn, out / "portable-reset-to-zero.nir", x[:1], portable=True, threshold_factor=factor)
    variant = nir.read(out / "portable-reset-to-zero.nir")
    _measure(results, f"nirtorch.nir_to_torch, portable file with threshold_factor={factor}, IF: {NIR_IF}", lambda: accuracies(run_stepwise(plain_module(variant, **ABLATION[NIR_IF]), x, steps), y))
    _measure(results, f"simulate_nir, portable file with threshold_factor={factor} (our rules divide it back)", lambda: accuracies(simulate_nir(variant, x, steps), y))
    (out / "prepare.json").write_text(json.dumps(results, indent=1))


def _reset_to_zero_factor(snn, graph, train_x: torch.Tensor, results: dict) -> float:
    """The threshold factor under which NIR's IF (reset to zero) agrees best with our SNN on training images.

    Chosen without labels and without the test split: agreement of the predictions at every T.
    """
    import nir

    with torch.no_grad():
        ours = snn(train_x, timesteps=max(TIMESTEPS)).float().cumsum(0)
    agreement = {}
    for factor in FACTORS:
        scaled = nir.NIRGraph(nodes={name: _scaled(node, factor) for name, node in graph.nodes.items()}, edges=graph.edges)
        theirs = run_stepwise(plain_module(scaled, **ABLATION[NIR_IF]), train_x, max(TIMESTEPS)).float().cumsum(0)
        agreement[factor] = round(float(np.mean([(theirs[t - 1].argmax(-1) == ours[t - 1].argmax(-1)).float().mean() for t in TIMESTEPS])), 4)
    results["reset-to-zero threshold factor: agreement with our SNN on 256 training images"] = agreement
    return max(agreement, key=agreement.get)


def _scaled(node, factor: float):
    import nir

    if not isinstance(node, nir.IF):
        return node
    return nir.IF(r=node.r, v_threshold=node.v_threshold * np.float32(factor), v_reset=node.v_reset, metadata=node.metadata)


NIR_IF = "NIR 1.0.8's IF (v(0) = 0, reset to 0, >)"
ABLATION = {
    "our rules (v_initial, subtract, >=)": {},
    "v(0) = 0": {"v_initial": False},
    "reset to v_reset = 0": {"subtract": False},
    "fire on >": {"fire_ge": False},
    NIR_IF: {"v_initial": False, "subtract": False, "fire_ge": False},
}
FACTORS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)


# -- step 2 (the consumers' venv) -----------------------------------------------------------------------------


def _sinabs_call(model, x: torch.Tensor, steps: int):
    """sinabs' squeezed layers take ``[B·T, …]`` (batch-major) in one call."""
    import sinabs

    sinabs.reset_states(model)
    batch = x.shape[0]
    with torch.no_grad():
        return model(x.unsqueeze(1).expand(batch, steps, *x.shape[1:]).reshape(batch * steps, *x.shape[1:]))


def _sinabs_run(model, x: torch.Tensor, steps: int, read=None) -> torch.Tensor:
    """Per-step outputs ``[T, B, …]``; ``read(out, state)`` as in :func:`run_stepwise` for a module that returns a state."""
    result = _sinabs_call(model, x, steps)
    out = (read or (lambda out, state: out))(*result) if isinstance(result, tuple) else result
    return out.reshape(x.shape[0], steps, -1).transpose(0, 1)


def _returned_node(model, x: torch.Tensor, steps: int) -> str:
    """Which node's value ``nirtorch.load``'s module returns, and its shape per sample and step."""
    out, state = _sinabs_call(model, x, steps)
    name = next(name for name, value in state.cache.items() if value is out)
    return f"node {name!r}, {list(out.shape[1:])} per sample and step"


def consumers(args) -> None:
    """Every consumer importable in this venv, on the portable file; results in ``consumers-<label>.json``."""
    import nir

    out = Path(args.out)
    data = np.load(out / "test.npz")
    x, y = torch.as_tensor(data["x"]), torch.as_tensor(data["y"])
    steps = max(TIMESTEPS)
    results = {"versions": _versions()}
    path = str(out / "portable.nir")
    _measure(results, "nir.read: nodes", lambda: len(nir.read(path).nodes))
    _measure(results, "nirtorch.nir_to_torch, plain map, our rules", lambda: accuracies(run_stepwise(plain_module(nir.read(path)), x, steps), y))
    _measure(results, "nirtorch.load on y = x + 10·x (the reproducer in docs/NIR.md)", _load_reproducer)
    for consumer in (_sinabs, _norse, _snntorch):
        consumer(results, path, x, y, steps)
    (out / f"consumers-{args.label}.json").write_text(json.dumps(results, indent=1))


def _load_reproducer() -> str:
    """docs/NIR.md's reproducer of ``nirtorch.load``'s order: what it returns and what its Output node holds."""
    import nir
    import nirtorch

    def affine(w):
        return nir.Affine(weight=np.float32(w) * np.eye(2, dtype=np.float32), bias=np.zeros(2, np.float32))

    graph = nir.NIRGraph(  # y = 1·x + 10·x
        nodes={"input": nir.Input(input_type=np.array([2])), "skip": affine(1), "branch": affine(10),
               "sum": affine(1), "output": nir.Output(output_type=np.array([2]))},
        edges=[("input", "skip"), ("skip", "sum"), ("input", "branch"), ("branch", "sum"), ("sum", "output")],
    )

    def to_torch(node):
        if isinstance(node, nir.Affine):
            linear = torch.nn.Linear(2, 2)
            linear.weight.data, linear.bias.data = torch.as_tensor(node.weight), torch.as_tensor(node.bias)
            return linear
        if isinstance(node, nir.Output):  # as sinabs maps it: the state then holds the graph's output
            return torch.nn.Identity()
        return None

    module = nirtorch.load(graph, to_torch)
    with torch.no_grad():
        out1, state = module(torch.ones(1, 2))
        y1 = state.cache["output"]
        out2, state = module(2 * torch.ones(1, 2), state)
        y2 = state.cache["output"]
    value = lambda t: f"{float(t[0, 0]):g}"  # noqa: E731
    return (f"Output node {value(y1)}, {value(y2)} at steps 1, 2 (right: 11, 22); the module returns "
            f"{value(out1)}, {value(out2)}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("nir", "nirtorch", "sinabs", "norse", "snntorch", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _sinabs(results, path, x, y, steps) -> None:
    import nir

    try:
        import sinabs
        import sinabs.nir as sinabs_nir
    except ImportError as exc:
        results["sinabs"] = {"error": f"not installed: {exc}"}
        return
    batch = x.shape[0]
    graph = nir.read(path)
    _measure(results, "sinabs", lambda: accuracies(_sinabs_run(sinabs.from_nir(graph, batch_size=batch), x, steps, read_output(graph)), y))
    _measure(results, "sinabs: what its module returns first", lambda: _returned_node(sinabs.from_nir(graph, batch_size=4), x[:4], steps))

    def own_map_current_loader():
        import nirtorch

        # Shim: sinabs' own node map (a private function of sinabs), loaded by nirtorch's current loader.
        mapper = partial(sinabs_nir._import_sinabs_module, batch_size=batch, num_timesteps=steps)
        graph = nir.read(path)
        node_map = {type(node): mapper for node in graph.nodes.values() if not isinstance(node, nir.Input | nir.Output)}
        return accuracies(_sinabs_run(nirtorch.nir_to_torch(graph, node_map), x, steps), y)

    _measure(results, "sinabs, its node map in nirtorch.nir_to_torch", own_map_current_loader)


def _norse(results, path, x, y, steps) -> None:
    import nir

    try:
        import norse.torch as norse
        from norse.torch.utils import import_nir as norse_nir
    except ImportError as exc:
        results["norse"] = {"error": f"not installed: {exc}"}
        return
    graph = nir.read(path)
    _measure(results, "norse", lambda: accuracies(run_stepwise(norse.from_nir(graph), x, steps, read_output(graph)), y))

    def own_map_current_loader(file):
        import nirtorch

        # Shim: norse's own node map (a private function of norse), loaded by nirtorch's current loader,
        # with NIR's Flatten dims shifted past the batch (norse passes them to torch as they are).
        graph = nir.read(file)
        node_map = {type(node): norse_nir._import_norse_module for node in graph.nodes.values()
                    if not isinstance(node, nir.Input | nir.Output)}
        node_map[nir.Flatten] = _flatten
        return accuracies(run_stepwise(nirtorch.nir_to_torch(graph, node_map), x, steps), y)

    _measure(results, "norse, its node map in nirtorch.nir_to_torch", lambda: own_map_current_loader(path))
    variant = Path(path).with_name("portable-reset-to-zero.nir")  # norse resets to zero: the file written for that
    _measure(results, f"norse, the same, on {variant.name}", lambda: own_map_current_loader(variant))


def _snntorch(results, path, x, y, steps) -> None:
    import nir

    try:
        from snntorch.import_nir import import_from_nir
    except ImportError as exc:
        results["snntorch"] = {"error": f"not installed: {exc}"}
        return
    _measure(results, "snntorch", lambda: accuracies(run_stepwise(import_from_nir(nir.read(path)), x, steps), y))


# -- step 3 (this project's venv): the tables into docs/NIR.md ------------------------------------------------


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    if "error" in entry:
        return f"fails: `{entry['error']}`"
    value = entry["result"]
    return " / ".join(f"{v:.1f}" for v in value) if isinstance(value, list) else str(value)


# What each row measures, by the start of its key (first match wins); {factor} is the chosen threshold factor.
ROW_TEXT = (
    ("our SNN", "qcfs_snntorch's SNN with the run's final weights: the reference"),
    ("simulate_nir, portable file with threshold_factor", "the reset-to-zero file under our rules (which divide the "
     "factor back): equals our SNN when the factor is written faithfully"),
    ("simulate_nir, portable file, NIR's rules", "our NIR simulator on the portable file under NIR 1.0.8's IF (v(0) = 0, "
     "reset to 0, >): what a consumer that ignores our metadata computes"),
    ("simulate_nir, metadata file, NIR's rules", "the same for the metadata-form file"),
    ("simulate_nir, portable file", "our NIR simulator honouring the metadata (v_initial, subtract, >=) on the portable "
     "file: equals our SNN up to float ties"),
    ("simulate_nir, metadata file", "the same on the metadata-form file"),
    ("outputs unlike our SNN's", "image-steps whose output differs from our SNN's by more than 1e-4 (exact ties in float "
     "rounding)"),
    ("nirtorch.nir_to_torch, portable file with threshold_factor", "the file written with thresholds × {factor} "
     "(factor chosen on training images, below) run with NIR 1.0.8's IF: what reset-to-zero consumers get from it"),
    ("nirtorch.nir_to_torch, portable file, IF: our rules", "nirtorch's current loader, plain node map, IF with all our "
     "rules: equals our SNN"),
    ("nirtorch.nir_to_torch, portable file, IF:", "the same with one of NIR's IF rules instead of ours (an ablation): "
     "what that rule alone costs"),
    ("nir.read: nodes", "nodes nir.read finds in the portable file (this venv's nir)"),
    ("nirtorch.nir_to_torch, plain map, our rules", "this venv's nirtorch.nir_to_torch, plain node map with our IF rules: "
     "whether the loader itself runs the file"),
    ("nirtorch.load on y = x + 10·x", "nirtorch.load's depth-first order on a two-branch sum (the reproducer below)"),
    ("sinabs: what its module returns first", "what sinabs.from_nir's module returns (nirtorch.load returns the last "
     "node it ran, not the Output node)"),
    ("sinabs, its node map", "sinabs' own node map (a private function) in the current nirtorch.nir_to_torch instead of "
     "nirtorch.load: what sinabs' neuron (IAFSqueeze) alone costs"),
    ("sinabs", "sinabs.from_nir (nirtorch.load, IAFSqueeze neurons), all T steps in one call; prediction read from "
     "the graph's Output node in the returned state"),
    ("norse, its node map", "norse's own node map (a private function) in the current nirtorch.nir_to_torch, Flatten "
     "dims shifted past the batch: what norse's neuron (NIR's IF, reset to zero) alone costs"),
    ("norse, the same, on", "the same on the file with thresholds × {factor} (written for reset-to-zero consumers)"),
    ("norse", "norse.torch.from_nir (nirtorch.load, IAFCell neurons), step by step; prediction read from the "
     "Output node's input in the returned state"),
    ("snntorch", "snntorch.import_nir.import_from_nir, step by step"),
)


def describe(key: str, factor: float) -> str:
    text = next((text for start, text in ROW_TEXT if key.startswith(start)), None)
    if text is None:
        raise KeyError(f"no ROW_TEXT entry says what the row {key!r} measures")
    return text.format(factor=factor)


def _rows(results: dict, factor: float) -> list[str]:
    return [f"| {key} | {describe(key, factor)} | {_cell(value)} |" for key, value in results.items()
            if isinstance(value, dict) and "agreement" not in key]


def table(args) -> None:
    out = Path(args.out)
    prepared = json.loads((out / "prepare.json").read_text())
    factors = prepared["reset-to-zero threshold factor: agreement with our SNN on 256 training images"]
    factors = {float(k): v for k, v in factors.items()}
    factor = max(factors, key=factors.get)  # what prepare picked and wrote portable-reset-to-zero.nir with
    head = "| row | what it measures | top-1 (%) at T = 8 / 16 / 32, or the result |"
    lines = [
        f"Generated by `python benchmarks/nir_consumers.py table --out {args.out} --doc {args.doc}` from the run "
        f"`{prepared['run_dir']}` ({prepared['weights']}), {prepared['images']} test images. Edit the script, not this block.",
        "", "In this project's venv (nir 1.0.8, nirtorch 2.6):", "", head, "|---|---|---|", *_rows(prepared, factor), "",
        "**Threshold factor** for consumers that reset to zero: the benchmark exports the portable file with every "
        "threshold × c for each c below, runs it with NIR 1.0.8's IF on 256 training images (no labels, no test images), "
        "and measures the agreement of its predictions with our SNN's (mean over T = 8, 16, 32): "
        + ", ".join(f"{k:g}: {v:.3f}" for k, v in factors.items())
        + f". **It picks c = {factor:g}** on this run (the highest agreement), and writes `portable-reset-to-zero.nir` with it.",
    ]
    for path in sorted(out.glob("consumers-*.json")):
        measured = json.loads(path.read_text())
        versions = ", ".join(f"{k} {v}" for k, v in measured["versions"].items() if v)
        lines += ["", f"Consumers' environment `{path.stem.removeprefix('consumers-')}` ({versions}):", "",
                  head, "|---|---|---|", *_rows({k: v for k, v in measured.items() if k != "versions"}, factor)]
    doc = Path(args.doc)
    start, end = "<!-- nir_consumers table: start -->", "<!-- nir_consumers table: end -->"
    before, rest = doc.read_text().split(start)
    _, after = rest.split(end)
    text = "\n".join(lines)
    doc.write_text(f"{before}{start}\n{text}\n{end}{after}")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    step = sub.add_parser("prepare")
    step.add_argument("--run-dir", required=True)
    step.add_argument("--out", required=True)
    step = sub.add_parser("consumers")
    step.add_argument("--out", required=True)
    step.add_argument("--label", required=True, help="names this venv's results file")
    step = sub.add_parser("table")
    step.add_argument("--out", required=True)
    step.add_argument("--doc", default=str(ROOT / "docs" / "NIR.md"))
    args = parser.parse_args()
    {"prepare": prepare, "consumers": consumers, "table": table}[args.step](args)


if __name__ == "__main__":
    main()
