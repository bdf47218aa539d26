"""launch.py end to end, as a user runs it: a real subprocess, real data, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_quickstart_tiny_budget_writes_report(tmp_path):
    run = tmp_path / "run"
    result = launch("train.epochs=3", "finetune.epochs=1", "snn.timesteps=[1,2,4,8]", f"run_dir={run}", "log_with=[tensorboard]")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["recipe"] == "quickstart" and report["model"] == "test_resnet" and report["dataset"] == "digits"
    assert report["levels"] == 4
    assert 0.0 <= report["ann"]["top1"] <= 1.0
    assert report["snn"]["timesteps"] == [1, 2, 4, 8]
    assert len(report["snn"]["top1"]) == 4 and all(0 <= a <= 1 for a in report["snn"]["top1"])
    ft = report["finetune"]
    assert ft["timesteps"] == 2 and 0 <= ft["top1_before"] <= 1 and 0 <= ft["top1_after"] <= 1
    assert set(report["stages"]) == {"train", "convert", "eval", "calibrate", "finetune", "export"}
    assert report["calibration"]["timesteps"] == [1, 2, 4] and len(report["calibration"]["top1"]) == 3
    assert all(s["seconds"] >= 0 for s in report["stages"].values())
    assert report["spikes"]["totals"]["snn_energy_uj"] > 0 and report["spikes"]["energy_model"]["pj_per_ac"] == 0.9
    assert len(report["conversion_error"]["layers"]) == report["convert"]["neurons"]
    for name in ("ann.safetensors", "snn.safetensors", "config.yaml", "log.txt", "snn.nir",
                 "accuracy_vs_timesteps.png", "firing_rates.png", "conversion_error.png"):
        assert (run / name).is_file(), name

    assert list(run.glob("tracking/events.out.tfevents.*")), "TensorBoard events missing"

    # a later stage starts from the checkpoint the first run wrote
    run2 = tmp_path / "run2"
    result = launch("stages=[convert,eval]", f"model.checkpoint={run / 'ann.safetensors'}", "snn.timesteps=[8]", f"run_dir={run2}")
    assert result.returncode == 0, result.stderr[-3000:]
    report2 = json.loads((run2 / "report.json").read_text())
    assert report2["ann"]["top1"] == pytest.approx(report["ann"]["top1"])
    assert report2["snn"]["top1"][0] == pytest.approx(report["snn"]["top1"][3])
    assert "train" not in report2["stages"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.nmae=resnet18"], "unknown config key 'model.nmae'"),
        (["recipe=does_not_exist"], "valid recipes:"),
        (["model.name=resnet181"], "closest timm names: resnet18"),
        (["model.levels=0"], "model.levels must be > 0"),
        (["stages=[convert,eval]", "model.checkpoint=/nonexistent/ann.safetensors"], "does not exist"),
        (["model.name=seresnet18"], "layer1.0.se.gate"),
        (["data.name=imagefolder", "data.root=/nonexistent/cifar"], "does not exist"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, args, message):
    result = launch(*args, f"output_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "no run directory may be left behind"


def test_help_lists_recipes_and_stages():
    result = launch("--help", timeout=60)
    assert result.returncode == 0
    assert "quickstart" in result.stdout and "finetune" in result.stdout


def test_progressive_finetuning_runs_each_T_in_order(tmp_path):
    run = tmp_path / "run"
    result = launch("train.epochs=1", "finetune.epochs=1", "finetune.max_steps_per_epoch=3", "finetune.progressive=[4]",
                    "finetune.timesteps=2", "snn.timesteps=[2,4]", "stages=[train,convert,eval,finetune]", f"run_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert [h["timesteps"] for h in report["finetune"]["history"]] == [4, 2]
    assert report["finetune"]["timesteps"] == 2
    assert (run / "checkpoints" / "snn_T4").is_dir() and (run / "checkpoints" / "snn_T2").is_dir()


def test_start_from_a_trained_relu_network(tmp_path):
    """Issue 4, item 0: ReLU weights → λ from activation statistics → short QCFS training."""
    relu = tmp_path / "relu"
    result = launch("model.activations=[]", "stages=[train]", "train.epochs=6", f"run_dir={relu}")
    assert result.returncode == 0, result.stderr[-3000:]
    relu_top1 = json.loads((relu / "report.json").read_text())["ann"]["top1"]
    assert relu_top1 > 0.8

    strict = launch(f"model.checkpoint={relu / 'ann.safetensors'}", "model.threshold_init=fixed", "stages=[convert,eval]",
                    f"output_dir={tmp_path / 'x'}")
    assert strict.returncode == 2 and "missing" in strict.stderr  # λ absent: only allowed with threshold_init=data

    qcfs = tmp_path / "qcfs"
    result = launch(f"model.checkpoint={relu / 'ann.safetensors'}", "model.threshold_init=data", "train.epochs=1",
                    "train.lr=0.01", "stages=[train,convert,eval]", "snn.timesteps=[8]", f"run_dir={qcfs}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((qcfs / "report.json").read_text())
    assert report["ann"]["top1"] > relu_top1 - 0.05
    assert all(t != 8.0 for t in report["ann"]["thresholds"])
