"""qcfs_snntorch: timm backbones → QCFS ANNs → snnTorch spiking networks at low latency."""

from .calibrate import calibrate_from_data
from .calibrate_snn import calibrate_potentials
from .check import CheckReport, ConversionError, Problem, check
from .convert import convert, fold_batchnorm
from .export import ExportError, export_nir
from .models import UnknownModelError, create_model
from .neurons import IFNeuron, MultiStepNeuron
from .qcfs import QCFS, qcfs
from .spiking import SpikingModel

__version__ = "0.1.0"

__all__ = [
    "QCFS",
    "qcfs",
    "create_model",
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
