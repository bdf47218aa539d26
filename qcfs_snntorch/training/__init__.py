"""Training with Hugging Face Accelerate: the loop, its tasks, checkpoints, evaluation, rank agreement."""

from .checkpoints import CheckpointDir, CheckpointError, atomic_write_text, load_weights, read_metadata, save_weights
from .distributed import average_batchnorm_stats, broadcast_state, make_accelerator, shared_state
from .evaluate import evaluate_ann, evaluate_ann_at_levels, evaluate_snn, evaluate_snn_exits, quantization_levels
from .loop import SCHEDULERS, TrainingDiverged, TrainingOutOfMemory, TrainingSetupError, fit, non_finite
from .tasks import Classification, SpikingFinetune, distillation_loss, draw, tet_loss

__all__ = [
    "SCHEDULERS",
    "CheckpointDir",
    "CheckpointError",
    "Classification",
    "SpikingFinetune",
    "TrainingDiverged",
    "TrainingOutOfMemory",
    "TrainingSetupError",
    "atomic_write_text",
    "average_batchnorm_stats",
    "broadcast_state",
    "distillation_loss",
    "draw",
    "evaluate_ann",
    "evaluate_ann_at_levels",
    "evaluate_snn",
    "evaluate_snn_exits",
    "fit",
    "load_weights",
    "make_accelerator",
    "non_finite",
    "quantization_levels",
    "read_metadata",
    "save_weights",
    "shared_state",
    "tet_loss",
]
