"""The built-in demo cohort: paired T1w/T2w/PDw/FLAIR and CT heads simulated from the MNI152 templates.

Why simulate: a user can try every command (train, infer, evaluate, convert) in minutes without a data
agreement, and tests get a realistic, co-registered, multi-contrast cohort that never leaves the machine.
The templates ship inside nilearn (``load_mni152_*_template(resolution=1)`` read package files; nothing is
downloaded).

The model, at a field strength of 3 T (details and sources in ``docs/demo_cohort.md``):

* **Anatomy.** Grey and white matter fractions are the template probability maps; CSF is the rest of the
  intracranial region (the template's non-zero support, which is skull-stripped) plus a 2 mm
  subarachnoid rim. Because nilearn's T1 template has no scalp, the head around it is built as shells at a
  given distance from that region: inner table (bone), diploe (fatty marrow), outer table (bone),
  subcutaneous fat and skin/muscle. Air is 0. The diploe is fat-like in MR but bone marrow in CT, so it
  also has a channel of its own (``Anatomy.diploe``) that only the CT reads.
* **Signal.** Each tissue gets a closed-form signal for each sequence (spin echo, or inversion recovery for
  FLAIR) from its T1, T2 and proton density; a voxel's signal is the fraction-weighted sum (partial volume).
  The CT is the fraction-weighted sum of tissue Hounsfield units (``CT_HU``), air filling the rest.
* **Subjects.** One ``numpy`` Generator per subject, seeded with ``(seed, subject index)``, draws a global
  affine jitter and a smooth elastic displacement (shared by all contrasts and the CT, so they stay
  co-registered), relaxation-time jitter, and per contrast a smooth multiplicative bias field, Rician
  noise at a fixed SNR and an arbitrary intensity scale. The CT's HU jitter and noise come from a second
  Generator, ``(seed, subject index, 1)``, so adding the CT left every MR volume bit-identical.
* **Misregistration (optional).** ``misregister=(mm, deg)`` scans every modality but a reference one with
  the head moved by a rigid transform drawn from a third Generator, ``(seed, subject index, 2)``, and keeps
  the shared header: pairs that claim to be registered and are not, as after a failed registration of
  scans from different days. The head moves *before* it is imaged, as a patient does: the moved anatomy
  is sampled once from the template like the unmoved one, and the bias field and noise stay in the
  scanner's frame, so a moved image is no smoother than an unmoved one (resampling a finished volume
  would blur its anatomy and its noise, an artefact no scanner makes and one that registration would
  then be blamed for).

Everything per subject runs on the output grid: the 1 mm tissue maps are reduced to ``spacing_mm`` once
(and cached), so a 2 mm cohort costs about a second per subject.

Example:
    >>> from medsynth.data.demo import make_demo_cohort
    >>> subjects = make_demo_cohort("demo", n_subjects=2, spacing_mm=4.0, progress=False)  # doctest: +SKIP
    >>> subjects[0].name  # doctest: +SKIP
    'sub-01'
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from .. import __version__
from ..errors import ConfigError, MedsynthError
from ..io.atomic import atomic_path, atomic_write_text
from ..io.volume import Volume, to_canonical
from ..modalities import DISPLAY_NAMES, canonical_modality

FIELD_STRENGTH_T = 3.0
#: Mean brain signal over the noise standard deviation (before the bias field and scaling).
SNR = 25.0
DATASET_NAME = "medsynth demo cohort"


@dataclass(frozen=True)
class Tissue:
    """Relaxation properties of one tissue at 3 T; ``pd`` is the water (proton) density relative to CSF."""

    name: str
    t1_ms: float
    t2_ms: float
    pd: float


# Sources (3 T): GM/WM T1 and T2 from Wansapura et al., JMRI 1999;9:531-538; CSF T1 from Lu et al., JMRI
# 2005;22:13-22; CSF T2 ~2 s (any value >> TE gives the same images); subcutaneous fat from de Bazelaire
# et al., Radiology 2004;230:652-659; skeletal muscle from Stanisz et al., MRM 2005;54:507-512; cortical
# bone T2* ~0.4 ms from UTE studies (Du et al.), so bone is dark at every TE used here. Proton densities:
# brain water content, WM ~0.70, GM ~0.80 (Tofts, Quantitative MRI of the Brain, 2003).
TISSUES: tuple[Tissue, ...] = (
    Tissue("csf", t1_ms=4163.0, t2_ms=2000.0, pd=1.00),
    Tissue("gm", t1_ms=1331.0, t2_ms=110.0, pd=0.80),
    Tissue("wm", t1_ms=832.0, t2_ms=80.0, pd=0.70),
    Tissue("fat", t1_ms=382.0, t2_ms=68.0, pd=0.90),
    Tissue("muscle", t1_ms=1412.0, t2_ms=50.0, pd=0.75),
    Tissue("bone", t1_ms=250.0, t2_ms=0.4, pd=0.20),
)
TISSUE_INDEX = {tissue.name: i for i, tissue in enumerate(TISSUES)}

#: Inner and outer distance (mm) of the diploe, the marrow between the skull's two tables.
DIPLOE_MM = (4.0, 6.0)

#: Head shells outside the intracranial region: (tissue, inner and outer distance in mm).
HEAD_SHELLS: tuple[tuple[str, float, float], ...] = (
    ("csf", 0.0, 2.0),  # subarachnoid space the skull-stripped template leaves out
    ("bone", 2.0, 4.0),  # inner table
    ("fat", *DIPLOE_MM),  # diploe (fatty marrow): fat in MR, its own channel for the CT
    ("bone", 6.0, 8.0),  # outer table
    ("fat", 8.0, 12.0),  # subcutaneous fat
    ("muscle", 12.0, 14.0),  # galea, skin
)


# CT numbers (HU, 120 kVp). Air and water are -1000 and 0 by definition of the scale. Soft tissue from
# standard radiology tables (Buzug, Computed Tomography, Springer 2008, p. 475; Prokop, Spiral and Multislice
# CT of the Body, Thieme 2003): CSF ~15, WM 20-30, GM 37-45, fat -50 to -100 (subcutaneous fat -100 to
# -120), muscle 35-55. Bone: Schneider et al., Phys Med Biol 2000;45:459-478 tabulate cranium and cortical
# bone as the densest tissues of the body (1.6-1.9 g/cm3) and spongiosa with marrow far below them; head CTs
# show the skull's tables at about 1500-1800 HU and the diploe at about 400-700 HU. The two values below are
# plausible picks inside those ranges, not measurements.
CT_HU: dict[str, float] = {
    "air": -1000.0,
    "csf": 15.0,
    "gm": 40.0,
    "wm": 25.0,
    "fat": -100.0,  # subcutaneous fat (the MR model's fat channel, minus the diploe)
    "muscle": 45.0,  # galea, skin
    "bone": 1650.0,  # inner and outer tables (dense cortical bone)
    "diploe": 550.0,  # trabecular bone with marrow
}
#: Per-subject jitter of tissue HU: relative (standard deviation) for bone, absolute in HU for soft tissue.
CT_BONE_JITTER = 0.03
CT_SOFT_JITTER_HU = 3.0
#: Standard deviation of the CT's (white, Gaussian) noise in HU: a plausible figure for thin (1-2 mm)
#: reconstructions of a routine head protocol with a standard kernel, not a measurement.
CT_NOISE_HU = 12.0
#: Stored range of a 12-bit CT (RescaleIntercept -1024): values are clipped to it after the noise.
CT_RANGE_HU = (-1024.0, 3071.0)


def csf_nulling_ti(tr_ms: float, t1_ms: float) -> float:
    """Inversion time at which longitudinal magnetisation of ``t1_ms`` crosses zero after a 180 pulse."""
    return t1_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_ms)))


@dataclass(frozen=True)
class Sequence:
    """A 2D clinical sequence reduced to its contrast-defining timings."""

    modality: str
    suffix: str  # BIDS suffix of the output file
    description: str  # DICOM SeriesDescription
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    field_t: float = FIELD_STRENGTH_T

    def signal(self, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """Signed transverse magnetisation per tissue (magnitude is taken after noise, as a scanner does).

        Spin echo: ``PD (1 - e^(-TR/T1)) e^(-TE/T2)``; inversion recovery:
        ``PD (1 - 2 e^(-TI/T1) + e^(-TR/T1)) e^(-TE/T2)`` (TE << TR, ideal pulses).
        """
        if self.ti_ms is None:
            recovery = 1.0 - np.exp(-self.tr_ms / t1_ms)
        else:
            recovery = 1.0 - 2.0 * np.exp(-self.ti_ms / t1_ms) + np.exp(-self.tr_ms / t1_ms)
        return pd * recovery * np.exp(-self.te_ms / t2_ms)

    def sidecar(self) -> dict[str, object]:
        """BIDS sidecar fields (seconds, as BIDS wants)."""
        fields: dict[str, object] = {
            "MagneticFieldStrength": self.field_t,
            "PulseSequenceType": "Inversion Recovery" if self.ti_ms is not None else "Spin Echo",
            "SeriesDescription": self.description,
            "RepetitionTime": self.tr_ms / 1000.0,
            "EchoTime": self.te_ms / 1000.0,
        }
        if self.ti_ms is not None:
            fields["InversionTime"] = round(self.ti_ms) / 1000.0
        return fields


@dataclass(frozen=True)
class CTProtocol:
    """The simulated CT acquisition: what its file, sidecar and DICOM series say about it."""

    modality: str = "ct"
    suffix: str = "CT"
    description: str = "CT head"
    kvp: float = 120.0
    kernel: str = "STANDARD"

    def sidecar(self) -> dict[str, object]:
        """JSON sidecar fields (BIDS has no CT suffix yet; these follow the DICOM attribute names)."""
        return {
            "Modality": "CT",
            "SeriesDescription": self.description,
            "KVP": self.kvp,
            "ConvolutionKernel": self.kernel,
            "Units": "HU",
            "NoiseStandardDeviationHU": CT_NOISE_HU,
            "SimulatedFrom": "the tissue fractions of the MR contrasts (same warp) plus a diploe channel; "
            "HU per tissue in docs/demo_cohort.md",
        }


CT_PROTOCOL = CTProtocol()

_FLAIR_TR_MS = 9000.0
SEQUENCES: tuple[Sequence, ...] = (
    Sequence("t1", "T1w", "T1w SE", tr_ms=400.0, te_ms=8.0),
    Sequence("t2", "T2w", "T2w TSE", tr_ms=6000.0, te_ms=100.0),
    Sequence("pd", "PDw", "PD", tr_ms=5000.0, te_ms=20.0),
    Sequence(
        "flair",
        "FLAIR",
        "FLAIR",
        tr_ms=_FLAIR_TR_MS,
        te_ms=120.0,
        ti_ms=round(csf_nulling_ti(_FLAIR_TR_MS, TISSUES[TISSUE_INDEX["csf"]].t1_ms)),
    ),
)


@dataclass(frozen=True)
class GradientEcho:
    """A spoiled gradient echo (SPGR, FLASH): the steady state of ``flip_deg`` pulses every ``tr_ms``.

    3D T1w scans at many sites are SPGRs rather than spin echoes: the same T1 ordering of tissues from
    a different equation, so a model trained on one meets a slightly different image in the other.
    """

    modality: str
    suffix: str
    description: str
    tr_ms: float
    te_ms: float
    flip_deg: float
    field_t: float = FIELD_STRENGTH_T

    def signal(self, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """``PD sin(a) (1 - E1) / (1 - cos(a) E1) e^(-TE/T2*)`` with ``E1 = e^(-TR/T1)`` (ideal spoiling).

        T2* is taken as the tissue's T2: at TE 4 ms the two decays differ by under 5 % in soft tissue,
        and bone's 0.4 ms is already a T2* (it is dark either way).
        """
        alpha = math.radians(self.flip_deg)
        e1 = np.exp(-self.tr_ms / t1_ms)
        return pd * math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1) * np.exp(-self.te_ms / t2_ms)

    def sidecar(self) -> dict[str, object]:
        """BIDS sidecar fields (seconds and degrees, as BIDS wants)."""
        return {
            "MagneticFieldStrength": self.field_t,
            "PulseSequenceType": "Spoiled Gradient Echo",
            "MRAcquisitionType": "3D",
            "SeriesDescription": self.description,
            "RepetitionTime": self.tr_ms / 1000.0,
            "EchoTime": self.te_ms / 1000.0,
            "FlipAngle": self.flip_deg,
        }


@dataclass(frozen=True)
class MPRAGE:
    """An inversion-prepared gradient echo (MPRAGE): a 180 pulse, then a train of ``train_length``
    low-angle readouts every ``echo_spacing_ms``, repeated every ``tr_ms``.

    ``ti_ms`` runs from the inversion to the train's centre readout (the centre of k-space, linear
    ordering), as scanners define it. The image is the signal of that centre readout.
    """

    modality: str
    suffix: str
    description: str
    tr_ms: float
    ti_ms: float
    te_ms: float
    flip_deg: float
    echo_spacing_ms: float
    train_length: int
    field_t: float = FIELD_STRENGTH_T

    def __post_init__(self) -> None:
        if self.ti_ms < self.echo_spacing_ms * self.train_length / 2 or self.tr_ms < self.ti_ms + (
            self.echo_spacing_ms * self.train_length / 2
        ):
            raise MedsynthError(f"{self.description}: the readout train does not fit between TI and TR")

    def signal(self, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """The centre readout's signed signal in the periodic steady state (ideal inversion and spoiling).

        Within the train ``Mz`` relaxes towards ``M* = PD (1 - E) / (1 - q)`` by the factor ``q = cos(a) E``
        per readout (``E = e^(-spacing/T1)``): ``M_j = M* + (M_a - M*) q^j``. Between trains, free
        recovery: ``M_a = PD (1 - e^(-TA/T1)) - A e^(-TA/T1)`` after the inversion of the magnetisation
        ``A`` left at the end of the delay ``TD``. Requiring the same ``A`` every TR gives the closed form
        below (Deichmann et al., NeuroImage 2000;12:112-127, in the same spirit). Signal:
        ``M_(n/2) sin(a) e^(-TE/T2*)``, T2* taken as T2 as for :class:`GradientEcho`.
        """
        alpha = math.radians(self.flip_deg)
        train_ms = self.echo_spacing_ms * self.train_length
        ta = self.ti_ms - train_ms / 2  # inversion -> first readout
        td = self.tr_ms - ta - train_ms  # last readout -> next inversion
        e = np.exp(-self.echo_spacing_ms / t1_ms)
        q = math.cos(alpha) * e
        steady = pd * (1.0 - e) / (1.0 - q)
        qn, ea, ed = q**self.train_length, np.exp(-ta / t1_ms), np.exp(-td / t1_ms)
        before_inversion = (pd * (1.0 - ed) + ed * (steady * (1.0 - qn) + qn * pd * (1.0 - ea))) / (
            1.0 + ed * qn * ea
        )
        first = pd * (1.0 - ea) - before_inversion * ea
        centre = steady + (first - steady) * q ** (self.train_length // 2)
        return centre * math.sin(alpha) * np.exp(-self.te_ms / t2_ms)

    def sidecar(self) -> dict[str, object]:
        """BIDS sidecar fields: ``RepetitionTimePreparation`` is the inversion-to-inversion time and
        ``RepetitionTimeExcitation`` the readout spacing (BIDS's names for the two TRs of an MPRAGE)."""
        return {
            "MagneticFieldStrength": self.field_t,
            "PulseSequenceType": "MPRAGE",
            "MRAcquisitionType": "3D",
            "SeriesDescription": self.description,
            "RepetitionTimePreparation": self.tr_ms / 1000.0,
            "RepetitionTimeExcitation": self.echo_spacing_ms / 1000.0,
            "InversionTime": self.ti_ms / 1000.0,
            "EchoTime": self.te_ms / 1000.0,
            "FlipAngle": self.flip_deg,
            "NumberOfReadoutsPerInversion": self.train_length,
        }


#: Field dependence of relaxation, 1.5 T over 3 T, per tissue (T1 ratio, T2 ratio): GM and WM from
#: Stanisz et al., MRM 2005;54:507-512 (GM T1 1124 / 1820 ms, T2 95 / 99 ms; WM T1 884 / 1084 ms,
#: T2 72 / 69 ms); subcutaneous fat and skeletal muscle from de Bazelaire et al., Radiology
#: 2004;230:652-659 (fat T1 343 / 382 ms, T2 58 / 68 ms; muscle T1 1008 / 1412 ms, T2 44 / 50 ms). CSF is
#: nearly free water, whose relaxation barely depends on the field; bone is dark at any field (T2* 0.4 ms).
#: Ratios rather than the 1.5 T values themselves, so each subject's jittered 3 T tissue becomes the same
#: tissue at 1.5 T: the demo's 3 T values are Wansapura's, and T1 always shortens at lower field.
RELAXATION_1_5T_OVER_3T: dict[str, tuple[float, float]] = {
    "csf": (1.0, 1.0),
    "gm": (1124.0 / 1820.0, 95.0 / 99.0),
    "wm": (884.0 / 1084.0, 72.0 / 69.0),
    "fat": (343.0 / 382.0, 58.0 / 68.0),
    "muscle": (1008.0 / 1412.0, 44.0 / 50.0),
    "bone": (1.0, 1.0),
}


@dataclass(frozen=True)
class InputProtocol:
    """How one site acquires the T1w input: sequence, field strength and receive chain.

    ``bias`` is the peak of the log bias field (0.2: +-20 %), ``snr`` the mean brain signal over the
    noise sd, ``log10_scale`` the range of the arbitrary intensity scale (10 to the power of a uniform
    draw). ``relaxation_ratio`` (tissue -> T1 and T2 factors) moves the subject's 3 T tissues to the
    protocol's field strength. Only the T1w changes: the other contrasts and the CT are the default
    cohort's, so a model scored on this cohort meets a shifted input against an unchanged target.
    """

    name: str
    summary: str
    sequence: Sequence | GradientEcho | MPRAGE
    bias: float
    snr: float
    log10_scale: tuple[float, float]
    relaxation_ratio: Mapping[str, tuple[float, float]] | None = None

    def relaxation(
        self, relaxation: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A subject's (jittered, 3 T) T1, T2 and PD per tissue at this protocol's field strength."""
        t1, t2, pd = relaxation
        if self.relaxation_ratio is None:
            return t1, t2, pd
        ratio = np.array([self.relaxation_ratio[t.name] for t in TISSUES])
        return t1 * ratio[:, 0], t2 * ratio[:, 1], pd

    def describe(self) -> dict[str, object]:
        """What ``dataset_description.json`` records about the input protocol."""
        return {
            "name": self.name,
            "summary": self.summary,
            "modality": self.sequence.modality,
            "sequence": self.sequence.sidecar(),
            "bias_peak": self.bias,
            "snr": self.snr,
            "log10_scale": list(self.log10_scale),
            "note": "only the T1w follows this protocol; T2w, PDw, FLAIR and CT are the default cohort's "
            "(bit-identical for the same seed), so a score on this cohort measures the input shift alone; "
            "the T1w's bias field, noise and scale come from numpy default_rng((seed, subject index, 3))",
        }


#: The default protocol: today's cohort, which every other protocol leaves unchanged but for the T1w.
DEFAULT_PROTOCOL = "se"
#: Input protocols of ``make_demo_cohort(protocol=...)`` / ``medsynth data demo --protocol NAME``.
PROTOCOLS: dict[str, InputProtocol] = {
    p.name: p
    for p in (
        InputProtocol(
            DEFAULT_PROTOCOL, "spin-echo T1w at 3 T (the default cohort)", SEQUENCES[0], 0.2, SNR, (2.5, 3.5)
        ),
        InputProtocol(
            "spgr",
            "3D spoiled gradient echo T1w at 3 T, stronger bias, higher SNR, another scale",
            GradientEcho("t1", "T1w", "T1w 3D SPGR", tr_ms=20.0, te_ms=4.0, flip_deg=25.0),
            0.35,
            35.0,
            (3.5, 4.5),
        ),
        InputProtocol(
            "mprage",
            "3D MPRAGE T1w at 3 T (ADNI-like timings), stronger bias, lower SNR, another scale",
            MPRAGE(
                "t1",
                "T1w",
                "T1w MPRAGE",
                tr_ms=2300.0,
                ti_ms=900.0,
                te_ms=2.98,
                flip_deg=9.0,
                echo_spacing_ms=7.1,
                train_length=176,
            ),  # fmt: skip
            0.3,
            20.0,
            (1.5, 2.5),
        ),
        InputProtocol(
            "1.5t",
            "the default spin echo at 1.5 T relaxation times, weaker bias, lower SNR, another scale",
            Sequence("t1", "T1w", "T1w SE 1.5T", tr_ms=400.0, te_ms=8.0, field_t=1.5),
            0.1,
            15.0,
            (2.0, 3.0),
            RELAXATION_1_5T_OVER_3T,
        ),
    )
}


def input_protocol(name: str) -> InputProtocol:
    """The protocol called ``name``; an unknown name is a one-line error listing the valid ones."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown demo protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


@dataclass(frozen=True)
class Anatomy:
    """Tissue fractions ``(tissue, i, j, k)`` on an RAS grid, with that grid's affine.

    ``diploe`` ``(i, j, k)`` is the part of the ``fat`` fraction that is skull marrow, not subcutaneous
    fat: the two look alike in MR, not in CT. It stays out of ``fractions`` so the MR signal model (one
    entry per ``TISSUES``) is untouched.
    """

    fractions: np.ndarray
    affine: np.ndarray
    diploe: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.fractions.shape[1:])  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _anatomy_1mm() -> Anatomy:
    """Tissue fractions on the 1 mm MNI grid (computed once per process: about 2 s)."""
    from nilearn import datasets  # imported here: nilearn's import is slow and only the demo needs it

    t1 = datasets.load_mni152_template(resolution=1)
    gm = np.clip(np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32), 0, 1)
    wm = np.clip(np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32), 0, 1)
    intracranial = np.asarray(t1.dataobj) > 0
    gm, wm = gm * intracranial, wm * intracranial
    brain = gm + wm
    excess = np.maximum(brain, 1.0)  # the maps are smoothed; keep GM + WM <= 1 so CSF is never negative
    gm, wm = gm / excess, wm / excess

    fractions = np.zeros((len(TISSUES), *gm.shape), dtype=np.float32)
    fractions[TISSUE_INDEX["gm"]] = gm
    fractions[TISSUE_INDEX["wm"]] = wm
    fractions[TISSUE_INDEX["csf"]] = intracranial - gm - wm
    # Shells by distance (mm, the grid is 1 mm) from the intracranial region. A voxel 1 mm wide centred at
    # distance d holds the part of [inner, outer) it overlaps, so shells tile without gaps or overlap.
    distance = ndimage.distance_transform_edt(~intracranial).astype(np.float32)
    outside = ~intracranial

    def shell(inner: float, outer: float) -> np.ndarray:
        return (np.clip(outer - distance + 0.5, 0, 1) - np.clip(inner - distance + 0.5, 0, 1)) * outside

    for name, inner, outer in HEAD_SHELLS:
        fractions[TISSUE_INDEX[name]] += shell(inner, outer)
    diploe = shell(*DIPLOE_MM).astype(np.float32)
    return Anatomy(fractions, np.asarray(t1.affine, dtype=np.float64), diploe)


def _check_spacing(spacing_mm: float) -> None:
    if not 1.0 <= spacing_mm <= 8.0:
        raise MedsynthError(
            f"demo spacing {spacing_mm} mm is out of range; the templates are 1 mm, choose 1 to 8 mm"
        )


@functools.lru_cache(maxsize=2)
def anatomy(spacing_mm: float) -> Anatomy:
    """The template anatomy on an isotropic ``spacing_mm`` grid covering the MNI field of view.

    The grid keeps the MNI origin and axes with voxels ``spacing_mm`` wide (``ceil(n / spacing)`` of them,
    e.g. 99 x 117 x 95 at 2 mm). Maps are blurred with a Gaussian matching a box of ``spacing_mm`` before
    sampling, so each voxel holds its partial-volume fractions rather than aliased point samples.
    """
    _check_spacing(spacing_mm)
    base = _anatomy_1mm()
    if spacing_mm == 1.0:
        return base
    sigma = math.sqrt((spacing_mm**2 - 1.0) / 12.0)
    shape = tuple(math.ceil(n / spacing_mm) for n in base.shape)
    points = np.meshgrid(*(np.arange(n, dtype=np.float32) * spacing_mm for n in shape), indexing="ij")

    def reduce(f: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(ndimage.gaussian_filter(f, sigma), points, order=1, mode="nearest")

    fractions = np.stack([reduce(f) for f in base.fractions])
    affine = base.affine @ np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    return Anatomy(fractions.astype(np.float32), affine, reduce(base.diploe).astype(np.float32))


def smooth_random_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: float, wavelength_mm: float
) -> np.ndarray:
    """A smooth random field scaled to a peak of 1: Gaussian bumps every ``wavelength_mm`` with random weights.

    Separable (three small matrix products), so its cost is negligible next to resampling, even at 1 mm.
    """
    field = rng.standard_normal(tuple(math.ceil(n * spacing_mm / wavelength_mm) + 3 for n in shape))
    for axis, n in enumerate(shape):
        position = np.arange(n) * spacing_mm
        centres = (np.arange(field.shape[axis]) - 1.0) * wavelength_mm
        weights = np.exp(-0.5 * ((position[:, None] - centres[None, :]) / wavelength_mm) ** 2)
        field = np.moveaxis(np.tensordot(field, weights, axes=([axis], [1])), -1, axis)
    return (field / np.abs(field).max()).astype(np.float32)


@dataclass(frozen=True)
class SubjectDraw:
    """Summary of one subject's random geometry, recorded in participants.tsv."""

    head_scale: float
    rotation_deg: float
    max_displacement_mm: float


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    rx, ry, rz = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x


def warp_anatomy(base: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, SubjectDraw]:
    """Deform the tissue fractions with a random affine (+-3 deg, +-5 %) and a <= 3 mm elastic field.

    One warp for all tissues means one warp for all contrasts: the subject's images stay paired.
    """
    coords, draw = warp_coordinates(base, rng)
    return warp(base.fractions, coords), draw


def warp(maps: np.ndarray, coords: list[np.ndarray]) -> np.ndarray:
    """Sample each map of ``maps`` (``(n, i, j, k)``) at the warped ``coords`` (linear interpolation)."""
    return np.stack([ndimage.map_coordinates(f, coords, order=1, mode="nearest") for f in maps])


def warp_coordinates(base: Anatomy, rng: np.random.Generator) -> tuple[list[np.ndarray], SubjectDraw]:
    """Where each output voxel samples the template (voxel coordinates): the warp of :func:`warp_anatomy`."""
    spacing = float(np.linalg.norm(base.affine[:3, 0]))
    rotation = _rotation(np.deg2rad(rng.uniform(-3.0, 3.0, size=3)))
    scaling = rng.uniform(0.95, 1.05, size=3)
    inverse = np.linalg.inv(rotation @ np.diag(scaling))
    displacement = [3.0 * smooth_random_field(rng, base.shape, spacing, 40.0) / spacing for _ in range(3)]
    brain = base.fractions[TISSUE_INDEX["gm"]] + base.fractions[TISSUE_INDEX["wm"]]
    centre = np.asarray(ndimage.center_of_mass(brain))
    grid = np.ogrid[tuple(slice(0, n) for n in base.shape)]
    offsets = [g.astype(np.float32) - c for g, c in zip(grid, centre, strict=True)]
    coords = [
        centre[a] + sum(inverse[a, b] * offsets[b] for b in range(3)) + displacement[a] for a in range(3)
    ]
    angle = math.degrees(math.acos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)))
    max_shift = float(np.sqrt(sum(d**2 for d in displacement)).max() * spacing)
    return coords, SubjectDraw(float(np.prod(scaling) ** (1 / 3)), angle, max_shift)


def jittered_tissues(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1, T2 (+-3 % sd) and PD (+-2 % sd) per tissue: subjects and scanners never measure the same."""
    n = len(TISSUES)
    t1 = np.array([t.t1_ms for t in TISSUES]) * (1.0 + 0.03 * rng.standard_normal(n))
    t2 = np.array([t.t2_ms for t in TISSUES]) * (1.0 + 0.03 * rng.standard_normal(n))
    pd = np.array([t.pd for t in TISSUES]) * (1.0 + 0.02 * rng.standard_normal(n))
    return t1, t2, pd


def simulate_contrast(
    sequence: Sequence | GradientEcho | MPRAGE,
    fractions: np.ndarray,
    relaxation: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing_mm: float,
    rng: np.random.Generator,
    *,
    bias: float = 0.2,
    snr: float = SNR,
    log10_scale: tuple[float, float] = (2.5, 3.5),
) -> np.ndarray:
    """One magnitude image: partial-volume signal x smooth bias (``exp(bias f)``, +-20 % by default),
    Rician noise at ``snr``, an arbitrary scale ``10^U(log10_scale)``. The defaults are the default
    cohort's; an :class:`InputProtocol` passes its own."""
    signal = np.tensordot(sequence.signal(*relaxation).astype(np.float32), fractions, axes=1)
    brain = (
        fractions[TISSUE_INDEX["csf"]] + fractions[TISSUE_INDEX["gm"]] + fractions[TISSUE_INDEX["wm"]] > 0.5
    )
    sigma = float(np.abs(signal[brain]).mean()) / snr
    signal *= np.exp(bias * smooth_random_field(rng, signal.shape, spacing_mm, 80.0))
    real = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    scale = 10.0 ** rng.uniform(*log10_scale)  # scanners report arbitrary units
    return (np.hypot(real, imaginary) * scale).astype(np.float32)


def jittered_hu(rng: np.random.Generator) -> dict[str, float]:
    """Tissue HU of one subject: bone density x (1 + 0.03 N(0,1)), soft tissue + 3 N(0,1) HU; air exact."""
    names = [name for name in CT_HU if name != "air"]
    draws = rng.standard_normal(len(names))
    hu = {"air": CT_HU["air"]}
    for name, draw in zip(names, draws, strict=True):
        if name in ("bone", "diploe"):
            hu[name] = CT_HU[name] * (1.0 + CT_BONE_JITTER * draw)
        else:
            hu[name] = CT_HU[name] + CT_SOFT_JITTER_HU * draw
    return hu


def simulate_ct(
    fractions: np.ndarray, diploe: np.ndarray, hu: Mapping[str, float], rng: np.random.Generator
) -> np.ndarray:
    """A CT in HU (integer-valued float32): partial-volume sum of tissue HU, Gaussian noise, 12-bit range.

    Air fills what the tissues leave (``1 - sum of fractions``), so ``HU = air + sum f (HU_t - air)``; the
    diploe's share of the fat fraction takes the marrow's HU instead of fat's. No bias field and no scale:
    a CT is calibrated.
    """
    air = hu["air"]
    per_tissue = np.array([hu[t.name] - air for t in TISSUES], dtype=np.float32)
    ct = np.tensordot(per_tissue, fractions, axes=1) + air
    ct += np.float32(hu["diploe"] - hu["fat"]) * diploe
    ct += rng.normal(0.0, CT_NOISE_HU, ct.shape).astype(np.float32)
    return np.clip(np.round(ct), *CT_RANGE_HU).astype(np.float32)


def simulate_subject(
    index: int,
    spacing_mm: float = 1.0,
    seed: int = 0,
    protocol: str = DEFAULT_PROTOCOL,
    motion: Misregistration | None = None,
    reference: str = "t1",
) -> tuple[dict[str, Volume], SubjectDraw]:
    """The four contrasts and the CT of subject ``index`` (0-based), keyed by modality, on one grid.

    Everything random comes from ``np.random.default_rng((seed, index))`` and, for the CT's HU jitter and
    noise, ``np.random.default_rng((seed, index, 1))``: a subject does not depend on how many others are
    generated or in which order, and the MR volumes are those of the cohort before it had a CT.

    Another ``protocol`` (:data:`PROTOCOLS`) replaces the T1w with its own acquisition of the same
    subject (same anatomy and tissue jitter), its bias, noise and scale drawn from a fourth Generator,
    ``(seed, index, 3)``. The default T1w is still simulated first, because the draws of the other
    contrasts follow its draws: that keeps them bit-identical to the default cohort's.

    ``motion`` scans every modality but ``reference`` with the head moved (:func:`moved_coordinates`); the
    draws are unchanged, so ``reference`` is bit-identical to the unmoved subject's.
    """
    site = input_protocol(protocol)
    base = anatomy(spacing_mm)
    rng = np.random.default_rng((seed, index))
    coords, draw = warp_coordinates(base, rng)
    fractions = warp(base.fractions, coords)
    moved_coords, moved_fractions = coords, fractions
    if motion is not None:
        moved_coords = moved_coordinates(coords, base.affine, motion)
        moved_fractions = warp(base.fractions, moved_coords)

    def pose(modality: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(template coordinates, tissue fractions) of the head as ``modality`` was scanned."""
        return (coords, fractions) if modality == reference else (moved_coords, moved_fractions)

    relaxation = jittered_tissues(rng)
    volumes = {
        seq.modality: Volume(
            simulate_contrast(seq, pose(seq.modality)[1], relaxation, spacing_mm, rng),
            base.affine,
            {"format": "nifti", "path": "<demo>", "protocol": seq},
        )
        for seq in SEQUENCES
    }
    if site.name != DEFAULT_PROTOCOL:
        site_rng = np.random.default_rng((seed, index, 3))
        volumes[site.sequence.modality] = Volume(
            simulate_contrast(
                site.sequence, pose(site.sequence.modality)[1], site.relaxation(relaxation),
                spacing_mm, site_rng, bias=site.bias, snr=site.snr, log10_scale=site.log10_scale,
            ),
            base.affine,
            {"format": "nifti", "path": "<demo>", "protocol": site.sequence},
        )  # fmt: skip
    ct_rng = np.random.default_rng((seed, index, 1))
    ct_coords, ct_fractions = pose(CT_PROTOCOL.modality)
    diploe = warp(base.diploe[None], ct_coords)[0]
    volumes[CT_PROTOCOL.modality] = Volume(
        simulate_ct(ct_fractions, diploe, jittered_hu(ct_rng), ct_rng),
        base.affine,
        {"format": "nifti", "path": "<demo>", "protocol": CT_PROTOCOL},
    )
    return volumes, draw


#: The modalities a demo subject has, in file order.
DEMO_MODALITIES: tuple[str, ...] = (*(seq.modality for seq in SEQUENCES), CT_PROTOCOL.modality)


@dataclass(frozen=True)
class Misregistration:
    """A rigid motion in world (RAS) mm, ``x' = R (x - centre) + centre + t``.

    ``R`` turns by ``angle_deg`` (right-hand rule, signed) about the unit ``axis`` through ``centre_mm``;
    then everything moves by ``translation_mm``. What sat at ``x`` in the unmoved volume sits at ``x'``.
    """

    translation_mm: tuple[float, float, float]
    axis: tuple[float, float, float]
    angle_deg: float
    centre_mm: tuple[float, float, float]

    @property
    def shift_mm(self) -> float:
        """Length of the translation."""
        return float(np.linalg.norm(self.translation_mm))

    def matrix(self) -> np.ndarray:
        """The 4 x 4 world transform (Rodrigues' formula for ``R``)."""
        k = np.asarray(self.axis, dtype=np.float64)
        cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
        angle = math.radians(self.angle_deg)
        rotation = np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * cross @ cross
        centre = np.asarray(self.centre_mm, dtype=np.float64)
        transform = np.eye(4)
        transform[:3, :3] = rotation
        transform[:3, 3] = centre - rotation @ centre + np.asarray(self.translation_mm)
        return transform


def head_centre_mm(spacing_mm: float) -> tuple[float, float, float]:
    """World position of the template head's centre of mass (all tissue fractions) on the demo grid."""
    base = anatomy(spacing_mm)
    centre = np.asarray(ndimage.center_of_mass(base.fractions.sum(axis=0)))
    return tuple(float(v) for v in base.affine[:3, :3] @ centre + base.affine[:3, 3])  # type: ignore[return-value]


#: ``misregister_plane`` names -> the world (RAS) axis normal to that plane.
MISREGISTER_PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}


def draw_misregistration(
    index: int,
    seed: int,
    max_mm: float,
    max_deg: float,
    centre_mm: tuple[float, float, float],
    plane: str | None = None,
) -> Misregistration:
    """Subject ``index``'s rigid motion, from its own ``np.random.default_rng((seed, index, 2))``.

    Translation: a uniform random direction, length ``max_mm * U(0.5, 1)``; rotation: a uniform random
    axis through ``centre_mm``, angle ``+-max_deg * U(0.5, 1)``. The lower half of the range is left out
    so every subject is noticeably off. The MR and CT Generators are not touched.

    ``plane`` (a key of :data:`MISREGISTER_PLANES`) keeps the motion in that plane: the same draws, the
    direction projected onto the plane (same length), the rotation about the plane's normal (same angle).
    A 2D model slicing in that plane sees the whole motion in its slices: what an in-plane registration
    field can undo, separated from what moved through the slice.
    """
    rng = np.random.default_rng((seed, index, 2))
    direction = rng.standard_normal(3)
    fraction = rng.uniform(0.5, 1.0)
    axis = rng.standard_normal(3)
    angle = max_deg * rng.uniform(0.5, 1.0) * rng.choice((-1.0, 1.0))
    if plane is not None:
        normal = MISREGISTER_PLANES[plane]
        direction[normal] = 0.0
        axis = np.eye(3)[normal]
    translation = direction / np.linalg.norm(direction) * max_mm * fraction
    axis /= np.linalg.norm(axis)
    return Misregistration(
        tuple(float(v) for v in translation),  # type: ignore[arg-type]
        tuple(float(v) for v in axis),  # type: ignore[arg-type]
        float(angle),
        centre_mm,
    )


def moved_coordinates(
    coords: list[np.ndarray], affine: np.ndarray, motion: Misregistration
) -> list[np.ndarray]:
    """The template coordinates a subject's voxels show once its head has moved by ``motion``.

    Output voxel ``v`` shows what sat at ``A^-1 T^-1 A v`` before the motion (``A`` the affine, ``T`` the
    motion), so the subject's own warp ``coords`` is read there. The warp is an affine plus a displacement
    of 40 mm wavelength, so linear interpolation of it is exact to a small fraction of a voxel; beyond the
    grid its edge value is repeated, which continues the anatomy at the border (the neck) as a scanner's
    larger field would, rather than cutting it off with air.
    """
    pull = np.linalg.inv(affine) @ np.linalg.inv(motion.matrix()) @ affine
    grid = np.indices(coords[0].shape, dtype=np.float32).reshape(3, -1)
    points = pull[:3, :3].astype(np.float32) @ grid + pull[:3, 3:4].astype(np.float32)
    return [
        ndimage.map_coordinates(c, points, order=1, mode="nearest").reshape(c.shape).astype(np.float32)
        for c in coords
    ]


def parse_misregister(text: str) -> tuple[float, float]:
    """``"MM,DEG"`` (the CLI's ``--misregister``) as two floats; range checks are the cohort's.

    >>> parse_misregister("4,2.5")
    (4.0, 2.5)
    """
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(
            f"--misregister wants MM,DEG (maximum translation in mm, rotation in degrees), e.g. 4,4; got {text!r}"
        ) from None


def _check_misregister(
    misregister: tuple[float, float] | None, reference: str, plane: str | None = None
) -> tuple[tuple[float, float] | None, str]:
    """Validated ``(max_mm, max_deg)`` (or None) and the canonical reference modality."""
    known = ", ".join(DEMO_MODALITIES)
    if plane is not None:
        if plane not in MISREGISTER_PLANES:
            raise ConfigError(
                f"misregistration plane {plane!r} unknown; choose one of {', '.join(MISREGISTER_PLANES)}"
            )
        if misregister is None:
            raise ConfigError("a misregistration plane needs misregister=(mm, deg)")
    try:
        canonical = canonical_modality(reference) if isinstance(reference, str) else None
    except MedsynthError:
        canonical = None
    if canonical not in DEMO_MODALITIES:
        raise ConfigError(
            f"misregistration reference {reference!r} is not a demo modality; choose one of {known}"
        )
    if misregister is None:
        return None, canonical
    values = tuple(misregister) if isinstance(misregister, (tuple, list)) else ()
    if len(values) != 2 or not all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(f"misregister must be (max_mm, max_deg), two numbers; got {misregister!r}")
    max_mm, max_deg = (float(v) for v in values)
    if not (math.isfinite(max_mm) and math.isfinite(max_deg) and max_mm >= 0 and 0 <= max_deg <= 180):
        raise ConfigError(
            f"misregister ({max_mm:g} mm, {max_deg:g} deg) out of range; translation >= 0 mm, rotation 0 to 180 deg"
        )
    return (max_mm, max_deg), canonical


#: participants.tsv columns added by ``misregister``: translation vector (RAS mm) and its length, signed
#: rotation angle and its unit axis.
MISREGISTER_COLUMNS = (
    "misregister_tx_mm",
    "misregister_ty_mm",
    "misregister_tz_mm",
    "misregister_translation_mm",
    "misregister_rotation_deg",
    "misregister_axis_x",
    "misregister_axis_y",
    "misregister_axis_z",
)


def _misregister_fields(motion: Misregistration) -> list[str]:
    return [
        *(f"{v:.4f}" for v in motion.translation_mm),
        f"{motion.shift_mm:.4f}",
        f"{motion.angle_deg:.4f}",
        *(f"{v:.6f}" for v in motion.axis),
    ]


def _write_nifti(volume: Volume, path: Path, dtype: type = np.float32) -> None:
    image = nib.Nifti1Image(volume.array.astype(dtype), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temp:
        nib.save(image, temp)


def _prepare_output(out: Path) -> None:
    """Write only into a new or empty folder: the demo must never mix with (or overwrite) user data."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedsynthError(
            "already exists and is not empty; remove it or choose a new folder for the demo", out
        )


def _write_dicom(volumes: Mapping[str, Volume], folder: Path, subject_id: str) -> None:
    """One series per contrast and the CT, in one study and one frame of reference (they share the grid).

    The CT is a CT Image Storage series; its integer HU are stored exactly as signed 16-bit values
    (RescaleSlope 1, RescaleIntercept 0, RescaleType HU), which is what the writer does for integer data.
    """
    from pydicom.uid import generate_uid

    from ..io.dicom import write_dicom_series  # only needed with dicom=True

    study_uid, frame_uid = generate_uid(), generate_uid()
    for number, volume in enumerate(volumes.values(), start=1):
        protocol: Sequence | GradientEcho | MPRAGE | CTProtocol = volume.meta["protocol"]
        write_dicom_series(
            volume,
            folder / f"{number:02d}_{protocol.suffix}",
            series_description=protocol.description,
            series_number=number,
            modality="CT" if isinstance(protocol, CTProtocol) else "MR",
            study_uid=study_uid,
            frame_of_reference_uid=frame_uid,
            patient_id=f"DEMO-{subject_id}",
            patient_name=f"Demo^{subject_id}",
        )


def make_demo_cohort(
    out: str | Path,
    n_subjects: int = 12,
    spacing_mm: float = 1.0,
    seed: int = 0,
    dicom: bool = False,
    progress: bool = True,
    misregister: tuple[float, float] | None = None,
    reference: str = "t1",
    protocol: str = DEFAULT_PROTOCOL,
    misregister_plane: str | None = None,
) -> list[Path]:
    """Write a paired T1w/T2w/PDw/FLAIR + CT cohort in a BIDS-like layout and return the subject folders.

    Layout: ``OUT/sub-01/anat/sub-01_{T1w,T2w,PDw,FLAIR}.nii.gz`` (float32, with BIDS JSON sidecars
    holding TR/TE/TI), ``OUT/sub-01/anat/sub-01_CT.nii.gz`` (int16 Hounsfield units on the same grid, with
    a sidecar holding kVp and kernel), ``OUT/dataset_description.json``, ``OUT/participants.tsv``,
    ``OUT/overview.png`` (subject 1) and, with ``dicom=True``, ``OUT/dicom/sub-01/<NN_contrast>/`` one
    DICOM series per contrast and a CT series, sharing one StudyInstanceUID. Same ``seed`` -> identical
    files.

    ``misregister=(max_mm, max_deg)`` moves every modality but ``reference`` of each subject by one rigid
    transform (:func:`draw_misregistration`: ``max_mm * U(0.5, 1)`` translation, ``max_deg * U(0.5, 1)``
    rotation about the head centre) while the files keep the shared header: unaligned pairs that claim to
    be aligned, for comparing paired with unpaired training. The draws go to ``participants.tsv`` and
    ``dataset_description.json``; without it the files are those of the plain cohort.
    ``misregister_plane`` (``axial``, ``coronal`` or ``sagittal``) keeps each of those motions in that
    plane, with the same lengths and angles (:func:`draw_misregistration`).

    ``protocol`` (a name of :data:`PROTOCOLS`) acquires the T1w as another site would (spoiled gradient
    echo, MPRAGE, 1.5 T; other bias, noise and scale) and leaves every other file of the default cohort
    as it is: a second site to score a model against. It is recorded in ``participants.tsv``
    (``t1w_protocol``) and ``dataset_description.json`` (``MedsynthDemo.protocol``); the default
    protocol writes neither, so its cohort is byte-identical to the one before protocols existed.

    Example:
        >>> make_demo_cohort("demo_off", n_subjects=2, spacing_mm=4.0, misregister=(4.0, 4.0))  # doctest: +SKIP
        >>> make_demo_cohort("site_b", n_subjects=2, spacing_mm=4.0, protocol="mprage")  # doctest: +SKIP
    """
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int) or n_subjects < 1:
        raise MedsynthError(f"n_subjects must be a positive integer, got {n_subjects!r}")
    _check_spacing(spacing_mm)
    misregister, reference = _check_misregister(misregister, reference, misregister_plane)
    site = input_protocol(protocol)
    other_site = site.name != DEFAULT_PROTOCOL
    out = Path(out)
    _prepare_output(out)
    width = max(2, len(str(n_subjects)))
    header = "participant_id\thead_scale\trotation_deg\tmax_displacement_mm"
    if misregister is not None:
        centre_mm = head_centre_mm(spacing_mm)
        header += "\t" + "\t".join(MISREGISTER_COLUMNS)
    if other_site:
        header += "\tt1w_protocol"
    rows = [header]
    subject_dirs = []
    first: dict[str, Volume] = {}
    for index in tqdm(
        range(n_subjects), desc="demo subjects", unit="subject", disable=None if progress else True
    ):
        subject_id = f"{index + 1:0{width}d}"
        motion = (
            None
            if misregister is None
            else draw_misregistration(index, seed, *misregister, centre_mm, plane=misregister_plane)
        )
        volumes, draw = simulate_subject(index, spacing_mm, seed, site.name, motion, reference)
        row = f"sub-{subject_id}\t{draw.head_scale:.4f}\t{draw.rotation_deg:.2f}\t{draw.max_displacement_mm:.2f}"
        if motion is not None:
            row += "\t" + "\t".join(_misregister_fields(motion))
        if other_site:
            row += f"\t{site.name}"
        anat = out / f"sub-{subject_id}" / "anat"
        for volume in volumes.values():
            acquisition: Sequence | GradientEcho | MPRAGE | CTProtocol = volume.meta["protocol"]
            stem = f"sub-{subject_id}_{acquisition.suffix}"
            ct = isinstance(acquisition, CTProtocol)
            _write_nifti(volume, anat / f"{stem}.nii.gz", np.int16 if ct else np.float32)
            atomic_write_text(anat / f"{stem}.json", json.dumps(acquisition.sidecar(), indent=2) + "\n")
        if dicom:
            _write_dicom(volumes, out / "dicom" / f"sub-{subject_id}", subject_id)
        rows.append(row)
        subject_dirs.append(anat.parent)
        first = first or volumes
    info: dict[str, object] = {
        "n_subjects": n_subjects,
        "spacing_mm": spacing_mm,
        "seed": seed,
        "snr": SNR,
        "ct": "sub-*_CT.nii.gz: int16 Hounsfield units on the MR grid, simulated from the same tissue "
        f"fractions, noise sd {CT_NOISE_HU:g} HU",
    }
    if misregister is not None:
        motion_info: dict[str, object] = {
            "max_mm": misregister[0],
            "max_deg": misregister[1],
            "reference": reference,
            "centre_mm": [round(v, 3) + 0.0 for v in centre_mm],  # + 0.0: no "-0.0"
            "note": f"every modality but {reference} is moved, per subject, by one rigid transform "
            "x' = R (x - centre_mm) + centre_mm + t (world RAS mm) before it is imaged (the moved anatomy "
            "sampled from the template once, bias and noise in the scanner's frame) on the unchanged grid, "
            "so the headers still claim the pairs are registered; |t| = max_mm U(0.5, 1) in a random "
            "direction, R turns by +-max_deg U(0.5, 1) about a random unit axis (right-hand rule), drawn from "
            "numpy default_rng((seed, subject index, 2)); per-subject values in participants.tsv "
            "(misregister_*)",
        }
        if misregister_plane is not None:
            motion_info["plane"] = misregister_plane
            motion_info["note"] = (
                f"{motion_info['note']}; plane {misregister_plane}: the direction projected onto that plane "
                "(same length), the rotation about its normal (same angle)"
            )
        info["misregistration"] = motion_info
    if other_site:
        info["protocol"] = site.describe()
    description = {
        "Name": DATASET_NAME,
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0 (simulated from the MNI ICBM152 2009a templates; see their copyright notice)",
        "GeneratedBy": [{"Name": "medsynth", "Version": __version__, "Description": "make_demo_cohort"}],
        "MedsynthDemo": info,
    }
    atomic_write_text(out / "dataset_description.json", json.dumps(description, indent=2) + "\n")
    atomic_write_text(out / "participants.tsv", "\n".join(rows) + "\n")
    save_overview_png(first, out / "overview.png")
    return subject_dirs


#: Display window of the CT row of the overview (level 500, width 3000 HU): air black, brain dark grey,
#: diploe mid grey, the skull's tables white.
CT_OVERVIEW_WINDOW_HU = (-1000.0, 2000.0)


def _volumes_in(folder: Path) -> dict[str, Volume]:
    """The demo contrasts and CT of the first subject under ``folder`` (cohort, subject or anat folder)."""
    t1_files = sorted(folder.rglob(f"*_{SEQUENCES[0].suffix}.nii.gz"))
    if not t1_files:
        raise MedsynthError("holds no *_T1w.nii.gz; point to a demo cohort or one of its subjects", folder)
    stem = t1_files[0].name[: -len(f"_{SEQUENCES[0].suffix}.nii.gz")]
    volumes = {}
    protocols: tuple[Sequence | CTProtocol, ...] = (*SEQUENCES, CT_PROTOCOL)
    for protocol in protocols:
        path = t1_files[0].parent / f"{stem}_{protocol.suffix}.nii.gz"
        if path.exists():
            image = nib.load(path)
            volumes[protocol.modality] = Volume(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    return volumes


def save_overview_png(out_dir_or_volumes: str | Path | Mapping[str, Volume], path: str | Path) -> Path:
    """Mid axial, coronal and sagittal slices of each contrast of one subject, as a PNG for eyeballing.

    ``out_dir_or_volumes`` is a cohort folder (its first subject is shown), a subject or ``anat`` folder,
    or a ``{modality: Volume}`` mapping. Each MR row is windowed to its own 0-99.5th percentile; a ``ct``
    row uses the fixed bone-friendly window ``CT_OVERVIEW_WINDOW_HU`` (HU are absolute).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(out_dir_or_volumes, Mapping):
        volumes = dict(out_dir_or_volumes)
    else:
        volumes = _volumes_in(Path(out_dir_or_volumes))
    if not volumes:
        raise MedsynthError("no volumes to show; pass a demo cohort folder or {modality: Volume}", path)
    fig, axes = plt.subplots(len(volumes), 3, figsize=(9, 3 * len(volumes)), squeeze=False)
    for row, (modality, volume) in zip(axes, volumes.items(), strict=True):
        canonical, _ = to_canonical(volume)
        array, (sx, sy, sz) = canonical.array, canonical.spacing
        ci, cj, ck = (n // 2 for n in array.shape)
        if modality == CT_PROTOCOL.modality:
            vmin, vmax = CT_OVERVIEW_WINDOW_HU
        else:
            vmin, vmax = 0.0, float(np.percentile(array, 99.5)) or 1.0
        views = (
            (array[:, :, ck].T, sy / sx, "axial"),
            (array[:, cj, :].T, sz / sx, "coronal"),
            (array[ci, :, :].T, sz / sy, "sagittal"),
        )
        for ax, (image, aspect, view) in zip(row, views, strict=True):
            ax.imshow(image, cmap="gray", origin="lower", aspect=aspect, vmin=vmin, vmax=vmax)
            ax.set_axis_off()
            ax.set_title(f"{DISPLAY_NAMES.get(modality, modality)} {view}", fontsize=9, color="white")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=100, facecolor="black")
    plt.close(fig)
    return path
