"""Batch conversion of scanner exports: ``medsynth convert``.

Discover the studies of a DICOM export (:mod:`.discovery`), give each series a modality
(:mod:`.classify`), plan which series feed the model (:mod:`.plan`), convert study by study
(:mod:`.runner`) and report every study's outcome (:mod:`.report`).

The names below are imported on first use (PEP 562), so ``medsynth --help`` does not load pydicom or
torch through this package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classify import Classification, SeriesMapping, classify_series
    from .cli import add_convert_arguments, convert_command
    from .discovery import Export, SeriesRecord, Study, discover
    from .report import ConvertReport, StudyResult
    from .runner import run_convert
    from .shard import Shard

_WHERE = {
    "Classification": "classify",
    "SeriesMapping": "classify",
    "classify_series": "classify",
    "add_convert_arguments": "cli",
    "convert_command": "cli",
    "Export": "discovery",
    "SeriesRecord": "discovery",
    "Study": "discovery",
    "discover": "discovery",
    "ConvertReport": "report",
    "StudyResult": "report",
    "run_convert": "runner",
    "Shard": "shard",
}

__all__ = [
    "Classification",
    "ConvertReport",
    "Export",
    "SeriesMapping",
    "SeriesRecord",
    "Shard",
    "Study",
    "StudyResult",
    "add_convert_arguments",
    "classify_series",
    "convert_command",
    "discover",
    "run_convert",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
