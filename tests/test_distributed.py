"""Real 2-process DDP on CPU (gloo) through accelerate.debug_launcher.

debug_launcher uses a fixed port: these tests must not run in parallel with each other.
"""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher

pytestmark = pytest.mark.slow  # 2-process DDP over gloo

RESULT = Path(os.environ.get("QCFS_TEST_TMP", "/tmp")) / f"qcfs_ddp_{os.getpid()}.json"


def _launch(function, num_processes: int = 2, folder=None):
    """Run ``function`` on ``num_processes`` ranks; what rank 0 wrote to RESULT, decoded."""
    if folder is not None:
        os.environ["QCFS_DDP_DIR"] = str(folder)
    RESULT.unlink(missing_ok=True)
    debug_launcher(function, num_processes=num_processes)
    try:
        return json.loads(RESULT.read_text())
    finally:
        RESULT.unlink(missing_ok=True)


def _fresh_state():
    """Forget a single-process Accelerate state the parent test process may hold (the children inherit it)."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def _gathered_state(model, accelerator):
    """Every shared tensor's float64 sum and sum of squares, one row per rank."""
    from qcfs_snntorch.training import shared_state

    state = shared_state(model)
    names = sorted(k for k, t in state.items() if t.is_floating_point() and t.numel())
    row = torch.stack([torch.stack([state[k].double().sum(), state[k].double().square().sum()]) for k in names]).flatten()
    return names, accelerator.gather(row.reshape(1, -1)).tolist()


def _disagreeing(names, rows):
    (a, b) = rows
    return sorted({names[i // 2] for i, (x, y) in enumerate(zip(a, b)) if x != y})


def _agreement_across_ranks():
    """Each rank sees different data; after every step the pipeline takes, what must agree does."""
    _fresh_state()
    from torch.utils.data import DataLoader, TensorDataset

    import qcfs_snntorch as qs
    from qcfs_snntorch.config import FinetuneConfig, TrainConfig
    from qcfs_snntorch.training import SpikingFinetune, broadcast_state, fit, make_accelerator

    accelerator = make_accelerator()
    rank = accelerator.process_index
    tmp = Path(os.environ["QCFS_DDP_DIR"])
    torch.manual_seed(0)  # the same initial weights on both ranks, as set_seed gives a run
    model = qs.create_model("test_resnet", num_classes=10, in_chans=1)
    own = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x, y = torch.randn(64, 1, 8, 8, generator=own) * (1 + rank), torch.randint(0, 10, (64,), generator=own)
    results = {}

    qs.calibrate_from_data(model, x.split(16))
    results["calibrated, not synced"] = _disagreeing(*_gathered_state(model, accelerator))
    broadcast_state(model, accelerator)
    results["calibrated, synced"] = _disagreeing(*_gathered_state(model, accelerator))

    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    fit(model, loader, cfg=TrainConfig(epochs=1, lr=0.05), accelerator=accelerator, checkpoints=tmp / "ann", log=lambda m: None)
    results["ANN trained"] = _disagreeing(*_gathered_state(model, accelerator))

    snn = qs.convert(model.eval(), learn_threshold=True)
    qs.calibrate_potentials(model, snn, x[:16], 2)
    results["v(0) calibrated, not synced"] = _disagreeing(*_gathered_state(snn, accelerator))
    broadcast_state(snn, accelerator)
    results["v(0) calibrated, synced"] = _disagreeing(*_gathered_state(snn, accelerator))

    # BN normalising time-folded batches: each rank's running statistics move with its own data.
    cfg = FinetuneConfig(epochs=1, lr=0.01, max_steps_per_epoch=3, checkpoint_every_steps=1)
    fit(snn, loader, task=SpikingFinetune(2, bn="train"), cfg=cfg, accelerator=accelerator, checkpoints=tmp / "snn",
        log=lambda m: None)
    results["fine-tuned"] = _disagreeing(*_gathered_state(snn, accelerator))
    # A mid-epoch checkpoint, resumed into a fresh copy: the continued run agrees too.
    resumed = qs.convert(model.eval(), learn_threshold=True)
    cfg.epochs, cfg.max_steps_per_epoch = 2, 3
    fit(resumed, loader, task=SpikingFinetune(2, bn="train"), cfg=cfg, accelerator=accelerator, checkpoints=tmp / "snn",
        resume=True, log=lambda m: None)
    results["resumed"] = _disagreeing(*_gathered_state(resumed, accelerator))
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps(results))


def test_every_shared_tensor_agrees_across_ranks_fed_different_data(tmp_path):
    results = _launch(_agreement_across_ranks, folder=tmp_path)
    # The data differs, so without the syncs the ranks differ (the test can fail) ...
    assert any("running_var" in name for name in results["calibrated, not synced"])
    assert any("initial_offset" in name for name in results["v(0) calibrated, not synced"])
    # ... and with them every parameter and buffer but the membranes agrees.
    for step in ("calibrated, synced", "ANN trained", "v(0) calibrated, synced", "fine-tuned", "resumed"):
        assert results[step] == [], (step, results[step])


def _streaming_membranes():
    """Two streaming steps through DDP with a different input on each rank."""
    _fresh_state()
    from accelerate.utils import broadcast
    from torch import nn

    import qcfs_snntorch as qs
    from qcfs_snntorch.training import make_accelerator

    class Streaming(nn.Module):
        def __init__(self, snn):
            super().__init__()
            self.snn = snn

        def forward(self, x):
            return self.snn.step(x)

    accelerator = make_accelerator()
    rank = accelerator.process_index
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), qs.QCFS(4, 1.0), nn.Linear(8, 3))
    snn = qs.convert(net)
    reference = copy.deepcopy(snn)
    ddp = accelerator.prepare(Streaming(snn))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank)) * 2
    with torch.no_grad():
        snn.reset()
        outputs = [ddp(x) for _ in range(3)]
        reference.reset()
        expected = [reference.step(x) for _ in range(3)]
    same = all(torch.equal(a, b) for a, b in zip(outputs, expected))
    # The control: copy rank 0's membranes to every rank between two steps, which is what a buffer
    # broadcast would do; then rank 1's outputs are no longer those of its own input.
    with torch.no_grad():
        snn.reset()
        ddp(x)
        for neuron in snn.neurons():
            neuron.mem = broadcast(neuron.mem.clone())
        clobbered = all(torch.equal(ddp(x), e) for e in expected[1:])
    sums = accelerator.gather(torch.stack(outputs).sum().reshape(1))
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps({"wrapped": type(ddp).__name__, "sums": sums.tolist()}))
    assert same, f"rank {rank}: its streaming outputs are not those of its own input"
    assert clobbered == (rank == 0), f"rank {rank}: the control did not change what the test sees"


def test_streaming_membranes_stay_per_rank_under_ddp():
    result = _launch(_streaming_membranes)
    assert result["wrapped"] == "DistributedDataParallel"
    assert result["sums"][0] != result["sums"][1]  # the ranks really ran different inputs


def _evaluate_uneven():
    _fresh_state()
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from qcfs_snntorch.training import evaluate_ann

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
    assert _launch(_evaluate_uneven) == pytest.approx(1 / 101)


def _train_mlp(batch_size: int):
    """Trains a small QCFS MLP without BatchNorm on fixed data; rank 0 writes the weights."""
    _fresh_state()
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import qcfs_snntorch as qs
    from qcfs_snntorch.config import TrainConfig
    from qcfs_snntorch.training import fit, make_accelerator

    accelerator = make_accelerator()
    torch.manual_seed(0)
    x, y = torch.randn(128, 12), torch.randint(0, 4, (128,))
    model = nn.Sequential(nn.Linear(12, 32), qs.QCFS(4, 2.0), nn.Linear(32, 4))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    fit(model, loader, cfg=TrainConfig(epochs=2, lr=0.1, scheduler="none"), accelerator=accelerator,
        checkpoints=Path(os.environ["QCFS_DDP_DIR"]) / f"b{batch_size}", log=lambda m: None)
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps([p.detach().flatten().tolist() for p in model.parameters()]))


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks × batch 8 (DDP averages the gradients) = 1 process × batch 16 on the same data order."""
    two = _launch(lambda: _train_mlp(8), folder=tmp_path)
    one = _launch(lambda: _train_mlp(16), num_processes=1)
    for a, b in zip(two, one):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def _save_with_a_slow_rank():
    """Rank 1 reaches save_state late; the checkpoint must still hold both ranks' files."""
    _fresh_state()
    import time

    from torch import nn

    from qcfs_snntorch.training import CheckpointDir, make_accelerator

    accelerator = make_accelerator()
    accelerator.prepare(nn.Linear(3, 2))  # save_state writes what was prepared
    original = accelerator.save_state

    def late_save_state(output_dir):
        if accelerator.process_index == 1:
            time.sleep(1.0)  # rank 0 finishes its own save long before
        return original(output_dir)

    accelerator.save_state = late_save_state
    saved = CheckpointDir(Path(os.environ["QCFS_DDP_DIR"]), accelerator).save("epoch_0000", {"epoch": 0})
    if accelerator.is_main_process:
        RESULT.write_text(json.dumps(sorted(p.name for p in saved.iterdir())))


def test_a_checkpoint_waits_for_every_rank_before_it_is_complete(tmp_path):
    """CI race: rank 0 renamed .partial while rank 1 was still writing its RNG state into it."""
    names = _launch(_save_with_a_slow_rank, folder=tmp_path)
    assert {"random_states_0.pkl", "random_states_1.pkl", "progress.json"} <= set(names), names
    assert not list(tmp_path.glob(".*.partial"))
