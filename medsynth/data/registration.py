"""Register one image onto another of the same subject with SimpleITK, and resample it there.

Paired training assumes a subject's images are voxel-aligned; scans from different days, tables or
scanners are not, and a paired loss then punishes the generator for the patient's motion. This module
is the pair-level half of ``medsynth data register`` (:mod:`medsynth.data.register` walks a dataset): it
finds the transform with SimpleITK's own registration framework (no optimiser of ours) and resamples the
moving image onto the reference's grid without inventing intensities.

The recipe is the one multi-modal pipelines use: Mattes mutual information (the modalities share no
intensity scale), a three-level pyramid (4, 2, 1 voxels; smoothing in mm) so that a shift of a centimetre
is caught at the coarse level and refined at the fine one, random metric sampling with a fixed seed, and a
start chosen between the headers as they are and the centres of mass (:func:`initial_transform`).
``affine`` and ``bspline`` refine the rigid result: an affine stage for scanner scaling and shear, a
B-spline stage (control points every ``bspline_mesh_mm``) for local distortion.

The same inputs give the same transform to the last bit: the metric runs as one work unit on one thread.
With several, ITK's Mattes metric comes out different in the last bits from run to run (with a fixed count
of work units too), the optimiser's path follows, and a validation score computed on registered targets
(unpaired training) came out 2e-5 apart between a run and its resumed twin. The price, measured on a 2 mm
phantom head on the 2-core development machine (Intel Xeon family 6 model 207): 2.7-2.8 s a pair on one
thread against 1.6-2.7 s on two.

A CT is resampled in Hounsfield units: air outside its field of view (:func:`ct_air`), values clamped
to its own range (a B-spline interpolant overshoots at the skull), integer HU when it came as integers.
An MR gets 0 outside its field of view.

The transform maps points of the reference image (SimpleITK's LPS physical space) to points of the
moving image, as ITK's registration does: ``sitk.Resample(moving, reference, sitk.ReadTransform(tfm))``
reproduces the registered image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from ..errors import MedsynthError
from ..io.geometry import volume_to_sitk
from ..io.volume import LPS_TO_RAS, Volume
from .alignment import normalised_mutual_information

if TYPE_CHECKING:
    import SimpleITK as sitk

    #: The rigid or affine stage's result (both have a matrix and a centre).
    Linear = sitk.Euler3DTransform | sitk.AffineTransform

#: ``--transform`` choices; each one starts from the rigid result.
TRANSFORMS = ("rigid", "affine", "bspline")
#: ``--interpolation`` choices for the final resampling (the optimiser always samples linearly).
INTERPOLATIONS = ("linear", "bspline")
#: A registration whose result keeps less than this fraction of the pair's information as it was (NMI - 1)
#: has run away (the moving image slid out of the field of view, or latched onto the wrong structure).
DIVERGED_BELOW = 0.9


class RegistrationError(MedsynthError):
    """One pair could not be registered (the optimiser failed or ran away)."""


@dataclass(frozen=True)
class RegistrationSettings:
    """How a pair is registered; saved beside the registered copy so a resumed run uses the same.

    Defaults measured on the demo cohort at 2 mm (docs/architecture.md, "data register"): the mean
    residual over the brain stays well under half a millimetre for moves of up to 12 mm / 12 degrees.
    """

    transform: str = "rigid"
    interpolation: str = "linear"
    bins: int = 32
    sampling: float = 0.2
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    learning_rate: float = 1.0
    iterations: int = 200
    bspline_mesh_mm: float = 60.0
    #: The B-spline stage samples fewer voxels: its gradient (hundreds of parameters) costs far more per
    #: sample, and 2 % of a 2 mm head (20 000 voxels) lands where 20 % does (0.3 mm), 15 times faster.
    bspline_sampling: float = 0.02
    seed: int = 42

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise MedsynthError(
                f"unknown transform {self.transform!r}; choose one of {', '.join(TRANSFORMS)}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise MedsynthError(
                f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}"
            )
        if not (0.0 < self.sampling <= 1.0 and 0.0 < self.bspline_sampling <= 1.0):
            raise MedsynthError(
                f"sampling is a fraction of the voxels (0 to 1], got {self.sampling}, {self.bspline_sampling}"
            )
        if len(self.shrink_factors) != len(self.smoothing_mm) or not self.shrink_factors:
            raise MedsynthError(
                f"one smoothing per pyramid level: shrink {self.shrink_factors}, smoothing {self.smoothing_mm}"
            )
        if self.bins < 8 or self.iterations < 1 or self.learning_rate <= 0 or self.bspline_mesh_mm <= 0:
            raise MedsynthError(
                f"bins >= 8, iterations >= 1, learning_rate > 0 and bspline_mesh_mm > 0 are needed; got {self}"
            )


@dataclass(frozen=True)
class TransformSize:
    """How far a transform moves the reference's points: what a QC table shows.

    ``translation_mm``: the displacement of the rotation centre (the reference's centre of mass, inside
    the head); ``max_displacement_mm``: the largest displacement over a lattice of the reference's field
    of view, its corners included (where a rotation moves most); ``rotation_deg``: the angle of the
    linear part's rotation.
    """

    translation_mm: float
    max_displacement_mm: float
    rotation_deg: float


@dataclass
class RegisteredPair:
    """One moving image on the reference grid before (headers only) and after registration."""

    before: Volume
    after: Volume
    transform: sitk.Transform
    nmi_before: float
    nmi_after: float
    size: TransformSize


def ct_air(array: np.ndarray) -> float:
    """The value a CT gets outside its field of view: air as the CT stores it.

    -1000 HU, or the CT's own minimum when that is a scanner's air/padding between -1024 and -1000. A
    padding far below (-2048, -3024 outside the reconstruction circle) is not air and is not copied.
    """
    return float(np.clip(np.min(array), -1024.0, -1000.0))


def _as_registration_image(volume: Volume) -> sitk.Image:
    """The volume shifted to a zero minimum: mutual information ignores the shift, and the
    centre-of-mass initialiser needs non-negative mass (a CT's air is -1000)."""
    return volume_to_sitk(volume.with_array(volume.array - volume.array.min()))


def _method(
    settings: RegistrationSettings, levels: int | None = None, sampling: float | None = None
) -> sitk.ImageRegistrationMethod:
    """Mattes MI, seeded random sampling (``sampling``, default the settings'), a pyramid of the last
    ``levels`` levels (default: all)."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)  # bit-reproducible: see the module docstring
    method.SetNumberOfWorkUnits(1)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling or settings.sampling, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    chosen = slice(-levels, None) if levels else slice(None)
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors[chosen]))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_mm[chosen]))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _metric(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: RegistrationSettings
) -> float:
    """Mattes MI of the pair under ``transform`` at full resolution (lower is better)."""
    method = _method(settings, levels=1)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def initial_transform(
    fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings
) -> sitk.Euler3DTransform:
    """The rigid start: the headers as they are, or the images' centres of mass put together.

    Scans of one session share the scanner's frame and their headers are right to within the patient's
    motion; scans of different sessions or machines (IXI's T1 and T2, an MR and a planning CT) can be
    centimetres apart in their headers. Both starts are rotations about the reference's centre of mass;
    the one with the better mutual information wins.
    """
    import SimpleITK as sitk

    moments = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    moments = cast("sitk.Euler3DTransform", moments.Downcast())
    headers = sitk.Euler3DTransform()
    headers.SetCenter(moments.GetCenter())
    candidates = [headers, moments]
    return min(candidates, key=lambda t: _metric(fixed, moving, t, settings))


def _optimise(
    fixed: sitk.Image,
    moving: sitk.Image,
    start: Linear,
    settings: RegistrationSettings,
) -> Linear:
    """One linear stage (rigid or affine) through the whole pyramid; returns the optimised transform."""
    method = _method(settings)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate,
        minStep=1e-4,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(start, inPlace=False)
    result = method.Execute(fixed, moving)
    result.FlattenTransform()
    return cast("Linear", result.GetNthTransform(result.GetNumberOfTransforms() - 1).Downcast())


def _affine_from(rigid: Linear) -> sitk.AffineTransform:
    import SimpleITK as sitk

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def _bspline_stage(
    fixed: sitk.Image, moving: sitk.Image, rigid: sitk.Transform, settings: RegistrationSettings
) -> sitk.Transform:
    """A B-spline field on top of ``rigid`` (the two finest levels, L-BFGS-B): the composite of both."""
    import SimpleITK as sitk

    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, round(e / settings.bspline_mesh_mm)) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    method = _method(settings, levels=2, sampling=settings.bspline_sampling)
    method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=settings.iterations,
        maximumNumberOfCorrections=5,
    )
    method.SetMovingInitialTransform(rigid)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    return sitk.CompositeTransform([rigid, bspline])  # the last one listed is applied first


def find_transform(
    fixed: Volume, moving: Volume, settings: RegistrationSettings
) -> tuple[sitk.Transform, Linear]:
    """The transform from ``fixed``'s points to ``moving``'s, and its rigid or affine part.

    Raises:
        RegistrationError: SimpleITK gave up (e.g. no overlap left between the images) or the
            parameters are not finite.
    """
    fixed_image, moving_image = _as_registration_image(fixed), _as_registration_image(moving)
    try:
        linear = _optimise(
            fixed_image, moving_image, initial_transform(fixed_image, moving_image, settings), settings
        )
        if settings.transform == "affine":
            linear = _optimise(fixed_image, moving_image, _affine_from(linear), settings)
        full: sitk.Transform = linear
        if settings.transform == "bspline":
            full = _bspline_stage(fixed_image, moving_image, linear, settings)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise RegistrationError(f"the registration failed ({reason})") from exc
    if not np.all(np.isfinite(linear.GetParameters())):
        raise RegistrationError("the registration diverged (parameters are not finite)")
    return full, linear


def _rotation_deg(matrix: np.ndarray) -> float:
    """Angle of the rotation closest to ``matrix`` (its polar part), in degrees."""
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    return math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def transform_size(
    transform: sitk.Transform, linear: Linear, reference: Volume, points: int = 5
) -> TransformSize:
    """Measure ``transform`` on ``reference``'s field of view (``points`` per axis, corners included)."""
    steps = [np.linspace(0.0, n - 1.0, points) for n in reference.shape]
    ijk = np.array(np.meshgrid(*steps, indexing="ij")).reshape(3, -1)
    # voxel -> RAS -> LPS (SimpleITK's points); the flip is its own inverse
    lps = LPS_TO_RAS @ reference.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    lattice = [tuple(point) for point in lps[:3].T.tolist()]
    centre = tuple(linear.GetCenter())

    def shift(point: tuple[float, ...]) -> float:
        return float(np.linalg.norm(np.subtract(transform.TransformPoint(point), point)))

    matrix = np.asarray(linear.GetMatrix()).reshape(3, 3)
    return TransformSize(shift(centre), max(shift(p) for p in [centre, *lattice]), _rotation_deg(matrix))


def resample(
    moving: Volume, reference: Volume, transform: sitk.Transform, *, ct: bool, interpolation: str = "linear"
) -> Volume:
    """``moving`` on ``reference``'s grid through ``transform``, without inventing intensities.

    Outside its field of view an MR gets 0 and a CT air (:func:`ct_air`); values are clamped to the
    moving image's range (and that fill), and a CT of integer HU comes back as integer HU.
    """
    import SimpleITK as sitk

    fill = ct_air(moving.array) if ct else 0.0
    interpolator = sitk.sitkBSpline if interpolation == "bspline" else sitk.sitkLinear
    image = sitk.Resample(
        volume_to_sitk(moving), volume_to_sitk(reference), transform, interpolator, fill, sitk.sitkFloat32
    )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    array = np.clip(array, min(float(moving.array.min()), fill), float(moving.array.max()))
    if ct and np.array_equal(moving.array, np.rint(moving.array)):
        array = np.rint(array)
    meta = {key: value for key, value in moving.meta.items() if key != "header"}
    return Volume(array, reference.affine.copy(), {**meta, "registered_to": reference.source})


def register_pair(
    reference: Volume, moving: Volume, *, ct: bool, settings: RegistrationSettings
) -> RegisteredPair:
    """Register ``moving`` onto ``reference`` and resample it there; measure what it did.

    ``ct`` says the moving image is a CT in HU (air fill, clamping, integer HU).

    Raises:
        RegistrationError: the optimiser failed, or its result lost more than ``1 - DIVERGED_BELOW`` of
            the pair's information (NMI - 1) as it was: a registration that ran away.
    """
    import SimpleITK as sitk

    transform, linear = find_transform(reference, moving, settings)
    before = resample(moving, reference, sitk.Transform(), ct=ct, interpolation=settings.interpolation)
    after = resample(moving, reference, transform, ct=ct, interpolation=settings.interpolation)
    nmi_before = normalised_mutual_information(reference.array, before.array)
    nmi_after = normalised_mutual_information(reference.array, after.array)
    if nmi_after - 1.0 < DIVERGED_BELOW * (nmi_before - 1.0):
        raise RegistrationError(
            f"the registration diverged (normalised mutual information fell from {nmi_before:.3f} to "
            f"{nmi_after:.3f}); check that the images belong to one subject, or try --transform rigid"
        )
    return RegisteredPair(
        before, after, transform, nmi_before, nmi_after, transform_size(transform, linear, reference)
    )
