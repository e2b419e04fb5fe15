"""Series → modality for ``medsynth convert``: the user's ``--map`` rules, then the shared rule set.

The rules themselves (derived and non-anatomical series skipped, DICOM Modality, keywords, then TR/TE/TI
physics) live in :mod:`medsynth.io.series_modality`, shared with the ``dicom`` dataset layout. Here the
user's YAML mapping (a regex on the series description) is put in front of them.

Every decision carries its reason so ``--dry-run`` can show *why* a series got its modality.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import ConfigError
from ..io.series_modality import Classification, classify_tags
from ..modalities import canonical_modality

if TYPE_CHECKING:
    from .discovery import SeriesRecord

#: Mapping values that exclude a series instead of naming a modality.
IGNORE_VALUES = frozenset({"ignore", "skip", "none"})


@dataclass(frozen=True)
class SeriesMapping:
    """User rules: ordered ``(regex, modality or None)`` pairs matched on the series description.

    Loaded from YAML, either a mapping or a list of one-key mappings (to make the order explicit)::

        "(?i)^ax t2 frfse": t2
        "(?i)post.*gad": t1c
        "(?i)calibration": ignore
    """

    rules: tuple[tuple[re.Pattern[str], str | None], ...] = ()

    @classmethod
    def from_yaml(cls, path: str | Path) -> SeriesMapping:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read the series mapping ({exc.strerror}); check the --map path", path
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML ({exc.__class__.__name__}); fix the syntax", path) from exc
        if isinstance(data, list):
            items: list[tuple[object, object]] = []
            for entry in data:
                if not isinstance(entry, Mapping) or len(entry) != 1:
                    raise ConfigError("each list item must be one 'regex: modality' pair", path)
                items.extend(entry.items())
        elif isinstance(data, Mapping):
            items = list(data.items())
        else:
            raise ConfigError("expected 'regex: modality' pairs, e.g. \"(?i)flair\": flair", path)
        return cls(tuple(_compile_rule(pattern, value, path) for pattern, value in items))

    def match(self, description: str) -> Classification | None:
        for pattern, modality in self.rules:
            if pattern.search(description):
                return Classification(modality, f"--map rule {pattern.pattern!r}")
        return None


def _compile_rule(pattern: object, value: object, path: Path) -> tuple[re.Pattern[str], str | None]:
    try:
        regex = re.compile(str(pattern))
    except re.error as exc:
        raise ConfigError(f"bad regex {pattern!r} ({exc}); fix the pattern", path) from exc
    if value is None or str(value).strip().lower() in IGNORE_VALUES:
        return regex, None
    try:
        return regex, canonical_modality(str(value))
    except Exception as exc:
        raise ConfigError(f"{exc} (in the rule for {pattern!r})", path) from exc


def classify_series(series: SeriesRecord, mapping: SeriesMapping | None = None) -> Classification:
    """Give one series a canonical modality, or ``None`` with the reason it is not an input.

    The user's ``--map`` rules come first (image series only, so a catch-all rule cannot turn a report
    into an input); then the shared rules of :func:`medsynth.io.series_modality.classify_tags`.

    >>> from medsynth.convert.discovery import SeriesRecord
    >>> classify_series(SeriesRecord(series_uid="1.2", description="AX FLAIR", dicom_modality="MR")).modality
    'flair'
    """
    if not series.is_image:
        return Classification(None, "not an image object")
    if mapping is not None:
        decided = mapping.match(series.description)
        if decided is not None:
            return decided
    return classify_tags(
        description=series.description,
        protocol=series.protocol,
        sequence_name=series.sequence_name,
        dicom_modality=series.dicom_modality,
        image_type=series.image_type,
        scanning_sequence=series.scanning_sequence,
        repetition_time=series.repetition_time,
        echo_time=series.echo_time,
        inversion_time=series.inversion_time,
        contrast_agent=series.contrast_agent,
    )
