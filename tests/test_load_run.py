"""load_run: a finished run's ANN and SNN back in one call, computing exactly what the run's networks computed."""

import pytest
import torch

import qcfs_snntorch as qs
from qcfs_snntorch.config import load_config
from qcfs_snntorch.pipeline.runner import walk
from qcfs_snntorch.pipeline.setup import setup
from qcfs_snntorch.training import CheckpointError, evaluate_snn, read_metadata, save_weights

TIMESTEPS = [1, 2, 4]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The default recipe, shortened, with BN folded and per-channel v(0): the run's context kept for comparison."""
    run_dir = tmp_path_factory.mktemp("load") / "run"
    cfg = load_config([f"run_dir={run_dir}", "stages=[train,convert,calibrate,finetune]", "train.epochs=2",
                       "finetune.epochs=1", "snn.fold_bn=true", f"snn.timesteps={TIMESTEPS}".replace(" ", ""),
                       "snn.calibrate_timesteps=[2]"])
    ctx = setup(cfg)
    walk(ctx)
    return ctx, run_dir


def _outputs(model, x):
    with torch.no_grad():
        return {t: model(x, timesteps=t) for t in TIMESTEPS}


def test_a_run_loads_back_with_the_same_outputs_at_every_T(finished):
    ctx, run_dir = finished
    loaded = qs.load_run(run_dir)
    x = ctx.statistics_batch()
    assert loaded.snn_file == run_dir / "snn.safetensors" and loaded.ann_file == run_dir / "ann.safetensors"
    assert not loaded.snn.training and loaded.cfg.snn.fold_bn
    ctx.snn.eval()
    expected = _outputs(ctx.snn, x)
    for t, out in _outputs(loaded.snn, x).items():
        assert out.shape == (t, len(x), 10) and torch.equal(out, expected[t]), t
    with torch.no_grad():
        assert torch.equal(loaded.ann(x), ctx.ann.eval()(x))
    # the same accuracies as the run reported for its fine-tuned SNN
    report = ctx.run_dir.report["finetune"]["snn_after"]
    assert evaluate_snn(loaded.snn, ctx.test, report["timesteps"], ctx.accelerator) == report["top1"]


def test_the_weights_alone_are_enough(finished, tmp_path):
    """Without config.yaml: the SNN file's metadata rebuilds the network (BN folded, per-channel v(0), learnable θ)."""
    ctx, run_dir = finished
    meta = read_metadata(run_dir / "snn.safetensors")
    assert meta["kind"] == "snn" and meta["model"] == "test_resnet" and meta["num_classes"] == 10 and meta["in_chans"] == 1
    assert meta["convert"]["fold_bn"] and meta["convert"]["learn_threshold"] and meta["timesteps"] == 2
    lone = tmp_path / "mine.safetensors"
    lone.write_bytes((run_dir / "snn.safetensors").read_bytes())
    loaded = qs.load_run(lone)
    assert loaded.cfg is None and loaded.ann is None and loaded.snn_file == lone
    x = ctx.statistics_batch()
    ctx.snn.eval()
    for t, out in _outputs(loaded.snn, x).items():
        assert torch.equal(out, _outputs(ctx.snn, x)[t]), t


def test_each_file_of_a_run_loads(finished, tmp_path):
    ctx, run_dir = finished
    x = ctx.statistics_batch()
    calibrated = qs.load_run(run_dir / "calibrated.safetensors")  # what fine-tuning started from
    assert calibrated.metadata["kind"] == "calibrated" and calibrated.metadata["calibrate"] == ["channel"]
    from_ann = qs.load_run(run_dir / "ann.safetensors")  # converted afresh from the trained ANN
    plain = qs.convert(ctx.ann.eval(), fold_bn=True, verify=False).eval()
    with torch.no_grad():
        assert torch.equal(from_ann.snn(x, timesteps=2), plain(x, timesteps=2))
    # per-channel v(0) (a buffer whose shape calibration changes) survives the round trip
    qs.calibrate_potentials(from_ann.ann, from_ann.snn, x, 2, ["channel"])
    offsets = [n.initial_offset for n in from_ann.snn.neurons()]
    assert any(o.numel() > 1 and o.abs().sum() > 0 for o in offsets)
    save_weights(from_ann.snn, tmp_path / "calibrated.safetensors", read_metadata(run_dir / "calibrated.safetensors"))
    again = qs.load_run(tmp_path / "calibrated.safetensors")
    assert [n.initial_offset.shape for n in again.snn.neurons()] == [o.shape for o in offsets]
    with torch.no_grad():
        for t in TIMESTEPS:
            assert torch.equal(again.snn(x, timesteps=t), from_ann.snn(x, timesteps=t)), t


def test_files_without_the_metadata_are_refused_with_the_way_out(tmp_path):
    model = qs.convert(qs.create_model("test_resnet", num_classes=3))
    save_weights(model, tmp_path / "snn.safetensors", {"model": "test_resnet"})
    with pytest.raises(CheckpointError, match=r"lacks the metadata .*num_classes.*load_weights"):
        qs.load_run(tmp_path / "snn.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no weights"):
        qs.load_run(tmp_path / "empty")


def test_graded_neurons_come_back_graded(tmp_path):
    """snn.max_spikes is part of what a weights file records: a graded SNN reloads as one."""
    from types import SimpleNamespace

    from qcfs_snntorch.data import DatasetInfo
    from qcfs_snntorch.pipeline.load import weights_metadata

    cfg = load_config(["snn.max_spikes=3"])
    info = DatasetInfo("digits", 10, 1, 8, tuple("0123456789"), (0.3,), (0.4,))
    torch.manual_seed(0)
    ann = qs.create_model("test_resnet", num_classes=10, in_chans=1, levels=4, threshold=1.0).eval()
    snn = qs.convert(ann, max_spikes=3).eval()
    save_weights(snn, tmp_path / "snn.safetensors", weights_metadata(SimpleNamespace(cfg=cfg, data=SimpleNamespace(info=info)), "snn"))
    loaded = qs.load_run(tmp_path / "snn.safetensors")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.snn(x, timesteps=2), snn(x, timesteps=2))
    assert type(loaded.snn.neurons()[0]) is type(snn.neurons()[0])
