"""Out-of-distribution checks: is this input like the images the model was trained on?

A synthesis network given an image unlike its training data still returns a plausible-looking image.
Before synthesis, :func:`check_inputs` compares every input volume with the training subjects'
statistics stored in the checkpoint's fingerprint (:mod:`medsynth.data.appearance`):

=================  ===========================================================================
check              out of distribution when
=================  ===========================================================================
spacing            a canonical axis' voxel size is outside [min / 1.5, max x 1.5] of training
field_of_view      a canonical axis' extent (mm) is outside [min / 1.5, max x 1.5] of training
orientation        the voxel axes are > 15 degrees more oblique than the most oblique training image
histogram          Jensen-Shannon divergence of the normalised intensity histogram inside the
                   head from the training subjects' mean > the calibrated threshold (2 x the
                   largest leave-one-out divergence of a training subject, at least 0.015); for
                   a run trained with ``data.augment``, from the *nearest* of the appearances
                   its training showed (each subject and its augmented draws), the threshold
                   from each subject's nearest other-subject appearance the same way
contrast           the histogram lies within another modality's threshold and at most half as far
                   from it as from the expected one (e.g. a T2w given as the T1w input; a near tie is
                   not called a contrast swap), or an MR input holds air in Hounsfield units (>= 5 %
                   of voxels below -500: a CT), or a CT input holds none (< 0.5 %)
=================  ===========================================================================

The result is an :class:`OODReport` (``ok``, ``reasons``, ``score``/``threshold`` of the histogram test,
per-check values) that ``infer`` writes as the sidecar's ``ood`` block and ``convert`` records per study.
Checkpoints trained before these statistics existed are skipped with a note (only the CT/MR test runs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.appearance import AIR_HU, appearance_statistics
from ..data.fingerprint import Fingerprint
from ..data.masks import foreground_mask
from ..errors import MedsynthError
from ..io.volume import Volume
from ..modalities import DISPLAY_NAMES

log = logging.getLogger("medsynth")

#: Geometry tolerance: a factor either side of the training range.
GEOMETRY_FACTOR = 1.5
#: Extra obliquity (degrees) tolerated beyond the most oblique training image.
OBLIQUITY_MARGIN_DEG = 15.0
#: Histogram threshold = HIST_MARGIN x the largest leave-one-out divergence of the training subjects...
HIST_MARGIN = 2.0
#: ... and never below this: a handful of training subjects understates the spread (held-out subjects of
#: a 3-subject run scored up to 0.008), while a wrong contrast scores far above it (T2w given as T1w:
#: >= 0.028 on the demo cohort, 0.065 on the 6 mm test cohort).
HIST_FLOOR = 0.015
#: Share of voxels below -500 that makes an "MR" input a CT, and below which a "CT" input is not one.
CT_AIR_FRACTION = 0.05
MR_AIR_FRACTION = 0.005
#: An input is called another training contrast only when its divergence to that contrast is within that
#: contrast's threshold and at most 1 / CONTRAST_MARGIN of its divergence to the expected one.
CONTRAST_MARGIN = 2.0


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log, 0..ln 2) between two histograms of fractions.

    >>> js_divergence(np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    0.0
    """
    return float(js_divergences(p, np.asarray(q)[None])[0])


def js_divergences(p: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """:func:`js_divergence` of ``p`` from each row of ``candidates`` at once, ``(rows,)``."""
    p, q = np.asarray(p, np.float64)[None, :], np.asarray(candidates, np.float64)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=1)
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum(axis=1)
    return np.maximum(0.0, 0.5 * (kl_p + kl_q))


@dataclass(frozen=True)
class HistogramReference:
    """The training subjects' mean histogram of one modality and its calibrated threshold."""

    mean: np.ndarray
    threshold: float
    leave_one_out: tuple[float, ...]

    @classmethod
    def from_histograms(cls, histograms: list[np.ndarray]) -> HistogramReference:
        stack = np.asarray(histograms, np.float64)
        loo = tuple(
            js_divergence(stack[i], np.delete(stack, i, axis=0).mean(axis=0)) for i in range(len(stack))
        ) if len(stack) > 1 else ()  # fmt: skip
        threshold = max(HIST_FLOOR, HIST_MARGIN * max(loo, default=0.0))
        return cls(stack.mean(axis=0), threshold, loo)


@dataclass(frozen=True)
class AppearanceReference:
    """An augmented run's training appearances: each subject's histogram and its augmented draws.

    Why nearest rather than mean: augmentation spreads the training appearances over a family (gamma and
    histogram warps, bias fields); their mean is no image the model saw, and a spoiled gradient echo
    that lies in the family would still be far from it. So an input's divergence is to the nearest
    appearance, and the threshold is calibrated the same way: ``HIST_MARGIN`` x the largest divergence
    of a training subject's own histogram from the nearest appearance of any *other* subject (at least
    ``HIST_FLOOR``). Monotone warps never invert a contrast, so a T2w given as the T1w stays far from all.
    """

    histograms: np.ndarray  # (appearances, bins): every training subject's own and augmented ones
    threshold: float

    @classmethod
    def from_appearances(cls, appearances: list[dict[str, Any]]) -> AppearanceReference:
        rows, owners = [], []
        for subject, appearance in enumerate(appearances):
            for histogram in [appearance["histogram"], *appearance.get("augmented_histograms", [])]:
                rows.append(np.asarray(histogram, np.float64))
                owners.append(subject)
        histograms, subjects = np.asarray(rows), np.asarray(owners)
        loo = [
            float(js_divergences(appearance["histogram"], histograms[subjects != i]).min())
            for i, appearance in enumerate(appearances)
            if (subjects != i).any()
        ]
        return cls(histograms, max(HIST_FLOOR, HIST_MARGIN * max(loo, default=0.0)))

    def divergence(self, histogram: np.ndarray) -> float:
        """Divergence from the nearest training appearance."""
        return float(js_divergences(histogram, self.histograms).min())


@dataclass
class OODReport:
    """The verdict on one input set; ``to_dict`` is the sidecar's ``ood`` block."""

    status: str  # "ok" | "out_of_distribution" | "skipped"
    reasons: list[str] = field(default_factory=list)
    score: float | None = None  # histogram divergence of the input furthest beyond its threshold
    threshold: float | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "out_of_distribution"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "score": self.score,
            "threshold": self.threshold,
            "reasons": list(self.reasons),
            "checks": self.checks,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One line: the reasons joined, or the status."""
        return "; ".join(self.reasons) if self.reasons else self.status


class OODChecker:
    """References built once from a fingerprint; :meth:`check` is then cheap per input set."""

    def __init__(self, fingerprint: Fingerprint) -> None:
        self.fingerprint = fingerprint
        self.training: dict[str, list[dict[str, Any]]] = {}
        for entry in fingerprint.subjects.values():
            for modality, stats in entry.items():
                if isinstance(stats, dict) and "appearance" in stats:
                    self.training.setdefault(modality, []).append(stats["appearance"])
        self.references = {
            m: HistogramReference.from_histograms([np.asarray(a["histogram"]) for a in items])
            for m, items in self.training.items()
        }
        # Modalities the run augmented: compared with the nearest training appearance instead.
        self.appearances = {
            m: AppearanceReference.from_appearances(items)
            for m, items in self.training.items()
            if any("augmented_histograms" in a for a in items)
        }

    def check(self, inputs: Mapping[str, Volume], names: Mapping[str, str] | None = None) -> OODReport:
        """Compare every input (modality -> volume) with the training subjects of that modality.

        Reasons name each input by ``names[modality]`` when given (``convert`` names the study and
        series), else by the file it was read from.
        """
        report = OODReport("ok")
        scores: list[tuple[float, float, float]] = []  # (divergence / threshold, divergence, threshold)
        for modality, volume in inputs.items():
            name = (names or {}).get(modality) or volume.source
            array = volume.array
            air = float(np.mean(array < AIR_HU))
            self._check_kind(report, modality, name, air)
            if modality not in self.training:
                report.notes.append(
                    f"{modality}: the checkpoint holds no training statistics for it (trained before "
                    "out-of-distribution checks existed); only the CT/MR test ran"
                )
                continue
            mask = foreground_mask([array])
            normalizer = self.fingerprint.specs[modality].for_screen().make().fit(array, mask)
            stats = appearance_statistics(volume, normalizer, mask, with_depth=False)
            self._check_geometry(report, modality, name, stats)
            scores.append(self._check_histogram(report, modality, name, stats))
        if scores:
            _, report.score, report.threshold = (round(v, 5) for v in max(scores))
        if report.reasons:
            report.status = "out_of_distribution"
        elif not scores:
            report.status = "skipped"
        return report

    # ----------------------------------------------------------------------------- checks
    def _check_kind(self, report: OODReport, modality: str, name: str, air: float) -> None:
        report.checks.setdefault("contrast", {})[modality] = {"below_air_hu": round(air, 4)}
        if modality != "ct" and air >= CT_AIR_FRACTION:
            report.reasons.append(
                f"{name}: {air:.0%} of voxels are below {AIR_HU:g} (air in Hounsfield units): "
                f"this looks like a CT, not a {DISPLAY_NAMES.get(modality, modality)}"
            )
        elif modality == "ct" and air < MR_AIR_FRACTION:
            report.reasons.append(
                f"{name}: no voxels near air in Hounsfield units (-1000): this does not look like a CT"
            )

    def _check_geometry(self, report: OODReport, modality: str, name: str, stats: dict[str, Any]) -> None:
        training = self.training[modality]
        for key, label, unit in (
            ("spacing", "voxel spacing", "mm"),
            ("field_of_view_mm", "field of view", "mm"),
        ):
            value = np.asarray(stats[key], np.float64)
            ref = np.asarray([t[key] for t in training], np.float64)
            low, high = ref.min(axis=0) / GEOMETRY_FACTOR, ref.max(axis=0) * GEOMETRY_FACTOR
            outside = bool(np.any((value < low) | (value > high)))
            report.checks.setdefault(key, {})[modality] = {
                "value": value.round(3).tolist(),
                "training_min": ref.min(axis=0).round(3).tolist(),
                "training_max": ref.max(axis=0).round(3).tolist(),
                "ok": not outside,
            }
            if outside:
                report.reasons.append(
                    f"{name}: {label} {_xyz(value)} {unit} is outside the training range "
                    f"{_xyz(ref.min(axis=0))}..{_xyz(ref.max(axis=0))} {unit} (x{GEOMETRY_FACTOR:g} tolerance)"
                )
        limit = max(t.get("obliquity_deg", 0.0) for t in training) + OBLIQUITY_MARGIN_DEG
        oblique = stats["obliquity_deg"] > limit
        report.checks.setdefault("orientation", {})[modality] = {
            "orientation": stats["orientation"],
            "training_orientations": sorted({t.get("orientation", "?") for t in training}),
            "obliquity_deg": stats["obliquity_deg"],
            "limit_deg": round(limit, 3),
            "ok": not oblique,
        }
        if oblique:
            report.reasons.append(
                f"{name}: voxel axes are {stats['obliquity_deg']:.0f} degrees oblique; training images "
                f"were at most {limit - OBLIQUITY_MARGIN_DEG:.0f}"
            )

    def _check_histogram(
        self, report: OODReport, modality: str, name: str, stats: dict[str, Any]
    ) -> tuple[float, float, float]:
        histogram = np.asarray(stats["histogram"])
        divergences = {m: js_divergence(histogram, ref.mean) for m, ref in self.references.items()}
        appearances = self.appearances.get(modality)
        if appearances is not None:
            divergences[modality] = appearances.divergence(histogram)
        threshold = (appearances or self.references[modality]).threshold
        own = divergences[modality]
        nearest = min(divergences, key=divergences.__getitem__)
        report.checks.setdefault("histogram", {})[modality] = {
            "js_divergence": round(own, 5),
            "threshold": round(threshold, 5),
            "divergence_to": {m: round(d, 5) for m, d in divergences.items()},
            "training_subjects": len(self.training[modality]),
            "reference": "training mean"
            if appearances is None
            else f"nearest of {len(appearances.histograms)} training appearances (data.augment draws included)",
        }
        if own > threshold:
            wanted = DISPLAY_NAMES.get(modality, modality)
            also = _also_off(report, modality)
            swapped = _is_other_contrast(own, divergences[nearest], self.references[nearest])
            if nearest != modality and swapped:
                report.reasons.append(
                    f"{name}: its intensity histogram matches the training {DISPLAY_NAMES.get(nearest, nearest)} "
                    f"images, not {wanted} (divergence {divergences[nearest]:.3f} vs {own:.3f}); "
                    f"is this the right contrast?{also}"
                )
            else:
                others = ", ".join(
                    f"{DISPLAY_NAMES.get(m, m)}: {d:.3f}" for m, d in divergences.items() if m != modality
                )
                report.reasons.append(
                    f"{name}: intensity histogram inside the head is unlike the training {wanted} images "
                    f"(divergence {own:.3f} > threshold {threshold:.3f})"
                    + (f"; no other training contrast matches it clearly ({others})" if others else "")
                    + also
                )
        return own / threshold, own, threshold


def _is_other_contrast(own: float, other: float, reference: HistogramReference) -> bool:
    """Whether a histogram is another training contrast rather than an unlike image of the expected one.

    Only when it lies within that contrast's own threshold and at most ``1 / CONTRAST_MARGIN`` of the
    divergence to the expected one: a near tie (0.042 vs 0.043), noise or a negated image is far from
    every training contrast, and naming one of them would send the user after the wrong problem.
    """
    return other <= reference.threshold and other * CONTRAST_MARGIN <= own


def _also_off(report: OODReport, modality: str) -> str:
    """``; also off: voxel spacing, field of view`` when other checks of this input failed, else ``""``.

    A different voxel size, field of view or obliquity changes the histogram by itself, so the
    histogram reason says so rather than leaving the contrast as the only suspect.
    """
    labels = {"spacing": "voxel spacing", "field_of_view_mm": "field of view", "orientation": "obliquity"}
    checks = report.checks
    off = [label for key, label in labels.items() if not checks.get(key, {}).get(modality, {"ok": 1})["ok"]]
    if not off:
        return ""
    return f"; also off: {', '.join(off)}, which alone changes the histogram"


def _xyz(values: np.ndarray) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def check_inputs(
    fingerprint: Fingerprint, inputs: Mapping[str, Volume], names: Mapping[str, str] | None = None
) -> OODReport:
    """:class:`OODChecker` built and run once (build the checker yourself to reuse it)."""
    return OODChecker(fingerprint).check(inputs, names)


def enforce(report: OODReport, *, strict: bool) -> None:
    """Warn (one line per reason), or refuse with one ``MedsynthError`` line when ``strict``."""
    for note in report.notes:
        log.info("out-of-distribution check: %s", note)
    if report.ok:
        return
    if strict:
        raise MedsynthError(f"refused (--strict): input out of the training distribution: {report.summary()}")
    for reason in report.reasons:
        log.warning("out of distribution: %s", reason)


def ood_block(
    model: Any, inputs: Mapping[str, Volume], names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``ood`` block for any predictor-like object; ``{}`` when it carries no fingerprint.

    Used by ``convert`` per study, with ``names`` naming each input by study and series UID: reasons
    are logged as warnings and recorded, never refused.
    """
    fingerprint = getattr(model, "fingerprint", None)
    if not isinstance(fingerprint, Fingerprint):
        return {}
    report = check_inputs(fingerprint, inputs, names)
    enforce(report, strict=False)
    return report.to_dict()
