"""Series → modality: which contrast a scanner series holds.

Scanner exports name series freely (``t2_tse_tra``, ``AX FLAIR``, ``MPRAGE post``), so the decision
uses, in order: the user's YAML mapping (a regex on the series description wins over everything),
the DICOM ``Modality`` (CT), keywords in SeriesDescription / ProtocolName / SequenceName, and last the
acquisition physics (TR / TE / TI, inversion recovery, contrast agent). Series that must never be
used as a network input (localizers, diffusion, perfusion, angiography, derived or synthetic images)
are recognised first so a keyword such as ``T2`` in ``T2* perfusion`` cannot pull them in.

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
from ..modalities import canonical_modality

if TYPE_CHECKING:
    from .discovery import SeriesRecord

#: Mapping values that exclude a series instead of naming a modality.
IGNORE_VALUES = frozenset({"ignore", "skip", "none"})


@dataclass(frozen=True)
class Classification:
    """The modality given to a series (``None``: not usable as input) and why."""

    modality: str | None
    reason: str


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


# Series that are not anatomical contrasts a generator can take as input.
_EXCLUDE = re.compile(
    r"localizer|localiser|scout|survey|pilot|\bloc\b|calibrat|\bcal\b|asset|dwi|diffusion|\bdti\b|\badc\b|"
    r"trace|ep2d|diff|perfusion|\bperf\b|\bdsc\b|\bdce\b|\basl\b|\bswi\b|\bswan\b|angio|\btof\b|\bmra\b|\bmip\b|"
    r"\bmpr\b|projected|medsynth|synthetic|phoenix|\bbold\b|fmri|spectro",
    re.IGNORECASE,
)
_FLAIR = re.compile(r"flair|dark.?fluid|\btirm\b|t2.?fl", re.IGNORECASE)
_POST = re.compile(r"\+c\b|\bgd\b|gad|contrast|post|\bce\b|\bc\+", re.IGNORECASE)
_T1 = re.compile(r"t1|mprage|mp.?rage|spgr|\btfl\b|bravo|\bvibe\b|\bmp2rage\b", re.IGNORECASE)
_T2 = re.compile(r"t2(?!\*)|\btse\b|frfse|\bhaste\b|\bspace\b|\bcube\b", re.IGNORECASE)
_PD = re.compile(r"\bpd\b|pdw|proton.?dens", re.IGNORECASE)


def classify_series(series: SeriesRecord, mapping: SeriesMapping | None = None) -> Classification:
    """Give one series a canonical modality, or ``None`` with the reason it is not an input.

    ``--map`` rules apply to image series only, so a catch-all rule cannot turn a report into an input.

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
    if "DERIVED" in series.image_type and "PRIMARY" not in series.image_type:
        return Classification(None, "derived series (ImageType DERIVED)")
    if series.dicom_modality == "CT":
        return Classification("ct", "DICOM Modality CT")
    if series.dicom_modality != "MR":
        return Classification(None, f"DICOM Modality {series.dicom_modality or 'missing'} is not MR or CT")
    # Scanner names separate words with '_' or '-', which regex word boundaries do not see.
    text = re.sub(
        r"[_\-]+", " ", " ".join(filter(None, (series.description, series.protocol, series.sequence_name)))
    )
    if _EXCLUDE.search(text):
        return Classification(
            None, f"description {_EXCLUDE.search(text).group(0)!r} marks a non-anatomical series"
        )
    by_name = _classify_by_name(text, series.contrast_agent)
    return by_name if by_name is not None else _classify_by_physics(series)


def _classify_by_name(text: str, contrast_agent: str) -> Classification | None:
    if _FLAIR.search(text):
        return Classification("flair", "description names FLAIR")
    if _T1.search(text):
        if contrast_agent or _POST.search(text):
            why = "ContrastBolusAgent set" if contrast_agent else "description names contrast"
            return Classification("t1c", f"description names T1, {why}")
        return Classification("t1", "description names T1")
    if _PD.search(text):
        return Classification("pd", "description names PD")
    if _T2.search(text):
        return Classification("t2", "description names T2")
    return None


def _classify_by_physics(series: SeriesRecord) -> Classification:
    """Classic spin-echo weighting from TR/TE/TI, used when names say nothing."""
    tr, te, ti = series.repetition_time, series.echo_time, series.inversion_time
    if tr is None or te is None:
        return Classification(None, "no recognisable name and no TR/TE; add a --map rule")
    timing = f"TR={tr:g} TE={te:g}" + (f" TI={ti:g}" if ti else "") + " ms"
    inversion = "IR" in series.scanning_sequence or bool(ti)
    if inversion and ti and ti >= 1500 and te >= 60:
        return Classification("flair", f"fluid-suppressed inversion recovery ({timing})")
    if inversion and ti and 300 <= ti < 1500 and te < 20:
        modality = "t1c" if series.contrast_agent else "t1"
        return Classification(modality, f"T1 inversion recovery ({timing})")
    if tr < 1000 and te < 30:
        modality = "t1c" if series.contrast_agent else "t1"
        return Classification(modality, f"short TR, short TE ({timing})")
    if tr >= 2000 and te >= 70:
        return Classification("t2", f"long TR, long TE ({timing})")
    if tr >= 1500 and te < 40:
        return Classification("pd", f"long TR, short TE ({timing})")
    return Classification(None, f"ambiguous weighting ({timing}); add a --map rule")
