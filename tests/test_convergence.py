"""A converted timm network approaches, as T grows, the same network with QCFS at L = T.

(The SNN at T steps approximates the L = T network, not the trained L: Bu et al., ICLR 2022, Theorem 2; docs/RESULTS.md.) The
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
        means = snn.running_means(x, 1024)  # one run: the output after t steps is the mean of the first t
        for steps in (4, 16, 64, 256, 1024):
            for act in acts:
                act.levels = steps
            errors[steps] = relative_error(means[steps - 1], ann(x))
    assert errors[1024] <= 0.1, errors
    assert errors[1024] < errors[256] < errors[64] < errors[4], errors
