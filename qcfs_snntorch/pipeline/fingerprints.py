"""Fingerprints: the settings a stage's result depends on, as a flat ``{dotted key: value}`` dict.

Which settings each stage's fingerprint holds is the table of :mod:`.dependencies`; this
module has the tools (picking keys, digests, differences). A stage's fingerprint also holds
the digests of the stages it reads from (``after``), so a change anywhere upstream changes
every fingerprint downstream. ``resume=true`` reuses a stage only when its fingerprint is
the one recorded in report.json; a training stage
continues from its checkpoints only when the fingerprint they were written under differs
from the current one at most in :data:`CONTINUABLE` keys (more epochs, another learning rate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

__all__ = ["ARCHITECTURE", "CONTINUABLE", "architecture", "changed", "describe", "digest", "pick"]

# Which network a run directory holds: resuming it with another is refused outright.
ARCHITECTURE = ("model.name", "model.levels", "model.activations", "model.cifar_stem", "model.kwargs", "data.name")
# May differ between a training checkpoint and the run continuing from it.
CONTINUABLE = frozenset(f"{section}.{key}" for section in ("train", "finetune") for key in ("epochs", "lr"))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def pick(cfg, keys) -> dict:
    """``{dotted key: value}`` for ``keys`` of a :class:`~qcfs_snntorch.config.RunConfig`;
    a key naming a section (``"train"``) takes every key under it."""
    out = {}
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        value = _plain(value)
        if isinstance(value, dict) and key != "model.kwargs":
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def architecture(cfg) -> dict:
    return pick(cfg, ARCHITECTURE)


def digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed(before: dict, now: dict) -> list[str]:
    """Keys whose values differ (present in one only counts)."""
    return sorted(key for key in set(before) | set(now) if before.get(key, "<unset>") != now.get(key, "<unset>"))


def describe(before: dict, now: dict, keys: list[str], was: str = "was") -> str:
    """``key=now (was before)`` for each key, for messages; ``after`` names the upstream stages whose results changed."""
    def show(fp, key):
        return repr(fp.get(key, "<unset>"))

    def one(key):
        if key != "after":
            return f"{key}={show(now, key)} ({was} {show(before, key)})"
        old, new = before.get("after") or {}, now.get("after") or {}
        stages = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        return f"the result of {', '.join(stages)} (upstream) changed"
    return "; ".join(one(key) for key in keys)
