"""``data.augment``: the source images as another scanner would have made them, drawn per training sample.

A model trained at one site meets other sequences, field strengths, coils and noise levels at the next.
The field's answer is in training, not in the network (nnU-Net's intensity augmentations; SynthSR and
SynthSeg train on random contrasts): show the network inputs whose appearance varies the ways a site
changes it, with the target untouched, so that it learns what stays the same. Four kinds of change, each
applied to a sample's source with probability ``probability``:

* ``intensity``: a random monotone intensity warp, one of two: a gamma ``u^g`` (MONAI's
  ``RandAdjustContrast`` on the fixed range [0, 1]; ``g`` log-uniform in [1/1.6, 1.6]) or a
  piecewise-linear warp through 8 control points (MONAI's ``RandHistogramShift``: each inner point drawn
  uniformly between its neighbours, so the map is monotone and keeps 0 and 1). Monotone on purpose:
  tissues may change their spacing (a spin echo against an MPRAGE), but an inverted contrast (a T2w as
  the input) would change the task;
* ``bias``: a smooth multiplicative field ``exp(sum c_k P_k)`` over the degree-3 Legendre products of the
  image axes (MONAI's ``RandBiasField``; ``c_k`` uniform in +-0.1: log-field peaks of 0.18-0.39 across
  a 96 x 112 slice, 10th to 90th percentile, where the demo protocols' fields peak at 0.1-0.35), centred to
  a geometric mean of 1 over the source's foreground, because a global gain is what per-volume
  normalisation removes;
* ``noise``: Rician noise ``sqrt((u + n1)^2 + n2^2)``, ``n ~ N(0, s)``, ``s`` uniform up to 0.04 of the
  normalised range (MONAI's ``RandRicianNoise``; SNR down to about 12 in brain tissue);
* ``blur``: a resolution change, one of two: a Gaussian blur (MONAI's ``RandGaussianSmooth``, sigma
  0.3-1.0 voxels per axis) or nearest down- then linear up-sampling (MONAI's
  ``RandSimulateLowResolution``, zoom 0.5-1.0).

They run as intensity, bias, blur, noise (the object, the coil, the resolution, then the thermal noise), in
``u = (x + 1) / 2``,
where the normaliser's floor ``x = -1`` is 0: the intensity, bias and noise changes keep the floor where
it is (inference clips a scan's background to -1 the same way, whatever its protocol) and move no voxel
above it onto it, so the source's foreground is kept. The result is clipped to [-1, 1], the range every
normalised input has.

Why not MONAI's random transforms themselves: each draws from its own ``RandomState`` and transforms one
image per call, which cost 95-100 ms per ``demo_cpu`` batch on two loaded cores (a third of a training
step). These are the same definitions, applied to the whole batch at once with per-sample parameters:
17-20 ms on the same cores, and the same code runs on a GPU's resident slices without a host round trip
(only the noise is drawn on the host).

**Seeded like every draw of the data layer**: whether and how sample ``index`` of epoch ``epoch`` is
changed is a pure function of ``(seed, epoch, index, source)`` (counter streams of
:func:`~medsynth.data.draws.uniform_draws`), so a resumed run sees the same batches, and neither the
batch size nor which batch a sample falls in changes it. The channels of one source (a 2.5D context:
neighbouring slices of one scan) share one draw; several sources get independent draws (different scans).

Example:
    >>> import numpy as np, torch
    >>> augment = SourceAugmentation(AugmentSpec.from_config("robust"), spatial_dims=2)
    >>> stack = torch.full((2, 1, 3, 16, 16), -1.0)  # (batch, sources, context, H, W)
    >>> stack[..., 4:12, 4:12] = 0.2
    >>> out = augment(stack, seed=0, epoch=0, index=np.array([0, 1]))
    >>> tuple(out.shape), bool((out[..., :2, :] == -1).all())
    ((2, 1, 3, 16, 16), True)
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .draws import uniform_draws

#: The kinds of change ``data.augment`` can switch on (applied as intensity, bias, blur, noise).
KINDS = ("intensity", "bias", "noise", "blur")
#: First counter stream of the augmentation draws (the data layer's other draws use streams below it).
AUGMENT_STREAM = 1000

#: Gamma ``g`` of the intensity warp: log-uniform between the two (symmetric about 1).
GAMMA = (1.0 / 1.6, 1.6)
#: Control points of the piecewise-linear warp, ends included (MONAI's RandHistogramShift default is 10).
WARP_POINTS = 8
BIAS_DEGREE = 3
#: Legendre coefficients of the log bias field are uniform in +-this.
BIAS_COEFFICIENT = 0.1
#: The Rician noise sd is uniform in [0, NOISE_SD] (normalised units, u in [0, 1]).
NOISE_SD = 0.04
#: Gaussian blur sigma per axis, in voxels (kernel radius 3 sigma of the largest).
BLUR_SIGMA = (0.3, 1.0)
#: Down-sampling factor of the resolution change (per image, the same for every axis).
ZOOM = (0.5, 1.0)

# Counter streams of one source, relative to its first: what each uniform number decides.
_APPLY = 0  # 4: whether each kind applies
_CHOICE = 4  # 2: gamma or warp; blur or down-up sampling
_GAMMA = 6
_WARP = 7  # WARP_POINTS - 2 inner points
_NOISE = 13  # 2: sd, seed of the noise fields
_BLUR = 15  # 3: sigma per axis
_ZOOM = 18
_BIAS = 19  # one per Legendre product (19 in 3D)
_STREAMS = 40


@dataclass(frozen=True)
class AugmentSpec:
    """Which kinds of change are on, and the chance that each is applied to a sample.

    A recipe's ``data.augment`` is ``null`` / ``false`` (off, the default), ``true`` or a preset name
    (:data:`PRESETS`), or a mapping of :data:`KINDS` to booleans plus ``probability`` (kinds left out are
    off): ``{intensity: true, bias: true, noise: true, blur: true, probability: 0.5}``.
    """

    intensity: bool = False
    bias: bool = False
    noise: bool = False
    blur: bool = False
    probability: float = 0.5

    def __post_init__(self) -> None:
        for kind in KINDS:
            if not isinstance(getattr(self, kind), bool):
                raise ConfigError(f"data.augment.{kind} must be true or false, got {getattr(self, kind)!r}")
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ConfigError(f"data.augment.probability must be in (0, 1], got {p!r}")
        if not any(getattr(self, kind) for kind in KINDS):
            raise ConfigError(
                f"data.augment switches on none of {', '.join(KINDS)}; set one to true, or data.augment: null"
            )

    @classmethod
    def from_config(cls, value: Any) -> AugmentSpec | None:
        """The spec a recipe's ``data.augment`` asks for; ``None`` when augmentation is off."""
        if value is None or value is False:
            return None
        if value is True:
            return PRESETS["robust"]
        if isinstance(value, str):
            if value not in PRESETS:
                raise ConfigError(
                    f"unknown data.augment preset {value!r}; choose one of {', '.join(PRESETS)}, or a mapping "
                    f"of {', '.join(KINDS)} and probability"
                )
            return PRESETS[value]
        if isinstance(value, Mapping):
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ConfigError(f"unknown key data.augment.{unknown[0]}; valid keys: {', '.join(known)}")
            return cls(**value)
        raise ConfigError(
            f"data.augment must be null, true, a preset ({', '.join(PRESETS)}) or a mapping, got {value!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Named specs a recipe can ask for. ``robust``: the intensity warp and the bias field, each on a tenth of
#: the samples. Rarely is enough: measured on the demo's protocol cohorts (README "Another site's T1w"; 2 mm,
#: 1596 steps of demo_cpu, 2-3 seeds), a model trained on the spin echo scores on MPRAGE inputs within 0.1
#: dB, and on 1.5 T within 0.5 dB, of one that augmented half its samples, and pays 0.34 dB on its own
#: protocol instead of 0.76 (4 mm: 0.08 dB instead of 0.14). Noise and blur (on half, or a quarter, of the
#: samples) cost 0.4-1.3 dB on the own protocol and gained nothing elsewhere.
PRESETS: dict[str, AugmentSpec] = {
    "robust": AugmentSpec(intensity=True, bias=True, probability=0.1),
}


def pinned_augment(value: Any) -> dict[str, Any] | None:
    """A recipe's ``data.augment`` spelled out (every kind and the probability), for a run's saved config:
    what a preset name means can change between releases; what a run trains with must not."""
    spec = AugmentSpec.from_config(value)
    return None if spec is None else spec.to_dict()


@contextlib.contextmanager
def _one_host_thread(device: torch.device) -> Iterator[None]:
    """Run host tensor work on one thread, then give the training step its threads back.

    Element-wise work on a batch this small is faster on one thread than split across busy cores: a
    ``demo_cpu`` batch took 17 ms on one thread and 150 ms on two, on two cores other jobs were loading.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def source_augmentation(value: Any, spatial_dims: int) -> SourceAugmentation | None:
    """The augmentation a recipe's ``data.augment`` asks for (None: off), for 2D/2.5D or 3D inputs."""
    spec = AugmentSpec.from_config(value)
    return None if spec is None else SourceAugmentation(spec, spatial_dims)


class SourceAugmentation:
    """Applies an :class:`AugmentSpec` to a batch of source images, seeded per sample.

    Call it with a ``(batch, sources, channels, *spatial)`` float32 tensor of normalised images on any
    device (the channels of one source share a draw: its 2.5D context, or 1), the run's seed, the epoch and
    each sample's dataset index; it returns a new tensor of the same shape on the same device.
    """

    def __init__(self, spec: AugmentSpec, spatial_dims: int) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(
                f"augmentation works on 2D slices or 3D patches, got spatial_dims={spatial_dims}"
            )
        self.spec, self.spatial_dims = spec, spatial_dims
        self._basis: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"SourceAugmentation({self.spec}, spatial_dims={self.spatial_dims})"

    def __call__(self, stack: torch.Tensor, *, seed: int, epoch: int, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        if stack.ndim != 3 + self.spatial_dims or len(stack) != len(index):
            raise ValueError(
                f"expected ({len(index)}, sources, channels, {self.spatial_dims} spatial axes), got {tuple(stack.shape)}"
            )
        with _one_host_thread(stack.device):
            return self._apply(stack, seed, epoch, index)

    def _apply(self, stack: torch.Tensor, seed: int, epoch: int, index: np.ndarray) -> torch.Tensor:
        batch, count = stack.shape[:2]
        streams = AUGMENT_STREAM + np.arange(count * _STREAMS).reshape(count, _STREAMS)
        draws = uniform_draws(seed, epoch, index[:, None, None], streams[None]).reshape(
            batch * count, _STREAMS
        )
        images = stack.reshape(batch * count, *stack.shape[2:]).to(torch.float32)
        spec = self.spec
        on = {kind: bool(getattr(spec, kind)) & (draws[:, _APPLY + i] < spec.probability)
              for i, kind in enumerate(KINDS)}  # fmt: skip
        u = (images + 1.0) / 2.0
        floor = u <= 0.0
        if on["intensity"].any():
            u = self._intensity(u, draws, on["intensity"])
        if on["bias"].any():
            u = self._bias(u, floor, draws, on["bias"])
        if on["blur"].any():
            u = self._blur(u, draws, on["blur"])
            floor = u <= 0.0
        if on["noise"].any():
            u = self._noise(u, floor, draws, on["noise"])
        u = torch.where(floor, torch.zeros_like(u), u)
        changed = torch.clamp(u * 2.0 - 1.0, -1.0, 1.0)
        # A sample no kind was drawn for is returned bit for bit (the round trip through u is not exact).
        touched = self._per_image(np.logical_or.reduce(list(on.values())), images) > 0
        return torch.where(touched, changed, images).reshape(stack.shape)

    # ------------------------------------------------------------------ the four kinds of change
    def _per_image(self, values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """Per-image numbers as a tensor broadcasting over ``(channels, *spatial)``."""
        return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(
            -1, *([1] * (like.ndim - 1))
        )

    def _intensity(self, u: torch.Tensor, draws: np.ndarray, on: np.ndarray) -> torch.Tensor:
        """Gamma or piecewise-linear monotone warp on [0, 1] (0 and 1 stay put)."""
        log_low, log_high = math.log(GAMMA[0]), math.log(GAMMA[1])
        gamma = np.exp(log_low + (log_high - log_low) * draws[:, _GAMMA])
        use_gamma = on & (draws[:, _CHOICE] < 0.5)
        use_warp = on & ~use_gamma
        x = u.clamp(0.0, 1.0)
        out = u
        if use_gamma.any():
            power = self._per_image(np.where(use_gamma, gamma, 1.0), u)
            out = torch.where(self._per_image(use_gamma, u) > 0, x**power, out)
        if use_warp.any():
            points = self._warp_points(draws)  # (images, WARP_POINTS)
            table = torch.as_tensor(points, dtype=torch.float32, device=u.device)
            position = x * (WARP_POINTS - 1)
            lower = position.floor().clamp(0, WARP_POINTS - 2)
            flat = lower.long().reshape(len(u), -1)
            start = torch.gather(table, 1, flat).reshape(u.shape)
            end = torch.gather(table, 1, flat + 1).reshape(u.shape)
            warped = start + (position - lower) * (end - start)
            out = torch.where(self._per_image(use_warp, u) > 0, warped, out)
        return out

    @staticmethod
    def _warp_points(draws: np.ndarray) -> np.ndarray:
        """Control values at ``linspace(0, 1, WARP_POINTS)``: each inner one uniform between the value
        before it and the reference value after it (MONAI's RandHistogramShift draw)."""
        reference = np.linspace(0.0, 1.0, WARP_POINTS)
        points = np.tile(reference, (len(draws), 1))
        for i in range(1, WARP_POINTS - 1):
            low, high = points[:, i - 1], reference[i + 1]
            points[:, i] = low + (high - low) * draws[:, _WARP + i - 1]
        return points

    def _legendre_basis(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``(terms, *shape)``: products of Legendre polynomials of total degree 1..BIAS_DEGREE over the
        image axes scaled to [-1, 1] (the constant term is left out: the field is centred anyway)."""
        key = (shape, str(device))
        if key not in self._basis:
            axes = [np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, n), BIAS_DEGREE) for n in shape]
            terms = []
            for degrees in itertools.product(range(BIAS_DEGREE + 1), repeat=len(shape)):
                if 0 < sum(degrees) <= BIAS_DEGREE:
                    term = axes[0][:, degrees[0]]
                    for axis, degree in zip(axes[1:], degrees[1:], strict=True):
                        term = np.multiply.outer(term, axis[:, degree])
                    terms.append(term)
            self._basis[key] = torch.as_tensor(np.stack(terms), dtype=torch.float32, device=device)
        return self._basis[key]

    def _bias(self, u: torch.Tensor, floor: torch.Tensor, draws: np.ndarray, on: np.ndarray) -> torch.Tensor:
        """Multiply by a smooth field of geometric mean 1 over each image's foreground."""
        basis = self._legendre_basis(tuple(u.shape[2:]), u.device)
        coefficients = BIAS_COEFFICIENT * (2.0 * draws[:, _BIAS : _BIAS + len(basis)] - 1.0)
        coefficients = np.where(on[:, None], coefficients, 0.0)
        log_field = torch.tensordot(torch.as_tensor(coefficients, dtype=torch.float32, device=u.device),
                                    basis, dims=1)[:, None]  # fmt: skip
        log_field = log_field.expand_as(u)
        inside = (~floor).to(torch.float32)
        count = inside.reshape(len(u), -1).sum(dim=1)
        mean_inside = (log_field * inside).reshape(len(u), -1).sum(dim=1) / count.clamp(min=1.0)
        mean_all = log_field.reshape(len(u), -1).mean(dim=1)
        centre = torch.where(count > 0, mean_inside, mean_all)
        return u * torch.exp(log_field - centre.reshape(-1, *([1] * (u.ndim - 1))))

    def _blur(self, u: torch.Tensor, draws: np.ndarray, on: np.ndarray) -> torch.Tensor:
        """Gaussian blur (per-axis sigma) or nearest down- and linear up-sampling, per image."""
        use_smooth = on & (draws[:, _CHOICE + 1] < 0.5)
        use_zoom = on & ~use_smooth
        out = u
        if use_smooth.any():
            sigma = (
                BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * draws[:, _BLUR : _BLUR + self.spatial_dims]
            )
            out = torch.where(self._per_image(use_smooth, u) > 0, self._gaussian(u, sigma), out)
        if use_zoom.any():
            zoom = ZOOM[0] + (ZOOM[1] - ZOOM[0]) * draws[:, _ZOOM]
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            out = out.clone()
            for i in np.flatnonzero(use_zoom):
                image = u[i : i + 1]
                size = tuple(max(1, round(n * zoom[i])) for n in image.shape[2:])
                small = F.interpolate(image, size=size, mode="nearest")
                out[i] = F.interpolate(small, size=image.shape[2:], mode=mode, align_corners=False)[0]
        return out

    def _gaussian(self, u: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
        """Separable Gaussian blur with one sigma per (image, axis), zero beyond the edges (the floor)."""
        radius = math.ceil(3.0 * BLUR_SIGMA[1])
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        images, channels = u.shape[:2]
        out = u.reshape(1, images * channels, *u.shape[2:])
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        for axis in range(self.spatial_dims):
            kernel = np.exp(-0.5 * (offsets[None, :] / sigma[:, axis : axis + 1]) ** 2)
            kernel /= kernel.sum(axis=1, keepdims=True)
            weight = torch.as_tensor(
                np.repeat(kernel, channels, axis=0), dtype=torch.float32, device=u.device
            )
            shape = [1] * self.spatial_dims
            shape[axis] = len(offsets)
            padding = [0] * self.spatial_dims
            padding[axis] = radius
            out = conv(out, weight.reshape(images * channels, 1, *shape), padding=tuple(padding),
                       groups=images * channels)  # fmt: skip
        return out.reshape(u.shape)

    def _noise(self, u: torch.Tensor, floor: torch.Tensor, draws: np.ndarray, on: np.ndarray) -> torch.Tensor:
        """Rician noise above the floor; each image's two noise fields come from its own Generator."""
        out = u.clone()
        for i in np.flatnonzero(on):
            generator = np.random.default_rng(int(draws[i, _NOISE + 1] * 2**53))
            sd = NOISE_SD * draws[i, _NOISE]
            fields = generator.standard_normal((2, *u.shape[1:]), dtype=np.float32) * np.float32(sd)
            noise = torch.from_numpy(fields).to(u.device)
            noisy = torch.sqrt((u[i] + noise[0]) ** 2 + noise[1] ** 2)
            out[i] = torch.where(floor[i], u[i], noisy)
        return out


#: Whole-volume draws per training subject that an augmented run keeps for its out-of-distribution screen.
APPEARANCE_DRAWS = 16
#: The chance of each kind in those draws (see :meth:`AppearanceDraws.histograms`).
APPEARANCE_PROBABILITY = 0.5
#: Seed of those draws (any fixed value: they describe the augmentation, not one training run's batches).
APPEARANCE_SEED = 20_261_207


@dataclass(frozen=True)
class AppearanceDraws:
    """The appearances an augmented run's sources take, as whole volumes: what its OOD screen accepts.

    The out-of-distribution screen compares an input's intensity histogram with the training images'. A
    run trained with ``data.augment`` has seen far more than its training images: every monotone warp and
    bias field the augmentation drew. Against the plain training histograms, a spoiled gradient echo or an
    MPRAGE T1w that such a model synthesises as well as its own protocol is still flagged: a false alarm
    (measured on the 4 mm protocol cohorts, README "Another site's T1w"). So the fingerprint of an augmented
    run also keeps, per training subject and source modality, the histograms of ``draws`` augmented
    versions of the whole volume (:mod:`medsynth.model.ood` compares an input with the nearest of them).

    One draw covers the whole volume, as one scanner gives one appearance: for 2D/2.5D training
    (``axis`` set) the slices along ``axis`` are the context channels of one sample, which share a draw
    (the bias field is then the same in every slice, a simplification that moves no histogram much); for
    3D (``axis`` None) the volume is one patch.
    """

    spec: AugmentSpec
    modalities: tuple[str, ...]
    axis: int | None
    draws: int = APPEARANCE_DRAWS

    def histograms(self, normalised: np.ndarray, mask: np.ndarray, subject: int) -> list[list[float]]:
        """Histograms (inside ``mask``) of ``draws`` augmented versions of training subject ``subject``."""
        from .appearance import normalised_histogram  # numpy only; keeps the module graph one-way

        volume = torch.from_numpy(np.clip(normalised, -1.0, 1.0).astype(np.float32))
        # The reference samples the family of appearances the recipe's kinds span, each kind on half the
        # draws whatever the recipe's probability: how often training showed a change does not say whether
        # the model handles it (a tenth of the samples teaches MPRAGE as well as half, README "Another
        # site's T1w"), and this sampling is the one the screen's threshold was calibrated with. Every
        # draw changed (probability 1) widened the reference until a T2w passed as a T1w.
        spec = replace(self.spec, probability=APPEARANCE_PROBABILITY)
        if self.axis is None:
            stack, augment = volume[None, None, None], SourceAugmentation(spec, spatial_dims=3)
        else:
            stack = volume.movedim(self.axis, 0)[None, None]
            augment = SourceAugmentation(spec, spatial_dims=2)
        index = np.array([subject])
        out = []
        for draw in range(self.draws):
            changed = augment(stack, seed=APPEARANCE_SEED, epoch=draw, index=index)
            if self.axis is None:
                array = changed[0, 0, 0].numpy()
            else:
                array = changed[0, 0].movedim(0, self.axis).numpy()
            out.append([round(float(h), 6) for h in normalised_histogram(array[mask])])
        return out


def appearance_draws(
    value: Any, modalities: tuple[str, ...], spatial_dims: int, axis: int
) -> AppearanceDraws | None:
    """The :class:`AppearanceDraws` of a recipe's ``data.augment`` (None when it augments nothing)."""
    spec = AugmentSpec.from_config(value)
    if spec is None:
        return None
    return AppearanceDraws(spec, tuple(modalities), None if spatial_dims == 3 else axis)
