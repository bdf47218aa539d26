"""Kill and resume, as it happens on a cluster: a real ``python launch.py`` killed with SIGKILL
at a random step, then rerun with the same command plus ``resume=true``.

One uninterrupted run is the reference (module fixture). The interrupted run is killed
twice: once at a random step checkpoint of ANN training, and once more, after resuming,
at a random step checkpoint of SNN fine-tuning; the second resume must reuse the trained
ANN instead of retraining it, and the final weights must equal the reference's.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # kill-and-resume runs of the whole command line

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# A tiny, deterministic budget: 2 ANN epochs of 6 steps, 1 fine-tuning epoch of 6 steps, a
# checkpoint after every optimizer update so that a kill can land anywhere.
ARGS = [
    "stages=[train,convert,eval,finetune]",
    "seed=0",
    "train.epochs=2",
    "train.max_steps_per_epoch=6",
    "train.checkpoint_every_steps=1",
    "finetune.epochs=1",
    "finetune.max_steps_per_epoch=6",
    "finetune.checkpoint_every_steps=1",
    "snn.timesteps=[1,2]",
]

def launch(*args, stdout=None):
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, env=ENV, stdout=stdout or subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300,
    )


def complete_checkpoints(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / "progress.json").is_file())


def launch_and_kill(args, watch: Path, nth: int, output: Path) -> None:
    """Start launch.py, SIGKILL it as soon as the nth distinct complete checkpoint shows up in ``watch``."""
    with output.open("w") as out:
        proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        seen: set[str] = set()
        deadline = time.monotonic() + 240
        try:
            while len(seen) < nth:
                assert proc.poll() is None, f"the run ended before its checkpoint {nth} in {watch}:\n{output.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint appeared in time"
                seen.update(complete_checkpoints(watch))
                time.sleep(0.002)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())
    assert worst <= 1e-6, f"{a.name} differs from the uninterrupted run's by up to {worst}"


def comparable(report: dict) -> dict:
    """A report without what may differ between two identical runs: timings and the run directory."""
    report = json.loads(json.dumps(report))
    report.pop("run_dir")
    report.pop("stages")
    for section in ("ann", "finetune"):
        for epoch in report.get(section, {}).get("history", []):
            epoch.pop("seconds")
    return report


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    result = launch(*ARGS, f"run_dir={run}")
    assert result.returncode == 0, result.stdout[-3000:]
    return run


def test_killed_run_resumes_to_the_same_weights(reference, tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    run = tmp_path / "run"
    where = f"(random seed of the kill points: {seed})"

    # 1. killed during ANN training, after a random one of its first step checkpoints
    launch_and_kill([*ARGS, f"run_dir={run}"], run / "checkpoints" / "ann", rng.randint(1, 6), tmp_path / "1.txt")
    assert not (run / "ann.safetensors").exists(), f"the kill came after ANN training ended {where}"
    killed = json.loads((run / "report.json").read_text())  # a killed run's report says where it stopped
    assert killed["status"] == "running" and killed["running_stage"] == "train", killed

    # 2. the same command with resume=true, killed again during fine-tuning
    launch_and_kill([*ARGS, f"run_dir={run}", "resume=true"], run / "checkpoints" / "snn", rng.randint(1, 3), tmp_path / "2.txt")
    second = (tmp_path / "2.txt").read_text()
    assert "[ANN] resumed from" in second, second[-3000:]
    assert (run / "ann.safetensors").is_file() and not (run / "snn.safetensors").exists(), where
    assert_same_weights(run / "ann.safetensors", reference / "ann.safetensors")

    # 3. resumed once more: the ANN is reused, fine-tuning continues from its checkpoint
    third = launch(*ARGS, f"run_dir={run}", "resume=true")
    assert third.returncode == 0, third.stdout[-3000:]
    assert "[ANN] training was complete: reusing" in third.stdout and "[ANN] epoch" not in third.stdout, third.stdout[-3000:]
    assert "[SNN T=2] resumed from" in third.stdout, third.stdout[-3000:]
    assert_same_weights(run / "ann.safetensors", reference / "ann.safetensors")
    assert_same_weights(run / "snn.safetensors", reference / "snn.safetensors")
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "complete"
    assert comparable(report) == comparable(json.loads((reference / "report.json").read_text())), where


def test_same_seed_same_report(reference, tmp_path):
    """Determinism: the same command twice on the same machine gives the same report (accuracies, losses)."""
    run = tmp_path / "run"
    result = launch(*ARGS, f"run_dir={run}")
    assert result.returncode == 0, result.stdout[-3000:]
    first, second = (json.loads((r / "report.json").read_text()) for r in (reference, run))
    assert second["ann"]["top1"] == first["ann"]["top1"] and second["snn"]["top1"] == first["snn"]["top1"]
    assert second["finetune"]["top1_after"] == first["finetune"]["top1_after"]
    assert comparable(second) == comparable(first)


def test_resume_refuses_another_model(reference, tmp_path):
    """resume=true with settings the checkpoints cannot fit: a clear error before anything is written."""
    from accelerate import PartialState

    from qcfs_snntorch.config import ConfigError, load_config
    from qcfs_snntorch.pipeline.run_dir import choose_run_dir
    from qcfs_snntorch.pipeline.setup import refuse_another_model

    def choose(cfg):
        return choose_run_dir(cfg, PartialState(), accept=lambda path: refuse_another_model(path, cfg))

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((reference / "config.yaml").read_text())
    cfg = load_config([*ARGS, "model.levels=8", f"run_dir={run}", "resume=true"])
    with pytest.raises(ConfigError) as err:
        choose(cfg)
    assert "cannot resume" in str(err.value) and "model.levels=8 (the run used 4)" in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    # the same settings pass
    assert choose(load_config([*ARGS, f"run_dir={run}", "resume=true"])) == run
    # a config.yaml that does not pass the schema is refused, not used
    (run / "config.yaml").write_text("model:\n  nmae: resnet18\n")
    with pytest.raises(ConfigError, match="does not pass the schema"):
        choose(load_config([*ARGS, f"run_dir={run}", "resume=true"]))


def _copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def test_resume_with_a_changed_setting_reruns_what_it_affects(reference, tmp_path):
    """Another surrogate: the ANN is reused, the stages that depend on the surrogate run again from scratch
    (their old checkpoints are of another experiment), and the report records the new setting."""
    run = _copy_of(reference, tmp_path)
    result = launch(*ARGS, f"run_dir={run}", "resume=true", "finetune.surrogate=atan")
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "[ANN] training was complete: reusing" in out and "[ANN] epoch" not in out, out[-3000:]
    assert "[snn] its checkpoints were written with other settings" in out and "finetune.surrogate='atan'" in out, out[-3000:]
    assert "[SNN T=2] resumed from" not in out and "[SNN T=2] epoch 1/1" in out, out[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["stages"]["finetune"]["fingerprint"]["finetune.surrogate"] == "atan"
    assert report["stages"]["train"] == json.loads((reference / "report.json").read_text())["stages"]["train"]


def test_resume_with_more_epochs_continues_from_the_checkpoint(reference, tmp_path):
    """More fine-tuning epochs: the same experiment, continued from its last checkpoint (not started over)."""
    run = _copy_of(reference, tmp_path)
    result = launch(*ARGS, f"run_dir={run}", "resume=true", "finetune.epochs=2")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "[SNN T=2] resumed from" in result.stdout and "epoch 1 of 2 done" in result.stdout, result.stdout[-3000:]
    assert "[SNN T=2] epoch 1/2" not in result.stdout and "[SNN T=2] epoch 2/2" in result.stdout
    history = json.loads((run / "report.json").read_text())["finetune"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
