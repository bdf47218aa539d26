"""Export of a converted SNN: NIR graphs (:mod:`.nir`) and a reference executor for them (:mod:`.simulate`)."""

from .nir import ExportError, export_nir
from .simulate import simulate_nir

__all__ = ["ExportError", "export_nir", "simulate_nir"]
