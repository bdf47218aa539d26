"""`--help` lists every schema key from the schema; `--dry-run` shows the resolved config and the plan, doing nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from qcfs_snntorch.config import key_help, load_config, schema_keys
from qcfs_snntorch.pipeline.cli import dry_run
from qcfs_snntorch.pipeline.runner import plan

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_every_schema_key_has_a_type_a_default_and_a_meaning():
    rows = key_help()
    assert [key for key, *_ in rows] == schema_keys()
    missing = [key for key, _, _, meaning in rows if not meaning.strip()]
    assert not missing, f"schema keys without help (give them setting(default, help) in config.py): {missing}"


def test_help_lists_every_key_with_type_default_and_meaning():
    result = launch("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for key, kind, default, meaning in key_help():
        at = next((i for i, line in enumerate(lines) if line.strip().startswith(f"{key} ({kind}) = ")), None)
        assert at is not None, f"{key} is not listed by --help"
        assert json.dumps(default, ensure_ascii=False) in lines[at]
        assert meaning in lines[at] or meaning in lines[at + 1]
    assert "--dry-run" in result.stdout


def test_dry_run_prints_the_resolved_config_and_plan_and_does_nothing(tmp_path):
    run_dir = tmp_path / "never"
    result = launch("--dry-run", "train.epochs=3", "stages=[train,convert,eval]", f"run_dir={run_dir}",
                    f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    config, _, stages = result.stdout.partition("# stages")
    resolved = yaml.safe_load(config)
    assert resolved["train"]["epochs"] == 3 and resolved["recipe"] == "quickstart"
    assert resolved["finetune"]["distill"] == load_config().finetune.distill  # the recipe's value, merged in
    assert "train: run" in stages and "eval: run" in stages and "finetune: skipped" in stages
    assert not run_dir.exists() and not (tmp_path / "runs").exists(), "a dry run writes nothing"
    assert "[ANN] epoch" not in result.stdout + result.stderr, "a dry run trains nothing"


def _recorded(cfg) -> dict:
    """A report.json as a completed run of ``cfg`` leaves it (the fingerprints the runner records)."""
    return {"stages": {step.stage.name: {"seconds": 1.0, "fingerprint": step.fingerprint} for step in plan(cfg, {})}}


def test_dry_run_with_resume_names_the_stages_it_would_reuse(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = load_config([f"run_dir={run_dir}"])
    (run_dir / "report.json").write_text(json.dumps(_recorded(first)))
    same = dry_run(load_config([f"run_dir={run_dir}", "resume=true"]))
    assert all(f"{stage}: reuse" in same for stage in first.stages)
    changed = dry_run(load_config([f"run_dir={run_dir}", "resume=true", "finetune.lr=0.02"]))
    assert "train: reuse" in changed and "convert: reuse" in changed and "eval: reuse" in changed
    assert "finetune: run" in changed
    upstream = dry_run(load_config([f"run_dir={run_dir}", "resume=true", "train.weight_decay=0.001"]))
    assert all(f"{stage}: run" in upstream for stage in first.stages), "a rerun stage reruns every stage after it"


def test_dry_run_through_launch_on_a_resumed_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.json").write_text(json.dumps(_recorded(load_config([f"run_dir={run_dir}"]))))
    before = sorted(p.name for p in run_dir.iterdir())
    result = launch("--dry-run", f"run_dir={run_dir}", "resume=true", "finetune.epochs=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: reuse" in result.stdout and "finetune: run" in result.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == before, "a dry run writes nothing into the run directory"


def test_dry_run_shows_the_plan_and_then_what_the_run_would_refuse(tmp_path):
    result = launch("--dry-run", "data.name=imagefolder", f"data.root={tmp_path / 'missing'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "# stages" in result.stdout and "train: run" in result.stdout
    assert f"error: data.root='{tmp_path / 'missing'}': it does not exist" in result.stderr
