"""Export of a converted SNN: NIR graphs (:mod:`.nir`) and a reference executor for them (:mod:`.simulate`)."""

from .errors import ExportError, NotPortableError
from .nir import export_nir
from .simulate import simulate_nir

__all__ = ["ExportError", "NotPortableError", "export_nir", "simulate_nir"]
