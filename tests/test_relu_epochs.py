"""train.relu_epochs: the first epochs train a ReLU network, then QCFS goes on with λ measured from it.

The switch is a function of the epoch number alone, so a run killed before, at or after it and
resumed ends with the weights of an uninterrupted one; λ is measured once, at the start of the
first QCFS epoch, and never again when a resumed run continues that epoch from a checkpoint.
"""

import pytest
import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qcfs_snntorch as qs
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.config import ConfigError, TrainConfig, load_config
from qcfs_snntorch.tracing import qcfs_layers
from qcfs_snntorch.training import Classification, fit, make_accelerator


def loader(n=48, batch=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)


class Counted(nn.Module):
    """Counts forward passes; pass number ``fail_at`` raises (a kill)."""

    def __init__(self, model, fail_at=None):
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.model(x)


def network(fail_at=None):
    torch.manual_seed(0)
    return Counted(qs.create_model("test_resnet", num_classes=10, in_chans=1, threshold=8.0), fail_at)


def probe(model) -> float:
    """The first QCFS's output for a large input: unclipped as ReLU, at most λ as QCFS."""
    return qcfs_layers(model)[0](torch.full((1, 4), 100.0)).max().item()


def test_first_epochs_are_relu_then_lambda_is_measured_once_and_qcfs_trains(tmp_path):
    model = network()
    measured, probes = [], []

    def measure(m):
        measured.append(m.calls)
        for act in qcfs_layers(m):
            act.threshold.data.fill_(3.0)

    task = Classification(relu_epochs=2, measure_thresholds=measure)
    fit(model, loader(), cfg=TrainConfig(epochs=3, lr=0.05, scheduler="none"), accelerator=make_accelerator(),
        checkpoints=tmp_path, task=task, evaluate=lambda m: probes.append(probe(m)) or 0.0, log=lambda m: None)
    assert probes[:2] == [100.0, 100.0], probes  # epochs 1 and 2: every QCFS acts as ReLU
    assert probes[2] <= 3.5, probes  # epoch 3: QCFS, clipped near the measured λ (3.0, then trained)
    assert measured == [2 * 3], measured  # once, before epoch 3 (after 2 epochs of 3 training forwards)
    assert probe(model) <= 3.5  # no ReLU hook left behind
    lambdas = [act.threshold.item() for act in qcfs_layers(model)]
    assert all(abs(value - 3.0) < 0.5 for value in lambdas), lambdas


def test_relu_epochs_give_lambda_a_zero_gradient_and_the_relu_network_its_gradients():
    """In the ReLU epochs λ is in the graph with weight 0 (DDP needs a gradient of every parameter)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), qs.QCFS(4, 0.1), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    twin.load_state_dict({k: v for k, v in net.state_dict().items() if "threshold" not in k})
    task = Classification(relu_epochs=1, measure_thresholds=lambda m: None)
    task.start_epoch(net, 0, 0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    task(net, x, y, 0)["loss"].backward()
    nn.functional.cross_entropy(twin(x), y).backward()
    assert torch.allclose(net[0].weight.grad, twin[0].weight.grad)
    assert net[1].threshold.grad is not None and net[1].threshold.grad.item() == 0.0
    task.close(net)
    assert net[1](torch.full((1, 2), 5.0)).max().item() == pytest.approx(0.1)  # QCFS again: clipped at λ


def _train(path, fail_at=None, resume=False, measured=None):
    set_seed(0)
    model = network(fail_at)
    calibration = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def measure(m):
        (measured if measured is not None else []).append(m.calls)
        calibrate_from_data(m, [calibration], update_bn=False)

    cfg = TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, max_steps_per_epoch=3)
    cfg.checkpoint_every_steps = 1
    task = Classification(relu_epochs=1, measure_thresholds=measure)
    fit(model, loader(), cfg=cfg, accelerator=make_accelerator(), checkpoints=path, task=task, resume=resume,
        log=lambda m: None)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("fail_at, measured_on_resume", [(2, 1), (6, 0)], ids=["killed-in-relu-epoch", "killed-after-switch"])
def test_resume_across_the_switch_gives_the_uninterrupted_weights(reference, tmp_path, fail_at, measured_on_resume):
    # Forward passes: 3 training steps of epoch 1 (ReLU), 1 for measuring λ, then epoch 2's.
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", fail_at=fail_at)
    measured = []
    resumed = _train(tmp_path / "run", resume=True, measured=measured)
    assert len(measured) == measured_on_resume, measured  # mid-epoch after the switch, λ is in the checkpoint
    worst = max((reference[k].double() - resumed[k].double()).abs().max().item() for k in reference if reference[k].numel())
    assert worst <= 1e-6, worst


def test_config_refuses_relu_epochs_that_leave_no_qcfs_epoch():
    assert load_config(["train.epochs=4", "train.relu_epochs=2"]).train.relu_epochs == 2
    with pytest.raises(ConfigError, match="train.relu_epochs=4 leaves no QCFS epoch"):
        load_config(["train.epochs=4", "train.relu_epochs=4"])

