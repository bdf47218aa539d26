"""The resume dependency table (qcfs_snntorch/pipeline/dependencies.py) covers every setting.

Fast checks on fingerprints only (no training): every key of the schema is classified,
and changing a key makes ``resume=true`` rerun exactly the stages that depend on it and
the stages after them. The end-to-end regressions (λ from data on a retrain, a stale best
SNN) are at the bottom, marked slow.
"""

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qcfs_snntorch.config import STAGES, RunConfig, load_config
from qcfs_snntorch.pipeline.dependencies import DERIVED, IRRELEVANT, NEEDS, Needs, fingerprints, reusable

ALL_STAGES = list(STAGES)


def schema_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the dataclass schema, walked recursively (a dict-valued key is a leaf)."""
    keys = []
    for f in dataclasses.fields(cls):
        kind = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(type(kind), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def covers(entry: str, key: str) -> bool:
    return key == entry or key.startswith(entry + ".")


def stages_reading(key: str) -> set[str]:
    """The stages whose fingerprint holds ``key`` (a key declared irrelevant is left out of a section it is in)."""
    if key in IRRELEVANT:
        return set()
    return {name for name, needs in NEEDS.items() if any(covers(e, key) for e in (*needs.keys, *needs.report))}


def unclassified(keys) -> list[str]:
    return [key for key in keys if key not in IRRELEVANT and not stages_reading(key)]


def test_every_schema_key_is_classified():
    keys = schema_keys()
    assert len(keys) > 80  # the walk reached into every section
    missing = unclassified(keys)
    assert not missing, (f"config keys nobody classified for resume: {missing}. Add each to the stages whose result "
                         "depends on it in qcfs_snntorch/pipeline/dependencies.py NEEDS, or to IRRELEVANT with the reason")


def test_a_new_unclassified_key_fails_the_walk():
    @dataclasses.dataclass
    class Wider(RunConfig):
        brand_new: int = 0

    assert unclassified(schema_keys(Wider)) == ["brand_new"]


def test_the_table_names_only_real_keys_stages_and_facts():
    keys = schema_keys()
    assert set(NEEDS) == set(ALL_STAGES)
    for name, needs in NEEDS.items():
        for entry in (*needs.keys, *needs.report):
            assert any(covers(entry, key) for key in keys), f"{name}: {entry!r} is no schema key or section"
        assert set(needs.derived) <= set(DERIVED)
        # a stage reads only from stages before it, so a fingerprint can be computed in run order
        assert all(ALL_STAGES.index(up) < ALL_STAGES.index(name) for up in needs.after), name
    assert set(IRRELEVANT) <= set(keys)
    both = [key for key in IRRELEVANT if any(key in (*n.keys, *n.report) for n in NEEDS.values())]
    assert not both, f"declared irrelevant but named by a stage: {both}"


# -- changing a key reruns exactly what depends on it --------------------------------------------------

BASE = ["stages=[check,train,convert,eval,calibrate,finetune,export]", "snn.calibrate=[channel]"]


def rerun_after_change(cfg: RunConfig, key: str, value, wanted=ALL_STAGES) -> set[str]:
    """The stages ``resume=true`` reruns after ``key`` changes to ``value`` (fingerprint level)."""
    before = fingerprints(cfg, wanted)
    changed = copy.deepcopy(cfg)
    *path, leaf = key.split(".")
    node = changed
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)
    reusable_now = reusable(fingerprints(changed, wanted), before)
    return {name for name, reuse in reusable_now.items() if not reuse}


def downstream(stages: set[str]) -> set[str]:
    """``stages`` and every stage that reads from one of them, directly or not."""
    out = set(stages)
    for name in ALL_STAGES:
        if set(NEEDS[name].after) & out:
            out.add(name)
    return out


def test_changing_any_key_reruns_its_stages_and_everything_after():
    cfg = load_config(BASE)
    for key in schema_keys():
        if key == "stages":  # which stages run: test_adding_a_stage_reruns_only_what_reads_it
            continue
        expected = downstream(stages_reading(key))
        if key == "finetune.timesteps":  # also the T calibration fits the start of fine-tuning for
            expected |= downstream({"calibrate"})
        assert rerun_after_change(cfg, key, "<changed>") == expected, key


@pytest.mark.parametrize(("override", "expected"), [
    # finding 3: another data folder, another validation split, is another experiment
    ("data.root=/elsewhere", set(ALL_STAGES)),
    ("data.val_split=0.2", set(ALL_STAGES) - {"check"}),
    ("data.split_seed=3", set(ALL_STAGES) - {"check"}),
    ("train.weight_decay=0.001", {"train", "convert", "eval", "calibrate", "finetune", "export"}),
    ("model.threshold=4.0", {"train", "convert", "eval", "calibrate", "finetune", "export"}),
    ("snn.timesteps=[1,2,4]", {"eval", "finetune", "export"}),
    ("snn.early_exit_tolerance=0.01", {"eval", "finetune", "export"}),
    ("snn.calibrate_samples=128", {"calibrate", "finetune", "export"}),
    ("finetune.lr=0.0", {"finetune", "export"}),
    ("finetune.surrogate=atan", {"finetune", "export"}),
    ("snn.max_spikes=2", {"convert", "eval", "calibrate", "finetune", "export"}),
    ("snn.nir_portable=true", {"export"}),
    ("data.num_workers=4", set()),
    ("data.eval_batch_size=7", set()),
])
def test_what_a_change_reruns(override, expected):
    cfg = load_config(BASE)
    key, value = override.split("=")
    value = load_config([*BASE, override])
    for part in key.split("."):
        value = getattr(value, part)
    assert rerun_after_change(cfg, key, value) == expected


def test_without_a_train_stage_the_ann_source_reruns_convert():
    """Finding 3: converting a given checkpoint, λ from data, the ANN's settings still count."""
    cfg = load_config(["stages=[convert,eval]", "model.checkpoint=x.safetensors", "model.threshold_init=data"])
    everything = {"convert", "eval"}
    for key, value in [("model.threshold", 2.0), ("model.threshold_percentile", 99.0), ("model.pretrained", True),
                       ("model.pretrained_file", "y.safetensors"), ("model.checkpoint", "z.safetensors"),
                       ("data.batch_size", 8), ("seed", 1)]:
        assert rerun_after_change(cfg, key, value, wanted=["convert", "eval"]) == everything, key


def test_adding_a_stage_reruns_only_what_reads_it():
    cfg = load_config(["stages=[train,convert,eval,finetune]", "snn.calibrate=[channel]"])
    before = fingerprints(cfg, ["train", "convert", "eval", "calibrate", "finetune"])
    after = fingerprints(cfg, ["train", "convert", "eval", "calibrate", "finetune", "export"])
    assert {name for name, reuse in reusable(after, before).items() if not reuse} == {"export"}
    # fine-tuning added: calibration now also chooses the start of fine-tuning, so it and fine-tuning run
    cfg_eval = load_config(["stages=[train,convert,eval]", "snn.calibrate=[channel]"])
    before = fingerprints(cfg_eval, ["train", "convert", "eval", "calibrate"])
    assert {name for name, reuse in reusable(after, before).items() if not reuse} == {"calibrate", "finetune", "export"}


def test_needs_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        NEEDS["train"].keys = ()
    assert isinstance(NEEDS["train"], Needs)


# -- end to end: findings 1 and 2 of issue 22 -----------------------------------------------------------

TINY = [
    "recipe=quickstart", "stages=[train,convert,eval,finetune]", "seed=0",
    "train.epochs=2", "train.max_steps_per_epoch=8", "finetune.epochs=1", "finetune.max_steps_per_epoch=4",
    "snn.timesteps=[1,2]", "snn.calibrate_timesteps=[2]", "snn.early_exit_reference=2", "snn.stats_samples=8",
]


def run_tiny(*overrides):
    from qcfs_snntorch.pipeline import run

    return run(load_config([*TINY, *overrides]))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("first") / "run"
    report = run_tiny(f"run_dir={run_dir}")
    assert all(1.0 < t < 7.0 for t in report["ann"]["thresholds"])  # λ from data, not model.threshold=8
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.slow
def test_a_resume_that_retrains_measures_lambda_from_data(first_run, tmp_path):
    """Finding 1: another training setting retrains the ANN, from λ measured on data again (not model.threshold)."""
    run_dir = copy_of(first_run, tmp_path)
    second = run_tiny(f"run_dir={run_dir}", "resume=true", "train.weight_decay=0.001")
    assert all(1.0 < t < 7.0 for t in second["ann"]["thresholds"]), second["ann"]["thresholds"]
    assert (run_dir / "log.txt").read_text().count("λ initialised from data") == 2


@pytest.mark.slow
def test_a_resumed_finetuning_never_keeps_another_experiments_snn(first_run, tmp_path):
    """Finding 2: a 'best' SNN better than this experiment can reach, planted where any release keeps it,
    is not read back by a fine-tuning that reruns under other settings."""
    run_dir = copy_of(first_run, tmp_path)
    tensors = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in load_file(run_dir / "snn.safetensors").items()}
    for path in (run_dir / "snn_best.safetensors", run_dir / "checkpoints" / "snn" / "best.safetensors"):
        save_file(tensors, path, metadata={"val_top1": "2.0", "epoch": "7"})
    report = run_tiny(f"run_dir={run_dir}", "resume=true", "finetune.surrogate=atan")
    assert report["finetune"]["kept_epoch"] in (0, 1), report["finetune"]["kept"]
    assert report["finetune"]["val_top1_after"] <= 1.0
    assert not (run_dir / "snn_best.safetensors").exists()


class Stopped(Exception):
    pass


@pytest.mark.slow
def test_kept_epoch_counts_on_after_a_resume(tmp_path, monkeypatch):
    """A fine-tuning stopped after its first epoch and resumed keeps the epoch an uninterrupted run keeps
    (here the second: on these settings it is the best on validation), numbered 2, not 1 again."""
    from qcfs_snntorch.training import CheckpointDir

    # a setting where the second epoch is best (the gradient rule is part of it: with the reset kept, the first is)
    args = ["finetune.epochs=3", "finetune.lr=0.02", "finetune.max_steps_per_epoch=8", "finetune.bn=train", "finetune.detach_reset=true"]
    whole = run_tiny(f"run_dir={tmp_path / 'whole'}", *args)["finetune"]
    assert whole["kept_epoch"] == 2, whole["kept"]  # the setting this test needs

    save = CheckpointDir.save

    def save_then_stop(self, name, progress):
        path = save(self, name, progress)
        if self.path.name == "snn" and name == "epoch_0000":
            raise Stopped  # as if killed right after fine-tuning's first epoch
        return path

    monkeypatch.setattr(CheckpointDir, "save", save_then_stop)
    with pytest.raises(Stopped):
        run_tiny(f"run_dir={tmp_path / 'stopped'}", *args)
    monkeypatch.undo()
    resumed = run_tiny(f"run_dir={tmp_path / 'stopped'}", "resume=true", *args)["finetune"]
    assert resumed["kept_epoch"] == 2, resumed["kept"]
    assert resumed["val_top1_after"] == whole["val_top1_after"] and len(resumed["history"]) == 3
