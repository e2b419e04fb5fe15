"""Series → modality: the one rule set that says which contrast a DICOM series holds.

Used by ``medsynth convert`` (:func:`medsynth.convert.classify.classify_series`, which puts the user's
``--map`` rules first) and by the ``dicom`` dataset layout (:mod:`medsynth.data.layouts`), so a series
gets the same contrast whichever command reads it.

Scanner exports name series freely (``t2_tse_tra``, ``AX FLAIR``, ``MPRAGE post``), so the decision
uses, in order: derived images (skipped), the DICOM ``Modality`` (CT), keywords in SeriesDescription /
ProtocolName / SequenceName, and last the acquisition physics (TR / TE / TI, inversion recovery,
contrast agent). Series that must never be used as a network input (localizers, diffusion, perfusion,
angiography, derived or synthetic images) are recognised first so a keyword such as ``T2`` in
``T2* perfusion`` cannot pull them in. Every decision carries its reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dicom import DicomSeriesInfo


@dataclass(frozen=True)
class Classification:
    """The modality given to a series (``None``: not usable as input) and why."""

    modality: str | None
    reason: str


# Series that are not anatomical contrasts a generator can take as input.
_EXCLUDE = re.compile(
    r"localizer|localiser|scout|survey|pilot|\bloc\b|calibrat|\bcal\b|asset|dwi|diffusion|\bdti\b|\badc\b|"
    r"trace|ep2d|diff|perfusion|\bperf\b|\bdsc\b|\bdce\b|\basl\b|\bswi\b|\bswan\b|angio|\btof\b|\bmra\b|\bmip\b|"
    r"\bmpr\b|projected|medsynth|synthetic|phoenix|\bbold\b|fmri|spectro",
    re.IGNORECASE,
)
_FLAIR = re.compile(r"flair|dark.?fluid|\btirm\b|t2.?fl|\bt2f\b", re.IGNORECASE)
_POST = re.compile(r"\+c\b|\bgd\b|gad|contrast|post|\bce\b|\bc\+|\bt1c\b|t1ce|t1gd", re.IGNORECASE)
_T1 = re.compile(r"t1|mprage|mp.?rage|spgr|\btfl\b|bravo|\bvibe\b|\bmp2rage\b", re.IGNORECASE)
_T2 = re.compile(r"t2(?!\*)|\btse\b|frfse|\bhaste\b|\bspace\b|\bcube\b", re.IGNORECASE)
_PD = re.compile(r"\bpd\b|pdw|proton.?dens", re.IGNORECASE)


def classify_tags(
    *,
    description: str = "",
    protocol: str = "",
    sequence_name: str = "",
    dicom_modality: str = "MR",
    image_type: Sequence[str] = (),
    scanning_sequence: Sequence[str] = (),
    repetition_time: float | None = None,
    echo_time: float | None = None,
    inversion_time: float | None = None,
    contrast_agent: str = "",
) -> Classification:
    """The canonical modality of an image series from its tags, or ``None`` with the reason.

    >>> classify_tags(description="AX FLAIR").modality
    'flair'
    >>> classify_tags(description="sag 3d", repetition_time=8.0, echo_time=3.0, contrast_agent="Gd")
    Classification(modality='t1c', reason='short TR, short TE (TR=8 TE=3 ms)')
    """
    image_type = tuple(t.upper() for t in image_type)
    if "DERIVED" in image_type and "PRIMARY" not in image_type:
        return Classification(None, "derived series (ImageType DERIVED)")
    dicom_modality = dicom_modality.upper()
    if dicom_modality == "CT":
        return Classification("ct", "DICOM Modality CT")
    if dicom_modality != "MR":
        return Classification(None, f"DICOM Modality {dicom_modality or 'missing'} is not MR or CT")
    contrast_agent = contrast_agent.strip()
    # Scanner names separate words with '_' or '-', which regex word boundaries do not see.
    text = re.sub(r"[_\-]+", " ", " ".join(filter(None, (description, protocol, sequence_name))))
    excluded = _EXCLUDE.search(text)
    if excluded:
        return Classification(None, f"description {excluded.group(0)!r} marks a non-anatomical series")
    by_name = _classify_by_name(text, contrast_agent)
    if by_name is not None:
        return by_name
    return _classify_by_physics(
        repetition_time, echo_time, inversion_time, tuple(scanning_sequence), contrast_agent
    )


def classify_info(info: DicomSeriesInfo) -> Classification:
    """:func:`classify_tags` for a series found by :func:`~medsynth.io.dicom.list_dicom_series`."""
    if not info.is_image:
        return Classification(None, "not an image object")
    return classify_tags(
        description=info.series_description,
        protocol=info.protocol_name,
        sequence_name=info.sequence_name,
        dicom_modality=info.modality,
        image_type=info.image_type,
        scanning_sequence=info.scanning_sequence,
        repetition_time=info.repetition_time,
        echo_time=info.echo_time,
        inversion_time=info.inversion_time,
        contrast_agent=info.contrast_bolus_agent,
    )


def _classify_by_name(text: str, contrast_agent: str) -> Classification | None:
    if _FLAIR.search(text):
        return Classification("flair", "description names FLAIR")
    if _T1.search(text):
        if contrast_agent or _POST.search(text):
            why = "ContrastBolusAgent set" if contrast_agent else "description names contrast"
            return Classification("t1c", f"description names T1, {why}")
        return Classification("t1", "description names T1")
    if _PD.search(text) and re.search(r"\bt2\b|t2w", text, re.IGNORECASE):
        return Classification(
            None, "description names both PD and T2 (a dual-echo series?); add a --map rule"
        )
    if _PD.search(text):
        return Classification("pd", "description names PD")
    if _T2.search(text):
        return Classification("t2", "description names T2")
    return None


def _classify_by_physics(
    tr: float | None, te: float | None, ti: float | None, scanning_sequence: tuple[str, ...], agent: str
) -> Classification:
    """Classic spin-echo weighting from TR/TE/TI, used when names say nothing."""
    if tr is None or te is None:
        return Classification(None, "no recognisable name and no TR/TE; add a --map rule")
    timing = f"TR={tr:g} TE={te:g}" + (f" TI={ti:g}" if ti else "") + " ms"
    inversion = "IR" in scanning_sequence or bool(ti)
    if inversion and ti and ti >= 1500 and te >= 60:
        return Classification("flair", f"fluid-suppressed inversion recovery ({timing})")
    if inversion and ti and 300 <= ti < 1500 and te < 20:
        return Classification("t1c" if agent else "t1", f"T1 inversion recovery ({timing})")
    if tr < 1000 and te < 30:
        return Classification("t1c" if agent else "t1", f"short TR, short TE ({timing})")
    if tr >= 2000 and te >= 70:
        return Classification("t2", f"long TR, long TE ({timing})")
    if tr >= 1500 and te < 40:
        return Classification("pd", f"long TR, short TE ({timing})")
    return Classification(None, f"ambiguous weighting ({timing}); add a --map rule")
