"""qcfs_snntorch: timm backbones → QCFS ANNs → snnTorch spiking networks at low latency."""

# Before the imports: the pipeline reads it, and may be imported while this package is still loading.
__version__ = "0.2.0.dev0"

from .calibration import calibrate_from_data, calibrate_potentials
from .check import CheckReport, ConversionError, Problem, check
from .convert import convert, fold_batchnorm
from .export import ExportError, export_nir
from .models import ModelError, UnknownModelError, create_model
from .neurons import GradedIFNeuron, IFNeuron, MultiStepNeuron, SignedIFNeuron
from .qcfs import QCFS, qcfs, set_threshold_gradient
from .spiking import SpikingModel

__all__ = [
    "QCFS",
    "qcfs",
    "set_threshold_gradient",
    "create_model",
    "ModelError",
    "UnknownModelError",
    "check",
    "CheckReport",
    "ConversionError",
    "Problem",
    "convert",
    "fold_batchnorm",
    "SpikingModel",
    "IFNeuron",
    "GradedIFNeuron",
    "SignedIFNeuron",
    "MultiStepNeuron",
    "calibrate_from_data",
    "calibrate_potentials",
    "export_nir",
    "ExportError",
    "load_run",
    "LoadedRun",
]


def __getattr__(name: str):
    """``load_run`` and ``LoadedRun`` live in the pipeline (Accelerate, matplotlib): imported on first use."""
    if name in ("load_run", "LoadedRun"):
        from .pipeline import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
