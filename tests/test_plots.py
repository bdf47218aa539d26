"""PNG plots from plain dicts: files are written, non-empty PNGs."""

from __future__ import annotations

import json

import pytest

from qcfs_snntorch.pipeline.plots import plot_accuracy_vs_timesteps, plot_conversion_error, plot_firing_rates

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_accuracy_vs_timesteps(tmp_path):
    # Keys as report.json stores them (strings) and as Python writes them (ints).
    snn = json.loads(json.dumps({1: 20.5, 2: 48.0, 4: 80.1, 8: 90.2, 16: 91.5}))
    path = plot_accuracy_vs_timesteps(snn, tmp_path / "sub" / "acc.png", ann=91.8, finetuned={2: 85.0, 4: 89.9})
    assert _is_png(path)
    assert _is_png(plot_accuracy_vs_timesteps({4: 70.0}, tmp_path / "one.png"))


def test_firing_rates(tmp_path):
    stats = {"timesteps": 4, "neurons": [{"name": f"layer{i}.act", "firing_rate": 0.05 * i} for i in range(1, 8)]}
    assert _is_png(plot_firing_rates(stats, tmp_path / "rates.png"))


def test_conversion_error(tmp_path):
    errors = {
        "timesteps": [4, 1, 2],
        "layers": [{"name": "a", "relative": [0.1, 0.9, 0.5]}, {"name": "b", "relative": [None, None, None]}],
    }
    assert _is_png(plot_conversion_error(errors, tmp_path / "err.png"))  # smallest T = 1
    assert _is_png(plot_conversion_error(errors, tmp_path / "err4.png", timesteps=4))
    with pytest.raises(ValueError, match="T=3"):
        plot_conversion_error(errors, tmp_path / "bad.png", timesteps=3)
