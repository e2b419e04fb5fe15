"""Image formats, one module each, registered by file ending (see :mod:`.base`).

To add a format, write a module with a reader (and a writer) that calls
``register(ImageFormat(name, suffixes, read, write, write_suffixes=...))`` and import it below.
"""

from __future__ import annotations

from . import dicom, itk, nifti  # noqa: F401  (importing a format module registers it)
from .base import ImageFormat, finish, format_for, known_endings, register, registered, volume_key

__all__ = ["ImageFormat", "finish", "format_for", "known_endings", "register", "registered", "volume_key"]
