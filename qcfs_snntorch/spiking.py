"""SpikingModel: runs a converted network over time steps.

Two ways in:
- multi-step: ``snn(x, timesteps=T)`` feeds a static ``x`` at every step (direct
  encoding), ``snn(x_seq)`` feeds a time-varying ``[T, B, …]`` input (event data); both
  reset the state first and return the per-step outputs ``[T, B, …]``.
- streaming: ``snn.reset()`` then ``snn.step(x_t)`` per step, one output per call.

Internally a call folds time into the batch (see :mod:`qcfs_snntorch.neurons.base`):
stateless layers run once on ``[T·B, …]``, each neuron loops over T and each compensated
operation (:mod:`qcfs_snntorch.compensation`) takes a running mean over T with one
``cumsum``. ``chunk_size`` steps at a time, so memory does not grow with T; neurons and
compensated operations carry their state between chunks and ``step`` calls.

Static input: whatever the network computes from the input before any neuron (the stem
conv + BN) is the same at every step, so it runs once on ``[B, …]`` and is broadcast over
T (once for all chunks). The network is split with torch.fx into that *head* and the
*rest*; a value the rest needs from the head (the first neuron's input, a branch that
bypasses the neurons) is repeated T times. Per sample the head computes exactly what
every step would. Networks that do not trace, whose head output is not batch-first, or
whose head holds BatchNorm/dropout in training mode (batch statistics, random masks)
run fully folded instead.
"""

from __future__ import annotations

import functools

import torch
import torch.fx
from torch import nn

from .early_exit import exit_scores
from .neurons import MultiStepNeuron
from .tracing import LeafTracer, spiking_neurons, stateful_modules

__all__ = ["SpikingModel"]


def _repeat(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``[B, …]`` → ``[steps·B, …]``: the same input at every step, time-major (memory layout kept)."""
    return torch.cat([x] * steps) if steps > 1 else x


def _fetch(root: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


def _batch_dependent(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Would running this node on ``[B]`` instead of ``[T·B]`` change it (batch statistics, randomness)?"""
    if node.op == "call_module":
        m = modules[node.target]
        return m.training and (isinstance(m, nn.modules.batchnorm._BatchNorm) or "drop" in type(m).__name__.lower())
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target)).lower()
        return any(word in name for word in ("dropout", "rand", "bernoulli", "normal"))
    return False


class _StaticSplit:
    """``net`` as ``head`` (input → values that need no neuron) and ``rest`` (those values → output)."""

    def __init__(self, net: nn.Module, head: torch.fx.Graph, rest: torch.fx.Graph):
        self.head, self.rest = torch.fx.GraphModule(net, head), torch.fx.GraphModule(net, rest)
        self.usable = True  # cleared when the head's outputs turn out not to be batch-first
        # GraphModule copies the tensors that get_attr nodes read: note them, to notice
        # when `.to()` or a load has replaced them in the network.
        self.attrs = [(n.target, _fetch(net, n.target)) for gm in (self.head, self.rest) for n in gm.graph.nodes if n.op == "get_attr"]

    def current(self, net: nn.Module) -> bool:
        return all(_fetch(net, target) is value for target, value in self.attrs)

    @classmethod
    def build(cls, net: nn.Module) -> _StaticSplit | None:
        try:
            graph = LeafTracer().trace(net)
        except Exception:  # data-dependent control flow etc.: run folded
            return None
        modules = dict(net.named_modules())
        inputs = [n for n in graph.nodes if n.op == "placeholder" and not n.args]
        if len(inputs) != 1:
            return None
        static, varying = _classify(graph, modules)
        if any(_batch_dependent(n, modules) for n in static):
            return None
        # Head outputs: static values that a varying node or the network's output uses.
        boundary = [n for n in graph.nodes if n in static and any(u not in static for u in n.users)]
        if boundary == inputs:  # a neuron sees the raw input first: nothing to save
            return None
        return cls(net, *_split_graph(graph, static, varying, boundary))


def _classify(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> tuple[set, set]:
    """(static: computed from the input with no neuron upstream, varying: downstream of a neuron)."""
    static: set[torch.fx.Node] = set()
    varying: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if not node.args:  # an argument with a default (a ViT's attn_mask=None) is a constant
                static.add(node)
        elif node.op == "output":
            continue
        elif any(a in varying for a in node.all_input_nodes) or (
            node.op == "call_module" and isinstance(modules[node.target], MultiStepNeuron)
        ):
            varying.add(node)
        elif any(a in static for a in node.all_input_nodes):
            static.add(node)  # else: a constant (parameters, …), copied where used
    return static, varying


def _split_graph(graph: torch.fx.Graph, static: set, varying: set, boundary: list) -> tuple[torch.fx.Graph, torch.fx.Graph]:
    """The head (input → boundary values) and the rest (boundary values → output) as two graphs."""
    head, rest = torch.fx.Graph(), torch.fx.Graph()
    env_head: dict[torch.fx.Node, torch.fx.Node] = {}
    env_rest = {n: rest.placeholder(f"static_{i}") for i, n in enumerate(boundary)}
    constants = set()  # copies of constants (parameters read by get_attr, …), in both graphs
    for node in graph.nodes:
        if node.op == "output":
            head.output(tuple(env_head[n] for n in boundary))
            rest.output(torch.fx.map_arg(node.args[0], env_rest.__getitem__))
            continue
        if node in static or node not in varying:
            env_head[node] = head.node_copy(node, env_head.__getitem__)
        if node not in static:
            env_rest[node] = rest.node_copy(node, env_rest.__getitem__)
        if node not in static and node not in varying:
            constants.update((env_head[node], env_rest[node]))
    for g in (head, rest):  # remove the copies of constants a graph does not use, nothing else
        g.eliminate_dead_code(is_impure_node=lambda n: n not in constants)
    return head, rest


def _step_count(timesteps) -> int:
    """A number of steps as an int: a positive integer, or a float equal to one (2.0, not 2.7)."""
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, float)) or timesteps != int(timesteps) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    return int(timesteps)


class SpikingModel(nn.Module):
    """A converted network whose activations are :class:`MultiStepNeuron` modules.

    Args:
        net: the network; its neurons are found by walking ``net.modules()``.
        chunk_size: most steps folded into one forward (``None``: all at once).
        static_head: for static input, compute the layers before the first neurons once
            per call instead of once per step (same outputs; ``False`` runs fully folded).
    """

    def __init__(self, net: nn.Module, chunk_size: int | None = None, static_head: bool = True):
        super().__init__()
        self.net = net
        self.chunk_size = chunk_size
        self.static_head = static_head
        # Split cache, keyed by every module's identity and train flag: tracing bakes in
        # `self.training` branches and module references, so either change means retracing.
        self._split_cache: tuple[tuple, _StaticSplit | None] | None = None
        if not self.neurons():
            raise ValueError("SpikingModel: the network contains no spiking neuron")

    def neurons(self) -> list[MultiStepNeuron]:
        return spiking_neurons(self.net)

    def reset(self) -> None:
        """Reset every neuron to its initial potential and every compensated op's running sums (a new sample)."""
        for module in stateful_modules(self.net):
            module.reset_state()

    def _split(self) -> _StaticSplit | None:
        key = tuple((id(m), m.training) for m in self.net.modules())
        cache = self._split_cache
        if cache is None or cache[0] != key or (cache[1] is not None and not cache[1].current(self.net)):
            self._split_cache = (key, _StaticSplit.build(self.net))
        return self._split_cache[1]

    def _run(self, module: nn.Module, folded: list[torch.Tensor], steps: int) -> torch.Tensor:
        for stateful in stateful_modules(self.net):
            stateful.timesteps = steps
        out = module(*folded)
        return out.reshape(steps, out.shape[0] // steps, *out.shape[1:])

    def _chunks(self, x: torch.Tensor, total: int, static: bool):
        """Per-step outputs ``[steps, B, …]``, one chunk at a time, from a freshly reset state."""
        chunk = self.chunk_size or total
        split = self._split() if static and self.static_head and total > 1 else None
        feats = None
        if split is not None and split.usable:
            feats = split.head(x)
            if not all(isinstance(f, torch.Tensor) and f.dim() > 0 and f.shape[0] == x.shape[0] for f in feats):
                split.usable, feats = False, None  # e.g. the head reads x.shape: not batch-first, run folded
        self.reset()
        for start in range(0, total, chunk):
            steps = min(chunk, total - start)
            if feats is not None:
                yield self._run(split.rest, [_repeat(f, steps) for f in feats], steps)
            elif static:
                yield self._run(self.net, [_repeat(x, steps)], steps)
            else:
                yield self._run(self.net, [x[start : start + steps].flatten(0, 1)], steps)

    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        """Advance one time step with input ``x_t`` ``[B, …]``; state persists between calls."""
        return self._run(self.net, [x_t], 1)[0]

    def forward(self, x: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """Per-step outputs ``[T, B, …]``; the prediction after t steps is their mean over the first t."""
        static = timesteps is not None
        total = _step_count(timesteps) if static else x.shape[0]
        outputs = list(self._chunks(x, total, static))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @torch.no_grad()
    def running_means(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        """``[T, B, …]``: the mean output over the first t steps at row t − 1, for every t ≤ T, from one run."""
        total = _step_count(timesteps)
        sums, running = [], None
        for out in self._chunks(x, total, static=True):
            partial = out.float().cumsum(0)
            if running is not None:
                partial += running
            sums.append(partial)
            running = partial[-1]
        counts = torch.arange(1, total + 1, device=running.device, dtype=torch.float32)
        return torch.cat(sums) / counts.reshape(-1, *[1] * (running.dim()))

    @torch.no_grad()
    def cumulative_predictions(self, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """Class predictions after each T in ``timesteps`` from one run of ``max(timesteps)`` steps.

        Returns ``[len(timesteps), B]`` (argmax of the mean output over the first T steps).
        """
        means = self.running_means(x, max(timesteps))
        return means[[int(t) - 1 for t in timesteps]].argmax(-1)

    @torch.no_grad()
    def predict_early(self, x: torch.Tensor, max_timesteps: int, threshold: float, rule: str = "confidence"):
        """Predictions of a static input, each sample stopped once its running prediction scores ≥ ``threshold``.

        Runs one step at a time; after each step the samples whose mean output is confident
        (see :mod:`qcfs_snntorch.early_exit`) are dropped from the batch, with their neurons'
        state, and the run ends when none is left or at ``max_timesteps``. Returns
        ``(predictions [B], steps [B], mean outputs [B, …])``: the same as
        :func:`~qcfs_snntorch.early_exit.exit_steps` on a full run, at a fraction of its cost.
        """
        total = _step_count(max_timesteps)
        split = self._split() if self.static_head else None
        feats = split.head(x) if split is not None and split.usable else None
        if feats is not None and not all(isinstance(f, torch.Tensor) and f.dim() and f.shape[0] == x.shape[0] for f in feats):
            split.usable, feats = False, None
        self.reset()
        active = torch.arange(x.shape[0], device=x.device)
        sums = steps = means = None
        for t in range(1, total + 1):
            if feats is not None:
                out = self._run(split.rest, [f[active] for f in feats], 1)[0].float()
            else:
                out = self._run(self.net, [x[active]], 1)[0].float()
            if sums is None:
                sums = torch.zeros(x.shape[0], *out.shape[1:], device=out.device)
                means, steps = torch.zeros_like(sums), torch.zeros(x.shape[0], dtype=torch.long, device=out.device)
            sums[active] += out
            current = sums[active] / t
            stop = exit_scores(current, rule) >= threshold if t < total else torch.ones_like(active, dtype=torch.bool)
            means[active[stop]], steps[active[stop]] = current[stop], t
            active = active[~stop]
            if not len(active):
                break
            for stateful in stateful_modules(self.net):
                stateful.keep(~stop)
        self.reset()
        return means.argmax(-1), steps, means
