"""Which timm architectures convert: check() on every name, then convert() + an SNN forward on a sample.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/coverage_census.py              # both stages
    python benchmarks/coverage_census.py --stage 1 --names resnet18 vit_tiny_patch16_224
    python benchmarks/coverage_census.py --limit 40 --extra 3 --size 64 --out-dir /tmp/census_quick

Stage 1 (structure): every name of ``timm.list_models()`` is built with
``create_model(name, num_classes=10, activations=("relu",))`` on the ``meta`` device (no
weights are allocated, so size costs nothing) and passed to ``check`` with an example input of
its default size, also on ``meta``: the batch probe (``check(example=…)``, shapes only; records
say ``probe: true``, lines from before it have no such key). A model refused
*only* because activations other than ReLU are left over, or with no ReLU to replace, is
built again with every activation group (``ACTIVATION_GROUPS``: relu, silu, gelu, hardswish,
mish, elu) and checked again (such a network has to be trained with QCFS from the start).
Each name ends as ``converts``, ``compensated``, ``refused`` (with its causes: ``untraceable``,
``no_activation``, then the ``Problem.kind`` values) or ``failed`` (an exception in
``create_model`` or ``check``).

Stage 2 (does it really run): from the converting names, the smallest-parameter member
of every timm family (the model module of its entrypoint, e.g. ``timm.models.resnet``)
plus ``--extra`` more drawn at random (``--seed``), each at most ``--max-params`` million
parameters, are built for real on the CPU (``pretrained=False``, eval mode), converted
with ``convert`` and run once: ``snn(torch.rand(1, 3, S, S), timesteps=T)``. S is the
model's default input size (its pretrained cfg; 224 without one), capped by ``--size``
unless the architecture has a fixed input size. A run counts when the output is
``[T, 1, 10]`` (or ``[T, 1, …]``: an encoder without a classifier head, such as timm's
``*_enc`` models, gives its features) and finite.

Each name of stage 1 ends as one outcome: ``converts`` (IF neurons and linear operations
only), ``compensated`` (converts, with non-linear operations run as compensated operations:
counted when ``check``'s report has a ``compensated`` attribute, a count or a list, and
absent from packages whose ``check`` has no such category), ``refused`` or ``failed``.

Both stages append one JSON line per model to ``stage1.jsonl`` / ``stage2.jsonl`` in
``--out-dir`` as they go and skip names already there, so an interrupted run resumes
where it stopped (delete the files to start over); ``runs.jsonl`` records the command,
commit and machine of every run. ``--shard K/N`` splits stage 1 over N processes writing
to one out-dir; ``--shuffle SEED`` checks the names in a random order (an unfinished run is
then a random sample). At the end ``coverage_census.json`` (everything) and
``coverage_census.md`` (the tables) are written from all lines; ``--doc docs/COVERAGE.md``
writes the tables into the doc between its ``coverage_census`` markers too, and
``--stage report`` does only that:

    python benchmarks/coverage_census.py --stage report --doc docs/COVERAGE.md
"""

# ruff: noqa: I001  (_common goes before torch: it sets OMP_WAIT_POLICY)
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

from _common import machine

import timm
import torch

import qcfs_snntorch as qs
from qcfs_snntorch.activations import ACTIVATION_GROUPS
from qcfs_snntorch.calibration.thresholds import calibrate_from_data

NORMS = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)

ROOT = Path(__file__).resolve().parents[1]
RELU = ("relu",)
FALLBACK = tuple(ACTIVATION_GROUPS)  # every group QCFS may replace: relu, silu, gelu, hardswish, mish, elu
CONVERTING = ("converts", "compensated")  # stage 1 outcomes that stage 2 builds, converts and runs
KIND_LABELS = {
    "gate": "gating",
    "norm": "LayerNorm/GroupNorm",
    "attention": "attention",
    "shared": "activation in a loop/shared",
    "max": "max",
    "nonlinear": "other non-linear op",
    "activation": "activation left",
    "no_activation": "no activation",
}


# ---------------------------------------------------------------- provenance


def package_hash() -> str:
    """sha256 (16 hex digits) of the package's sources: which code produced a line."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "qcfs_snntorch").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(argv: list[str]) -> dict:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(["python", "benchmarks/coverage_census.py", *argv]),
        "machine": machine(),
        "python": platform.python_version(),
        "timm": timm.__version__,
        "qcfs_snntorch": qs.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "package_changes": git("status", "--porcelain", "--", "qcfs_snntorch").splitlines(),
        "package_hash": package_hash(),
    }


# ---------------------------------------------------------------- helpers


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()[:300]


def families() -> dict[str, str]:
    """model name → its timm family (model module), from timm's public registry queries."""
    return {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}


def read_jsonl(path: Path) -> dict[str, dict]:
    """name → the last record written for it (a resumed run may have rewritten a line)."""
    records: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["name"]] = rec
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("gave up after --timeout seconds")


# ---------------------------------------------------------------- stage 1


def _check_once(name: str, activations: tuple[str, ...], rec: dict) -> tuple[torch.nn.Module, qs.CheckReport]:
    rec["step"] = "create_model"
    with torch.device("meta"):  # no weights are initialised: big models cost nothing
        model = qs.create_model(name, num_classes=10, activations=activations)
    rec["step"] = "check"
    example = torch.empty((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224), device="meta")
    rec["probe"] = True
    return model, qs.check(model, example=example)


def compensated_ops(report: qs.CheckReport) -> int | None:
    """How many non-linear ops convert as compensated operations (issue 21), or None where
    ``check`` does not report that yet: the census runs on either package."""
    found = getattr(report, "compensated", None)
    if found is None:
        return None
    return found if isinstance(found, int) else len(found)


def outcome(report: qs.CheckReport) -> str:
    """``converts`` (IF neurons and linear ops only), ``compensated`` (converts with compensated ops) or ``refused``."""
    if not report.convertible:
        return "refused"
    return "compensated" if compensated_ops(report) else "converts"


def refusal_kinds(report: qs.CheckReport) -> list[str]:
    """Why a name is refused (empty: it converts): ``untraceable`` (the whole network does not trace, so
    nothing could be compensated) and ``no_activation`` first where they apply, then the refused ops' kinds."""
    if report.convertible:
        return []
    causes = ["untraceable"] if getattr(report, "untraceable", None) else []
    causes += [] if report.activations else ["no_activation"]
    return causes + sorted({p.kind for p in report.problems} - set(causes))


def census_one(name: str, family: str, pkg: str) -> dict:
    """Stage 1 for one name: ReLU-only, then every activation group if only leftover activations stood in the way
    or the ReLU-only build has no activation to replace (a ViT: with compensation its GELU would
    otherwise be the only thing left, and a network without neurons is refused)."""
    rec = {"name": name, "family": family, "package_hash": pkg, "activations": list(RELU)}
    start = time.perf_counter()
    try:
        model, report = _check_once(name, RELU, rec)
        if {p.kind for p in report.problems} == {"activation"} or not report.activations:
            rec["relu_only_problems"] = [str(p)[:160] for p in report.problems[:3]]
            rec["activations"] = list(FALLBACK)
            model, report = _check_once(name, FALLBACK, rec)
    except Exception as exc:  # every exception is a census result too
        rec.update(status="failed", error=first_line(exc), traceback=traceback.format_exc()[-800:])
    else:
        del rec["step"]
        rec.update(
            status=outcome(report),
            compensated_ops=compensated_ops(report),
            kinds=refusal_kinds(report),
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            qcfs=report.activations,
            replaced=model.qcfs_surgery["activations"],
            rewritten_calls=sum(len(v) for v in model.qcfs_surgery["calls"].values()),
            problems=len(report.problems),
            first_problems=[str(p)[:160] for p in report.problems[:3]],
            untraced=report.untraced,
        )
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def run_stage1(names: list[str], fams: dict[str, str], path: Path, pkg: str) -> float:
    done = read_jsonl(path)
    todo = [n for n in names if n not in done]
    print(f"stage 1: {len(names)} names, {len(names) - len(todo)} already in {path}, {len(todo)} to check", flush=True)
    start = time.perf_counter()
    for i, name in enumerate(todo, 1):
        rec = census_one(name, fams.get(name, "?"), pkg)
        append_jsonl(path, rec)
        print(f"[1: {i}/{len(todo)}] {name}: {rec['status']} {rec.get('kinds', rec.get('error', ''))} {rec['seconds']}s", flush=True)
        gc.collect()
    return time.perf_counter() - start


# ---------------------------------------------------------------- stage 2


def sample(records: dict[str, dict], max_params: float, extra: int, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """Smallest converting member per family (within the cap) plus ``extra`` random others; and the over-cap families."""
    by_family: dict[str, list[dict]] = defaultdict(list)
    for rec in records.values():
        if rec["status"] in CONVERTING:
            by_family[rec["family"]].append(rec)
    chosen, over_cap = [], {}
    for family, recs in sorted(by_family.items()):
        fitting = sorted((r for r in recs if r["params_m"] <= max_params), key=lambda r: (r["params_m"], r["name"]))
        if fitting:
            chosen.append(fitting[0]["name"])
        else:
            over_cap[family] = sorted(r["name"] for r in recs)
    rest = sorted(r["name"] for recs in by_family.values() for r in recs if r["params_m"] <= max_params and r["name"] not in chosen)
    chosen += sorted(random.Random(seed).sample(rest, min(extra, len(rest))))
    return chosen, over_cap


def input_size(name: str, cap: int | None) -> tuple[int, int, bool]:
    """(S used, default S, fixed) from the model's pretrained cfg."""
    cfg = timm.models.get_pretrained_cfg(name)
    default = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    size = default if cap is None or fixed else min(cap, default)
    return size, default, fixed


def _wake(model: torch.nn.Module, size: int) -> None:
    """Random weights that spike: normalisation gains in [0.5, 1.5], layer scales at 1 and zero-initialised
    linear layers drawn anew (timm starts some at 0 or 1e-6, which leaves whole branches or the head
    silent), then λ and BN statistics from random images.
    Without this many outputs are exactly 0 and the consistency check below would be vacuous."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, NORMS) and isinstance(weight, torch.nn.Parameter):
            weight.data.uniform_(0.5, 1.5, generator=gen)
        gamma = getattr(module, "gamma", None)
        if isinstance(gamma, torch.nn.Parameter):
            gamma.data.fill_(1.0)
        if isinstance(module, torch.nn.Linear) and not module.weight.any():  # zero-initialised heads
            module.weight.data.normal_(0.0, 0.02, generator=gen)
    images = torch.rand(4, 3, size, size, generator=gen)
    calibrate_from_data(model, [images], percentile=99.9, update_bn=True)
    model.eval()


def _convert_and_run(model: torch.nn.Module, rec: dict, size: int, timesteps: int) -> dict:
    """λ from data, ``convert``, one folded forward at ``timesteps``, and the same steps through the
    streaming ``step`` API: ``consistent`` when both agree (time folded into the batch stayed where
    the compensated operations expect it)."""
    _wake(model, size)
    start = time.perf_counter()
    snn = qs.convert(model)
    rec.update(converted=True, convert_s=round(time.perf_counter() - start, 2), step="forward")
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = snn(x, timesteps=timesteps)
    forward_s = round(time.perf_counter() - start, 2)
    shape = list(out.shape)
    finite = bool(torch.isfinite(out).all())
    return {
        "forward_s": forward_s,
        "shape": shape,
        "finite": finite,
        # [T, 1, 10]; an encoder without a classifier head (timm's *_enc) gives its features: it ran too
        "ran": shape[:2] == [timesteps, 1] and finite,
        "classifier": shape == [timesteps, 1, 10],
        "output_scale": round(float(out.abs().max()), 6) if finite else None,
        **(_folded_against_streamed(snn, x, timesteps) if finite else {}),
    }


def _folded_against_streamed(snn: qs.SpikingModel, x: torch.Tensor, timesteps: int) -> dict:
    """The folded forward against the same steps through the streaming ``step`` API, in float64.

    In float32 the two see other batch sizes, so the linear layers round differently (~1e-6), and a
    membrane that close to θ fires in one and not the other: on deep networks at T = 2 such flips
    moved the outputs by up to 36 % (cs3sedarknet_l) while float64 agreed to 1e-16. Time mixed with
    another dimension would change the outputs wholesale in any precision.
    """
    snn, x = snn.double(), x.double()
    with torch.no_grad():
        snn.reset()
        folded = snn(x, timesteps=timesteps)
        snn.reset()
        stepped = torch.stack([snn.step(x) for _ in range(timesteps)])
    if stepped.shape != folded.shape:
        return {"stream_relative_diff": None, "consistent": False}
    relative = float((folded - stepped).norm() / folded.norm().clamp_min(1e-300))
    return {"stream_relative_diff": relative, "consistent": relative <= 1e-9}


def _run_steps(name: str, rec: dict, size: int, timesteps: int) -> None:
    """Build, convert, run; fills ``rec`` as it goes so a failure keeps what was reached."""
    torch.manual_seed(0)
    start = time.perf_counter()
    model = qs.create_model(name, num_classes=10, activations=tuple(rec["activations"])).eval()
    rec["build_s"] = round(time.perf_counter() - start, 2)
    rec["step"] = "convert"
    try:
        rec.update(_convert_and_run(model, rec, size, timesteps))
    except Exception as exc:
        if size == rec["default_size"]:
            raise
        # Too small for this architecture: say so, then try the model's own size.
        rec.update(capped_error=first_line(exc), size=rec["default_size"], step="convert")
        rec.update(_convert_and_run(model, rec, rec["default_size"], timesteps))
    rec.pop("step")


def run_one(name: str, stage1: dict, cap: int | None, timesteps: int, timeout: int) -> dict:
    size, default, fixed = input_size(name, cap)
    rec = {
        "name": name, "family": stage1["family"], "params_m": stage1["params_m"], "activations": stage1["activations"],
        "size": size, "default_size": default, "fixed_input_size": fixed, "timesteps": timesteps,
        "converted": False, "ran": False, "step": "create_model",
    }
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        _run_steps(name, rec, size, timesteps)
    except Exception as exc:  # every failure is a result (Timeout included)
        rec.update(error=first_line(exc), traceback=traceback.format_exc()[-1500:])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def run_stage2(names: list[str], stage1: dict[str, dict], path: Path, args, pkg: str) -> float:
    done = read_jsonl(path)
    todo = [n for n in names if n not in done]
    print(f"stage 2: {len(names)} models, {len(names) - len(todo)} already in {path}, {len(todo)} to run", flush=True)
    start = time.perf_counter()
    for i, name in enumerate(todo, 1):
        rec = run_one(name, stage1[name], args.size, args.timesteps, args.timeout)
        rec["package_hash"] = pkg
        append_jsonl(path, rec)
        outcome = "ran" if rec["ran"] else f"FAILED at {rec.get('step')}: {rec.get('error', rec.get('shape'))}"
        print(f"[2: {i}/{len(todo)}] {name} ({rec['params_m']} M, {rec['size']} px): {outcome} {rec['seconds']}s", flush=True)
        gc.collect()
    return time.perf_counter() - start


# ---------------------------------------------------------------- summaries

# Stage 1 outcomes, in the order of docs/COVERAGE.md's table, with what each means.
OUTCOMES = {
    "converts": "converts: IF neurons and linear operations only",
    "compensated": "converts with compensated non-linear operations",
    "refused": "refused, with the module paths and a reason",
    "failed": "failed otherwise (an exception in `create_model` or `check`)",
}
# Refusal reasons (``Problem.kind``) → what they are, for the reasons table.
KIND_TEXT = {
    "activation": "an activation left over (SiLU, GELU, hard-swish, … in a ReLU-only build; a `clamp`, or `F.relu` "
                  "in a helper method)",
    "norm": "LayerNorm / GroupNorm / RMSNorm: statistics of the activations per sample",
    "gate": "squeeze-excite and other `x * sigmoid(...)` gates, softmax",
    "attention": "products of two signals (`q @ k`, `scaled_dot_product_attention`)",
    "shared": "one activation module called in a loop or by several branches",
    "max": "max pooling that is not a module (`F.max_pool2d` in `forward`), `amax`",
    "nonlinear": "`exp`, `pow`, `abs`, … of a signal (e.g. StarReLU, RMS-style norms written by hand)",
    "no_activation": "no activation QCFS could replace (e.g. EvoNorm/FRN layers that hold their own non-linearity)",
    "untraceable": "the whole network does not trace with torch.fx (data-dependent control flow), so its non-linear "
                   "ops cannot be compensated; the kinds beside it are what a network of IF neurons alone refuses",
}
MARK_START, MARK_END = "<!-- coverage_census: start -->", "<!-- coverage_census: end -->"


def stage1_totals(records: list[dict]) -> dict:
    status = Counter(r["status"] for r in records)
    converting = [r for r in records if r["status"] in CONVERTING]
    return {
        "names": len(records),
        "outcomes": {**{o: status[o] for o in OUTCOMES}, **{o: n for o, n in status.items() if o not in OUTCOMES}},
        # None in every line: the package's check has no compensated category (before issue 21).
        "compensated_reported": any(r.get("compensated_ops") is not None for r in records),
        "converts_relu_only": sum(r["activations"] == list(RELU) for r in converting),
        "converts_after_silu_gelu": sorted(r["name"] for r in converting if r["activations"] != list(RELU)),
        "refusal_kinds": dict(Counter(k for r in records if r["status"] == "refused" for k in r["kinds"]).most_common()),
        "failures": {r["name"]: r["error"] for r in records if r["status"] == "failed"},
        "model_seconds": round(sum(r["seconds"] for r in records), 1),
    }


def family_rows(records: list[dict]) -> list[dict]:
    rows = []
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    for family, recs in sorted(by_family.items()):
        status = Counter(r["status"] for r in recs)
        after = sum(r["status"] in CONVERTING and r["activations"] != list(RELU) for r in recs)
        kinds = Counter(k for r in recs if r["status"] == "refused" for k in r["kinds"])
        rows.append({
            "family": family, "archs": len(recs), **{o: status[o] for o in OUTCOMES}, "after_silu_gelu": after,
            "reasons": ", ".join(f"{KIND_LABELS.get(k, k)} {n}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        })
    return rows


def stage2_summary(records: list[dict], over_cap: dict[str, list[str]]) -> dict:
    return {
        "sampled": len(records),
        "converted": sum(r["converted"] for r in records),
        "ran": sum(r["ran"] for r in records),
        # lines written before the streaming comparison existed have no "consistent"
        "compared": sum("consistent" in r for r in records if r["ran"]),
        "consistent": sum(bool(r.get("consistent")) for r in records if r["ran"]),
        "families": len({r["family"] for r in records}),
        "failures": [{k: r.get(k) for k in ("name", "family", "step", "error", "shape", "finite")} for r in records if not r["ran"]],
        "families_over_cap": over_cap,
        "model_seconds": round(sum(r["seconds"] for r in records), 1),
    }


def _stage2_cell(r: dict) -> str:
    if r["ran"]:
        note = f" (at {r['size']} px after: {r['capped_error']})" if r.get("capped_error") else ""
        return f"{r['seconds']} s{note}"
    if r.get("error"):
        return f"{r.get('step')}: `{r['error'][:160]}`"
    return f"shape {r.get('shape')}, finite {r.get('finite')}"


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f} %" if total else "–"


def _provenance_lines(summary: dict) -> list[str]:
    m = summary["meta"]
    changes = f", with uncommitted changes to {len(m['package_changes'])} package file(s)" if m["package_changes"] else ""
    lines = [
        f"Generated by `{m['command']}` on {m['date']} (commit {m['git_commit'][:10]}{changes}; timm {m['timm']}, "
        f"qcfs_snntorch {m['qcfs_snntorch']}, Python {m['python']}). Edit the script, not this block.", "",
    ]
    runs = summary.get("runs", [])
    if runs:
        lines += ["The lines it reads were written by:", ""]
        lines += [f"- `{r['command']}` (started {r['date']}, commit {r['git_commit'][:10]}, package sources "
                  f"{r['package_hash']}; {r['machine']['cpu']}, {r['machine']['nproc']} cores, load {r['machine']['loadavg_1m']})"
                  for r in runs]
        lines.append("")
    hashes = Counter(r["package_hash"] for r in summary.get("stage1", {}).get("records", []))
    if len(hashes) > 1:
        lines += [f"**Stage 1's lines come from {len(hashes)} different package sources** (hash: lines): "
                  + ", ".join(f"{h}: {n}" for h, n in hashes.most_common()) + ".", ""]
    return lines


def _stage1_lines(summary: dict) -> list[str]:
    t, listed = summary["stage1"]["totals"], summary.get("timm_names")
    total, out = t["names"], t["outcomes"]
    converting = sum(out.get(o, 0) for o in CONVERTING)
    scope = f"all {total} names of `timm.list_models()`" if listed in (None, total) else \
        f"**{total} of the {listed} names of `timm.list_models()`** (an unfinished run: the rest is not checked)"
    comp = f"{out['compensated']} with compensated operations" if t["compensated_reported"] else \
        "compensated operations: not a category of this package's `check`"
    lines = [
        "### Stage 1: `check` on every name (meta device)", "",
        f"Checked: {scope}. **{converting} of {total} convert ({_share(converting, total)})**: "
        f"{out['converts']} with IF neurons and linear operations only, {comp}.", "",
        "| outcome | archs | share |", "|---|---|---|",
    ]
    for o, text in OUTCOMES.items():
        n = out[o] if o != "compensated" or t["compensated_reported"] else "–"
        lines.append(f"| {text} | **{n}** | {_share(n, total) if isinstance(n, int) else '–'} |")
        if o == "compensated":
            lines += [f"| — of the converting: with `activations=(\"relu\",)` (the default) | {t['converts_relu_only']} | |",
                      f"| — of the converting: only with other activation groups replaced too (SiLU, GELU, hard-swish, …): retrain | "
                      f"{len(t['converts_after_silu_gelu'])} | |"]
    lines += [f"| {o} (an outcome this table does not know) | **{n}** | {_share(n, total)} |" for o, n in out.items() if o not in OUTCOMES]
    lines += [f"| total | {total} | |", "", "Refusals by reason (an architecture often has several):", "",
              "| reason (`Problem.kind`) | refused archs | what it is |", "|---|---|---|",
              *(f"| `{k}` | {n} | {KIND_TEXT.get(k, '')} |" for k, n in t["refusal_kinds"].items()), ""]
    if t["failures"]:
        lines += ["Failed:", "", *(f"- {name}: `{err}`" for name, err in sorted(t["failures"].items())), ""]
    comp_head = "compensated | " if t["compensated_reported"] else ""
    lines += [
        "#### Per family", "",
        "Families are timm's model modules. \"converts (n with more groups)\": n of them only after replacing other activation groups "
        "as well; \"activation left\" counts refused architectures that also have a non-ReLU activation.", "",
        f"| family | archs | converts | {comp_head}refused | failed | refused because (archs per reason) |",
        "|---|---|---|" + ("---|" if comp_head else "") + "---|---|---|",
    ]
    for row in summary["stage1"]["families"]:
        conv = f"{row['converts']} ({row['after_silu_gelu']} with more groups)" if row["after_silu_gelu"] else str(row["converts"])
        comp_cell = f"{row['compensated']} | " if comp_head else ""
        lines.append(f"| {row['family']} | {row['archs']} | {conv} | {comp_cell}{row['refused']} | {row['failed']} | {row['reasons']} |")
    lines += ["", f"Model time (build + check, summed over lines): {t['model_seconds'] / 60:.1f} minutes.", ""]
    return lines


def _stage2_lines(records: list[dict], over_cap: dict[str, list[str]]) -> list[str]:
    s = stage2_summary(records, over_cap)
    lines = [
        "### Stage 2: `convert` and one SNN forward", "",
        f"**{s['ran']} of {s['sampled']} models convert and run a forward pass** "
        f"({s['converted']} convert; {s['families']} families; {s['model_seconds'] / 60:.1f} minutes of model time). "
        f"Folded over T and run step by step through the streaming API, **{s['consistent']} of the {s['compared']} "
        f"compared agree** (in float64, ‖folded − streamed‖ ≤ 1e-9 × ‖folded‖; lines written before this "
        f"comparison existed show –).", "",
        "| family | model | params (M) | input | converted | ran | folded = streaming | seconds / error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "**no**"}
    for r in sorted(records, key=lambda r: (r["family"], r["name"])):
        same = yes[r["consistent"]] if "consistent" in r else "–"
        lines.append(f"| {r['family']} | {r['name']} | {r['params_m']} | {r['size']} | {yes[r['converted']]} | "
                     f"{yes[r['ran']]} | {same} | {_stage2_cell(r)} |")
    for family, names in over_cap.items():
        lines.append(f"| {family} | all over the cap: {', '.join(names)} | | | — | — | — | skipped |")
    return [*lines, ""]


def markdown(summary: dict) -> str:
    """The generated part of docs/COVERAGE.md: provenance, stage 1's outcomes and reasons, stage 2's runs."""
    lines = _provenance_lines(summary)
    if summary.get("stage1", {}).get("totals", {}).get("names"):
        lines += _stage1_lines(summary)
    if summary.get("stage2_all"):
        lines += _stage2_lines(summary["stage2_all"], summary.get("stage2", {}).get("summary", {}).get("families_over_cap", {}))
    else:
        lines += ["### Stage 2", "", "Not run for this census (no `stage2.jsonl` in the out-dir).", ""]
    return "\n".join(lines)


def write_doc(doc: Path, block: str) -> None:
    """Replace the generated block of ``doc`` (between its markers); the prose around it stays."""
    text = doc.read_text() if doc.is_file() else ""
    if text.count(MARK_START) != 1 or text.count(MARK_END) != 1:
        raise SystemExit(f"--doc {doc}: needs exactly one {MARK_START} and one {MARK_END} line (where the tables go)")
    before, rest = text.split(MARK_START)
    _, after = rest.split(MARK_END)
    doc.write_text(f"{before}{MARK_START}\n{block}\n{MARK_END}{after}")


# ---------------------------------------------------------------- main


def shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["1", "2", "all", "report"], default="all",
                    help="report: run nothing, only write the summaries (and --doc) from the lines in --out-dir")
    ap.add_argument("--doc", type=Path, help="also write the tables into this file between its coverage_census markers "
                                             "(docs/COVERAGE.md)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "coverage_census")
    ap.add_argument("--names", nargs="+", help="only these timm names (stage 2: run exactly these)")
    ap.add_argument("--limit", type=int, help="stage 1: only the first N names of timm.list_models()")
    ap.add_argument("--shard", type=shard, default=(0, 1), metavar="K/N",
                    help="stage 1: only every N-th name from the K-th (0-based); run N processes with one out-dir "
                         "(each appends whole lines) to use N cores")
    ap.add_argument("--shuffle", type=int, metavar="SEED", help="stage 1: check the names in a random order")
    ap.add_argument("--extra", type=int, default=15, help="stage 2: random converting models beyond one per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-params", type=float, default=150.0, help="stage 2: skip models over this many million parameters")
    ap.add_argument("--size", type=int, help="stage 2: cap the input side at this many pixels (not for fixed-size models)")
    ap.add_argument("--timesteps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600, help="stage 2: seconds per model")
    return ap.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta, fams = provenance(argv), families()
    path1, path2 = args.out_dir / "stage1.jsonl", args.out_dir / "stage2.jsonl"
    summary: dict = {"meta": meta, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "timm_names": len(timm.list_models())}
    if args.stage != "report":  # which commands wrote the lines: the doc's header lists them
        append_jsonl(args.out_dir / "runs.jsonl", {"name": f"{meta['date']} {meta['command']}", **{k: meta[k] for k in ("date", "command", "git_commit", "package_hash", "machine")}})
    names = args.names or timm.list_models()[: args.limit]
    if args.stage == "1":
        if args.shuffle is not None:  # an interrupted run has then checked a random sample, not the first letters
            names = random.Random(args.shuffle).sample(names, len(names))
        names = names[args.shard[0]:: args.shard[1]]
    if args.stage in ("1", "all"):
        summary["stage1"] = {"wall_s_this_run": round(run_stage1(names, fams, path1, meta["package_hash"]), 1)}
    stage1 = read_jsonl(path1)
    if args.stage in ("2", "all"):
        if args.names:
            missing = [n for n in args.names if n not in stage1]
            run_stage1(missing, fams, path1, meta["package_hash"])
            stage1 = read_jsonl(path1)
            picked, over_cap = [n for n in args.names if stage1[n]["status"] in CONVERTING], {}
            if len(picked) < len(args.names):
                print(f"stage 2: not converting by stage 1, not run: {sorted(set(args.names) - set(picked))}", flush=True)
        else:
            picked, over_cap = sample(stage1, args.max_params, args.extra, args.seed)
        wall = run_stage2(picked, stage1, path2, args, meta["package_hash"])
        done2 = read_jsonl(path2)
        records2 = [done2[n] for n in picked]
        summary["stage2"] = {"wall_s_this_run": round(wall, 1), "picked": picked,
                             "summary": stage2_summary(records2, over_cap), "records": records2}
    records1 = list(stage1.values())
    summary["runs"] = list(read_jsonl(args.out_dir / "runs.jsonl").values())
    summary["stage2_all"] = list(read_jsonl(path2).values())
    summary.setdefault("stage1", {}).update(totals=stage1_totals(records1), families=family_rows(records1),
                                            package_hashes=sorted({r["package_hash"] for r in records1}), records=records1)
    (args.out_dir / "coverage_census.json").write_text(json.dumps(summary, indent=1))
    block = markdown(summary)
    (args.out_dir / "coverage_census.md").write_text(block)
    if args.doc:
        write_doc(args.doc, block)
    print(block)


if __name__ == "__main__":
    main(sys.argv[1:])
