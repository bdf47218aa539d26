"""qcfs_snntorch: timm backbones → QCFS ANNs → snnTorch spiking networks at low latency."""

from .calibration import calibrate_from_data, calibrate_potentials
from .check import CheckReport, ConversionError, Problem, check
from .convert import convert, fold_batchnorm
from .export import ExportError, export_nir
from .models import ModelError, UnknownModelError, create_model
from .neurons import IFNeuron, MultiStepNeuron
from .qcfs import QCFS, qcfs
from .spiking import SpikingModel

__version__ = "0.2.0.dev0"

__all__ = [
    "QCFS",
    "qcfs",
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
    "MultiStepNeuron",
    "calibrate_from_data",
    "calibrate_potentials",
    "export_nir",
    "ExportError",
]
