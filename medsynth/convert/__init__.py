"""Batch conversion of scanner exports: ``medsynth convert``.

Discover the studies of a DICOM export (:mod:`.discovery`), give each series a modality
(:mod:`.classify`), plan which series feed the model (:mod:`.plan`), convert study by study
(:mod:`.runner`) and report every study's outcome (:mod:`.report`).
"""

from .classify import Classification, SeriesMapping, classify_series
from .cli import add_convert_arguments, convert_command
from .discovery import Export, SeriesRecord, Study, discover
from .report import ConvertReport, StudyResult
from .runner import run_convert
from .shard import Shard

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
