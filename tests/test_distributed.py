"""Real 2-process DDP on CPU (gloo) through accelerate.debug_launcher.

debug_launcher uses a fixed port: these tests must not run in parallel with each other.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher

RESULT = Path(os.environ.get("QCFS_TEST_TMP", "/tmp")) / f"qcfs_ddp_{os.getpid()}.json"


def _train_two_ranks():
    from torch.utils.data import DataLoader, TensorDataset

    import qcfs_snntorch as qs
    from qcfs_snntorch.config import FinetuneConfig, TrainConfig
    from qcfs_snntorch.finetune import TimeAveraged
    from qcfs_snntorch.train import fit, make_accelerator

    accelerator = make_accelerator()
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = qs.create_model("test_resnet", num_classes=10, in_chans=1, threshold=2.0)
    tmp = Path(os.environ["QCFS_DDP_DIR"])
    fit(model, loader, cfg=TrainConfig(epochs=1, lr=0.05), accelerator=accelerator,
        checkpoint_dir=tmp / "ann", log=lambda m: None)
    ann_flat = torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.dtype.is_floating_point])

    snn = qs.convert(model.eval(), learn_threshold=True)
    wrapped = TimeAveraged(snn, timesteps=2)
    fit(wrapped, loader, cfg=FinetuneConfig(epochs=1, lr=0.01), accelerator=accelerator,
        checkpoint_dir=tmp / "snn", log=lambda m: None)
    snn_flat = torch.cat([p.detach().flatten() for p in snn.parameters()])
    # Each rank's membranes must stay its own: DDP must not broadcast buffers from rank 0.
    ddp = accelerator.prepare(TimeAveraged(qs.convert(model.eval()), timesteps=2))
    no_broadcast = float(ddp.broadcast_buffers is False)
    gathered = accelerator.gather(torch.stack([ann_flat.sum(), snn_flat.sum(), torch.tensor(no_broadcast)]).reshape(1, 3))
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps(gathered.tolist()))


def test_two_ranks_stay_in_sync_and_never_broadcast_neuron_state(tmp_path):
    os.environ["QCFS_DDP_DIR"] = str(tmp_path)
    RESULT.unlink(missing_ok=True)
    debug_launcher(_train_two_ranks, num_processes=2)
    (ann0, snn0, no_broadcast0), (ann1, snn1, _) = json.loads(RESULT.read_text())
    assert ann0 == pytest.approx(ann1, rel=1e-6), "ANN weights (and BN statistics) differ between ranks"
    assert snn0 == pytest.approx(snn1, rel=1e-6), "SNN weights differ between ranks"
    assert no_broadcast0 == 1.0, "DDP broadcasts buffers: rank 0's neuron membranes would overwrite the others'"
    RESULT.unlink()


def _evaluate_uneven():
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from qcfs_snntorch.evaluate import evaluate_ann

    accelerator = Accelerator()

    class AlwaysZero(nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)

    labels = torch.ones(101, dtype=torch.long)
    labels[0] = 0  # only the first sample is right; padding repeats the first samples
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.zeros(101, 1), labels), batch_size=10))
    acc = evaluate_ann(AlwaysZero(), loader, accelerator)
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps(acc))


def test_evaluation_counts_every_sample_once_across_ranks():
    RESULT.unlink(missing_ok=True)
    debug_launcher(_evaluate_uneven, num_processes=2)
    assert json.loads(RESULT.read_text()) == pytest.approx(1 / 101)
    RESULT.unlink()


def _train_mlp(batch_size: int):
    """Trains a small QCFS MLP without BatchNorm on fixed data; rank 0 writes the weights."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import qcfs_snntorch as qs
    from qcfs_snntorch.config import TrainConfig
    from qcfs_snntorch.train import fit, make_accelerator

    accelerator = make_accelerator()
    torch.manual_seed(0)
    x, y = torch.randn(128, 12), torch.randint(0, 4, (128,))
    model = nn.Sequential(nn.Linear(12, 32), qs.QCFS(4, 2.0), nn.Linear(32, 4))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    fit(model, loader, cfg=TrainConfig(epochs=2, lr=0.1, scheduler="none"), accelerator=accelerator,
        checkpoint_dir=Path(os.environ["QCFS_DDP_DIR"]) / f"b{batch_size}", log=lambda m: None)
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps([p.detach().flatten().tolist() for p in model.parameters()]))


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks × batch 8 (DDP averages the gradients) = 1 process × batch 16 on the same data order."""
    os.environ["QCFS_DDP_DIR"] = str(tmp_path)
    RESULT.unlink(missing_ok=True)
    debug_launcher(lambda: _train_mlp(8), num_processes=2)
    two = json.loads(RESULT.read_text())
    RESULT.unlink()
    debug_launcher(lambda: _train_mlp(16), num_processes=1)
    one = json.loads(RESULT.read_text())
    RESULT.unlink()
    for a, b in zip(two, one):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
