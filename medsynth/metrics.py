"""Image-similarity metrics for synthetic volumes: PSNR, SSIM (3D and mean of 2D slices) and MAE.

Every metric takes an explicit ``data_range`` and an optional foreground ``mask`` because a number
without them cannot be compared across papers or runs: PSNR and SSIM depend on the intensity range,
and background air inflates every score. :func:`compute_metrics` reports both, and says in which
intensity ``space`` and range they were computed.

Rules for the edge cases:

* Identical volumes have zero error, so PSNR is ``float('inf')`` (not capped: a cap would be an
  arbitrary number that looks measured). Use :func:`json_safe` before writing JSON, which turns
  it into the string ``"inf"``.
* Constant volumes are fine: SSIM's stabilising constants keep it defined (1 for identical ones).
* An empty mask raises ``ValueError``: a metric over no voxels has no meaning.

SSIM is scikit-image's ``structural_similarity`` with the settings of Wang et al. (2004): Gaussian
window, sigma 1.5 (11 taps), K1 = 0.01, K2 = 0.03, population covariance. These are also MONAI's
``SSIMMetric`` defaults, so both libraries give the same number (``tests/test_metrics.py`` checks it).
scikit-image is the implementation because it works on numpy in float64 and returns the full SSIM
map, which the masked average needs; MONAI's metric returns only the window-cropped mean.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

#: Wang et al. (2004) Gaussian window; scikit-image derives an 11-voxel window from it.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
_SSIM_PAD = (SSIM_WINDOW - 1) // 2


def _prepare(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None, data_range: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check shapes, range and mask; return float64 copies so sums do not lose precision."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    if mask is None:
        return pred, target, None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != pred.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {pred.shape}")
    if not mask.any():
        raise ValueError("the mask is empty; metrics need at least one foreground voxel")
    return pred, target, mask


def _select(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return values if mask is None else values[mask]


def mae(pred: np.ndarray, target: np.ndarray, *, mask: np.ndarray | None = None, data_range: float) -> float:
    """Mean absolute error inside ``mask`` (everywhere when ``None``), in the inputs' intensity units.

    ``data_range`` is not used by the formula; it is required so that every metric call states the
    range it assumes and is validated the same way.
    """
    pred, target, mask = _prepare(pred, target, mask, data_range)
    return float(np.mean(np.abs(_select(pred - target, mask))))


def psnr(pred: np.ndarray, target: np.ndarray, *, mask: np.ndarray | None = None, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)`` over the mask's voxels.

    Returns ``float('inf')`` when the MSE is exactly zero (identical volumes). Computed directly rather
    than with scikit-image's ``peak_signal_noise_ratio``, which has no mask and warns on zero error.

    >>> round(psnr(np.zeros((2, 2, 2)), np.full((2, 2, 2), 0.1), data_range=2.0), 4)
    26.0206
    """
    pred, target, mask = _prepare(pred, target, mask, data_range)
    mse = float(np.mean(np.square(_select(pred - target, mask))))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _ssim_map(
    pred: np.ndarray, target: np.ndarray, data_range: float, channel_axis: int | None
) -> np.ndarray:
    """Voxel-wise SSIM map (same shape as the inputs); edges use reflected neighbourhoods."""
    spatial = [
        s for axis, s in enumerate(pred.shape) if channel_axis is None or axis != channel_axis % pred.ndim
    ]
    if min(spatial) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW} voxels along each image axis, got shape {pred.shape}"
        )
    _, full = structural_similarity(
        pred,
        target,
        data_range=data_range,
        channel_axis=channel_axis,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    return full


def _interior(ndim: int, skip_axis: int | None = None) -> tuple[slice, ...]:
    """Index that drops the half-window border, where the SSIM window reaches past the image."""
    return tuple(slice(None) if axis == skip_axis else slice(_SSIM_PAD, -_SSIM_PAD) for axis in range(ndim))


def ssim_3d(
    pred: np.ndarray, target: np.ndarray, *, mask: np.ndarray | None = None, data_range: float
) -> float:
    """Structural similarity of two volumes with a 3D window.

    Without a mask it is the standard score: the mean of the SSIM map away from the half-window
    border (as scikit-image and MONAI report it). With a mask it is the mean of the map over the
    mask's voxels, border included, because a foreground that reaches the edge of the field of view
    must still be scored. Each axis needs at least 11 voxels.
    """
    pred, target, mask = _prepare(pred, target, mask, data_range)
    full = _ssim_map(pred, target, data_range, channel_axis=None)
    if mask is None:
        return float(np.mean(full[_interior(full.ndim)]))
    return float(np.mean(full[mask]))


def ssim_2d_mean(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    data_range: float,
    axis: int = 2,
) -> float:
    """Mean of per-slice 2D SSIM along ``axis`` (2 = axial slices of a canonical RAS volume).

    This is how slice-based synthesis papers usually report SSIM. Without a mask every slice counts,
    each scored away from its in-plane border. With a mask, each slice's score is the mean of its SSIM
    map inside the mask, and only slices that contain mask voxels are averaged.
    """
    pred, target, mask = _prepare(pred, target, mask, data_range)
    axis = axis % pred.ndim
    full = _ssim_map(pred, target, data_range, channel_axis=axis)
    in_plane = tuple(a for a in range(pred.ndim) if a != axis)
    if mask is None:
        per_slice = np.mean(full[_interior(full.ndim, skip_axis=axis)], axis=in_plane)
        return float(np.mean(per_slice))
    counts = np.sum(mask, axis=in_plane)
    sums = np.sum(np.where(mask, full, 0.0), axis=in_plane)
    present = counts > 0
    return float(np.mean(sums[present] / counts[present]))


def compute_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    mask: np.ndarray,
    data_range: float,
    space: str,
) -> dict[str, Any]:
    """All metrics, over the whole volume and inside ``mask``, with the range and space they assume.

    ``space`` names the intensity scale the arrays are in (e.g. ``"normalised [-1, 1]"`` or
    ``"t2 intensity"``) so a reader of the numbers knows what they measure. Keys: ``psnr``, ``ssim3d``,
    ``ssim2d``, ``mae`` and the same with ``_masked``, plus ``mask_voxels``, ``data_range``, ``space``.
    """
    pred, target, mask_checked = _prepare(pred, target, mask, data_range)
    if mask_checked is None:
        raise ValueError(
            "compute_metrics needs a foreground mask; pass np.ones(shape, bool) to score everything"
        )
    functions = {"psnr": psnr, "ssim3d": ssim_3d, "ssim2d": ssim_2d_mean, "mae": mae}
    result: dict[str, Any] = {}
    for name, function in functions.items():
        result[name] = function(pred, target, data_range=data_range)
        result[f"{name}_masked"] = function(pred, target, mask=mask_checked, data_range=data_range)
    result["mask_voxels"] = int(mask_checked.sum())
    result["data_range"] = float(data_range)
    result["space"] = space
    return result


def json_safe(value: Any) -> Any:
    """Make metric results JSON-valid: non-finite floats become ``"inf"``, ``"-inf"`` or ``"nan"``.

    Walks dicts, lists and tuples, and turns numpy scalars into Python numbers.

    >>> json_safe({"psnr": float("inf"), "mae": np.float32(0.5)})
    {'psnr': 'inf', 'mae': 0.5}
    """
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
