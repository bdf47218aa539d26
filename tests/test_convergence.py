"""A converted timm network approaches, as T grows, the same network with QCFS at L = T.

(The SNN at T steps approximates the L = T network, not the trained L: NOTES §1.) The
network is put in a realistic regime first: BN statistics and λ from real images.
"""

import pytest
import torch

import qcfs_snntorch as qs
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.config import DataConfig
from qcfs_snntorch.data import build_datasets


@pytest.fixture(scope="module")
def digits():
    splits = build_datasets(DataConfig(name="digits", val_split=0.0))
    train, test = splits.train, splits.test
    return torch.stack([train[i][0] for i in range(256)]), torch.stack([test[i][0] for i in range(64)])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fold_bn", [False, True])
def test_snn_approaches_the_L_equals_T_network(digits, fold_bn):
    calib, x = digits
    torch.manual_seed(0)
    ann = qs.create_model("test_resnet", num_classes=10, in_chans=1)
    calibrate_from_data(ann, calib.split(64))
    snn = qs.convert(ann, fold_bn=fold_bn, chunk_size=32)
    acts = [m for m in ann.modules() if isinstance(m, qs.QCFS)]
    errors = {}
    with torch.no_grad():
        for steps in (4, 16, 64, 256):
            for act in acts:
                act.levels = steps
            target = ann(x)
            rate = snn(x, timesteps=steps).mean(0)
            errors[steps] = relative_error(rate, target)
    assert errors[256] <= 0.1, errors
    assert errors[256] < errors[16] < errors[4], errors
