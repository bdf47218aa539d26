"""The exceptions of the NIR export (shared by the exporter and its layout helpers)."""

from __future__ import annotations

__all__ = ["ExportError", "NotPortableError"]


class ExportError(ValueError):
    """The network holds something NIR cannot express; nothing was written.

    The message is one paragraph, ``export_nir: …``, naming the first module or operation
    that was refused and why, so a command line can print it as it is. A ``ValueError``,
    so code that caught ``ValueError`` before still catches it.
    """


class NotPortableError(ExportError):
    """The network has an exact NIR form, but not one made of the node types every consumer maps.

    Raised by ``export_nir(..., portable=True)``; with ``portable=None`` (the default) the
    exporter catches it and writes the metadata form instead, recording the reason.
    """
