"""PNG figures for people: sample grids during training, per-subject views, training curves.

PNGs are for eyes only; no number in the pipeline is read back from them. Figures are built on
``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state, safe in worker threads) and saved
through :func:`medsynth.io.atomic.atomic_path`.

Display convention for canonical RAS arrays (``[i, j, k]`` = left->right, posterior->anterior,
inferior->superior): every plane is drawn with its second in-plane axis pointing up and its first
pointing right-to-left. That gives the radiological view: axial slices anterior up with the
patient's right on the viewer's left, coronal slices superior up with the right on the left, and
sagittal slices superior up with anterior on the left.

Synthetic and target images always share one grey window (the target's) so that a brightness
difference on screen is a real difference; the error column uses a colour map with a colour bar.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import DataError
from .io.atomic import atomic_path

SYNTHETIC = "synthetic"
TARGET = "target"
ERROR = "|error|"
UNCERTAINTY = "uncertainty"
ERROR_CMAP = "magma"
#: Columns drawn with :data:`ERROR_CMAP`, a colour bar and a window starting at zero.
_HEAT_COLUMNS = (ERROR, UNCERTAINTY)
#: Synthetic CT figures: the signed HU difference (diverging colours) and the proton range error (mm).
HU_DIFFERENCE = "synthetic - real (HU)"
RANGE_ERROR = "range error (mm)"
_COLOUR_COLUMNS = {
    ERROR: ERROR_CMAP,
    UNCERTAINTY: ERROR_CMAP,
    RANGE_ERROR: ERROR_CMAP,
    HU_DIFFERENCE: "RdBu_r",
}
#: A bone window (level 500, width 2000 HU): skull, soft tissue and air all readable.
BONE_WINDOW: tuple[float, float] = (-500.0, 1500.0)
#: Percentiles of the automatic grey window: robust to a few hot voxels.
WINDOW_PERCENTILES = (0.5, 99.5)
_PANEL_INCHES = 2.2
#: Figures are laid out to stay at most this many times wider than tall, so that they read on a
#: 1,200-pixel-wide screen or page without shrinking every panel to a strip.
MAX_WIDTH_TO_HEIGHT = 3.0
#: An image grid whose columns outnumber its rows by more than this is drawn transposed (the colour bar
#: of the error column adds about a third of a panel).
_TRANSPOSE_AT = 2.5
#: Training curves: panel size in inches (100 dpi) and at most three panels per line (1,200 px).
_CURVE_PANEL_INCHES = (4.0, 3.2)
_CURVE_COLUMNS = 3

Window = tuple[float, float]


def _radiological(plane: np.ndarray) -> np.ndarray:
    """Turn a canonical RAS plane into the image to draw (see the module docstring)."""
    return np.flip(np.asarray(plane).T)


def _auto_window(arrays: Sequence[np.ndarray]) -> Window:
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    low, high = (float(v) for v in np.percentile(values, WINDOW_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _windows(
    columns: Sequence[str],
    samples: Mapping[str, Sequence[np.ndarray]],
    vmin: Mapping[str, float] | None,
    vmax: Mapping[str, float] | None,
) -> dict[str, Window]:
    """Display window per column: given values win, else robust percentiles.

    The synthetic column shares the target's window; the error column starts at zero.
    """
    vmin, vmax = vmin or {}, vmax or {}
    windows: dict[str, Window] = {}
    for column in columns:
        source = TARGET if column == SYNTHETIC and TARGET in samples else column
        low, high = _auto_window(samples[source])
        if column in _HEAT_COLUMNS:
            low, high = 0.0, max(high, 1e-6)
        windows[column] = (vmin.get(source, vmin.get(column, low)), vmax.get(source, vmax.get(column, high)))
    return windows


def _save(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return Path(path)


def _draw_panels(
    images: Sequence[Sequence[np.ndarray]],
    columns: Sequence[str],
    windows: dict[str, Window],
    row_labels: Sequence[str],
    aspects: Sequence[float],
) -> Figure:
    """Lay out rows x columns of already oriented 2D images; the error column gets a colour bar.

    A grid much wider than tall (one example with many columns) is drawn transposed: one column per
    example, one row per image, so the figure stays within :data:`MAX_WIDTH_TO_HEIGHT`.
    """
    n_rows, n_cols = len(images), len(columns)
    transposed = n_cols > _TRANSPOSE_AT * n_rows
    shape = (n_cols, n_rows) if transposed else (n_rows, n_cols)
    figure = Figure(figsize=(_PANEL_INCHES * shape[1], _PANEL_INCHES * shape[0]), layout="constrained")
    axes = figure.subplots(*shape, squeeze=False)
    for row, (row_images, label, aspect) in enumerate(zip(images, row_labels, aspects, strict=True)):
        for col, (column, image) in enumerate(zip(columns, row_images, strict=True)):
            ax = axes[col, row] if transposed else axes[row, col]
            low, high = windows[column]
            cmap = _COLOUR_COLUMNS.get(column, "gray")
            shown = ax.imshow(image, cmap=cmap, vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            title, side = (label, column) if transposed else (column, label)
            if (col if transposed else row) == 0 and title:
                ax.set_title(title, fontsize=9)
            if (row if transposed else col) == 0 and side:
                ax.set_ylabel(side, fontsize=9)
            if column in _COLOUR_COLUMNS:
                figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return figure


def comparison_grid(
    rows: Sequence[Mapping[str, np.ndarray]],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    vmin: Mapping[str, float] | None = None,
    vmax: Mapping[str, float] | None = None,
    error_column: bool = True,
) -> Path:
    """Write a PNG with one row per example and one column per image.

    Each row maps column names to 2D axial slices (``volume[:, :, k]`` of a canonical RAS volume),
    e.g. ``{"t1": ..., "synthetic": ..., "target": ...}``; every row has the same keys, whose order
    gives the columns (a single example with many columns is drawn transposed, one row per image,
    to stay within :data:`MAX_WIDTH_TO_HEIGHT`). With ``error_column`` an ``|error|`` column, ``|synthetic - target|``, is added.
    ``titles`` label the rows (e.g. subject and slice). ``vmin``/``vmax`` fix a column's grey window by
    name; otherwise each column is windowed over all rows at its 0.5-99.5 percentiles.

    Example:
        >>> import tempfile
        >>> s = np.zeros((16, 16))
        >>> comparison_grid([{"t1": s, "synthetic": s, "target": s}], tempfile.mkdtemp() + "/g.png").suffix
        '.png'
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    columns = list(rows[0])
    for number, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(f"row {number} has columns {list(row)}, expected {columns}")
        for name, image in row.items():
            if np.ndim(image) != 2:
                raise ValueError(
                    f"row {number}, column {name!r}: expected a 2D slice, got shape {np.shape(image)}"
                )
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} rows")
    if error_column and not {SYNTHETIC, TARGET} <= set(columns):
        raise ValueError(f"the error column needs {SYNTHETIC!r} and {TARGET!r} columns, got {columns}")

    samples = {name: [np.asarray(row[name], dtype=np.float64) for row in rows] for name in columns}
    if error_column:
        samples[ERROR] = [np.abs(s - t) for s, t in zip(samples[SYNTHETIC], samples[TARGET], strict=True)]
        columns.append(ERROR)
    windows = _windows(columns, samples, vmin, vmax)

    images = [[_radiological(samples[name][row]) for name in columns] for row in range(len(rows))]
    figure = _draw_panels(images, columns, windows, titles or [""] * len(rows), [1.0] * len(rows))
    return _save(figure, path)


def _centre(shape: Sequence[int], mask: np.ndarray | None) -> tuple[int, int, int]:
    """Voxel through which the mid-slices pass: the mask's bounding-box centre, else the volume's."""
    if mask is None or not np.any(mask):
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    nonzero = np.nonzero(mask)
    return tuple(int((axis.min() + axis.max()) // 2) for axis in nonzero)  # type: ignore[return-value]


def _check_volumes(
    volumes: Mapping[str, np.ndarray], target: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float]
) -> None:
    """Three-plane figures need 3D arrays of the target's shape and three positive spacings."""
    shape = np.shape(target)
    for name, volume in volumes.items():
        if np.shape(volume) != shape or len(shape) != 3:
            raise ValueError(f"{name!r} has shape {np.shape(volume)}, expected the 3D target shape {shape}")
    if mask is not None and np.shape(mask) != shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, expected {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing}")


def subject_figure(
    inputs: Mapping[str, np.ndarray],
    synthetic: np.ndarray,
    target: np.ndarray,
    path: str | Path,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write a PNG of axial, coronal and sagittal mid-slices: input(s), synthetic, target, |error|.

    Arrays are 3D in canonical RAS, all of one shape. The slices pass through the centre of the
    mask's bounding box (the volume's centre without a mask), so a small brain in a large field of
    view is still cut through its middle. ``spacing`` (mm along i, j, k) sets the pixel aspect so
    anisotropic volumes are not squashed.
    """
    volumes = {**inputs, SYNTHETIC: synthetic, TARGET: target}
    _check_volumes(volumes, target, mask, spacing)

    arrays = {name: np.asarray(volume, dtype=np.float64) for name, volume in volumes.items()}
    arrays[ERROR] = np.abs(arrays[SYNTHETIC] - arrays[TARGET])
    return _three_planes(arrays, path, mask, spacing)


def ct_figure(
    source: tuple[str, np.ndarray],
    synthetic_hu: np.ndarray,
    real_hu: np.ndarray,
    range_error: np.ndarray,
    path: str | Path,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """A synthetic CT beside its MR input and the real CT, in three planes: MR, synthetic CT, real CT (one
    bone window), their HU difference (+-500 HU, blue where the synthetic is too low) and the proton
    range error map (mm, :func:`medsynth.ct_metrics.range_error_map`). Canonical RAS arrays of one shape.
    """
    name, mr = source
    arrays = {name: mr, "synthetic CT": synthetic_hu, "real CT": real_hu,
              HU_DIFFERENCE: np.asarray(synthetic_hu, np.float64) - real_hu, RANGE_ERROR: range_error}  # fmt: skip
    arrays = {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}
    _check_volumes(arrays, real_hu, mask, spacing)
    windows = {
        name: _auto_window([arrays[name]]),
        "synthetic CT": BONE_WINDOW,
        "real CT": BONE_WINDOW,
        HU_DIFFERENCE: (-500.0, 500.0),
        RANGE_ERROR: (0.0, max(float(np.percentile(arrays[RANGE_ERROR], 99.5)), 1.0)),
    }
    return _three_planes(arrays, path, mask, spacing, windows)


def _three_planes(
    arrays: Mapping[str, np.ndarray],
    path: str | Path,
    mask: np.ndarray | None,
    spacing: Sequence[float],
    windows: dict[str, Window] | None = None,
) -> Path:
    """One row per plane (axial, coronal, sagittal through the mask's centre), one column per array."""
    columns = list(arrays)
    shape = np.shape(next(iter(arrays.values())))
    i, j, k = _centre(shape, mask)
    # Each plane: how to cut it and the spacing of its (first, second) in-plane axes.
    planes: dict[str, tuple[tuple[int | slice, ...], tuple[float, float]]] = {
        "axial": ((slice(None), slice(None), k), (spacing[0], spacing[1])),
        "coronal": ((slice(None), j, slice(None)), (spacing[0], spacing[2])),
        "sagittal": ((i, slice(None), slice(None)), (spacing[1], spacing[2])),
    }
    cut = {name: [arrays[name][index] for index, _ in planes.values()] for name in columns}
    windows = windows or _windows(columns, {name: [arrays[name]] for name in columns}, None, None)
    images = [[_radiological(cut[name][row]) for name in columns] for row in range(len(planes))]
    # After _radiological, image rows run along the plane's second axis and columns along its first.
    aspects = [second / first for _, (first, second) in planes.values()]
    figure = _draw_panels(images, columns, windows, list(planes), aspects)
    return _save(figure, path)


def uncertainty_figure(
    synthetic: np.ndarray,
    target: np.ndarray,
    uncertainty: np.ndarray,
    path: str | Path,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write a PNG: synthetic, |error| and the uncertainty map side by side, in three planes.

    Does the uncertainty light up where the error does? Error and uncertainty each get a colour bar
    starting at zero (their own windows: a TTA spread is smaller than the error it ranks). Canonical
    RAS 3D arrays of one shape; planes and spacing as in :func:`subject_figure`.

    Example:
        >>> import tempfile
        >>> volume = np.zeros((12, 12, 12))
        >>> out = Path(tempfile.mkdtemp()) / "u.png"
        >>> uncertainty_figure(volume, volume + 0.1, volume + 0.2, out).exists()
        True
    """
    _check_volumes({SYNTHETIC: synthetic, UNCERTAINTY: uncertainty}, target, mask, spacing)
    arrays = {
        SYNTHETIC: np.asarray(synthetic, dtype=np.float64),
        ERROR: np.abs(np.asarray(synthetic, dtype=np.float64) - np.asarray(target, dtype=np.float64)),
        UNCERTAINTY: np.asarray(uncertainty, dtype=np.float64),
    }
    return _three_planes(arrays, path, mask, spacing)


def _unit_window(array: np.ndarray) -> np.ndarray:
    """``array`` scaled so its 0.5-99.5th percentiles span 0..1 (clipped): contrasts become comparable."""
    low, high = _auto_window([array])
    return np.clip((np.asarray(array, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def checkerboard_figure(
    reference: np.ndarray,
    others: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    tile_mm: float = 16.0,
) -> Path:
    """Write a PNG of checkerboards of ``reference`` and each of ``others``, in three planes.

    Alternate tiles (``tile_mm`` wide) show the reference and the other image, each in its own grey
    window, so two contrasts sit side by side: where the pair is aligned, the head's outline and the
    ventricles run straight across the tiles' borders; where it is not, they break. ``medsynth data
    register`` draws one per subject with each modality before and after registration. Canonical RAS
    3D arrays of one shape; planes and spacing as in :func:`subject_figure`.

    Example:
        >>> import tempfile
        >>> ramp = np.arange(12.0)[:, None, None] * np.ones((12, 12, 12))
        >>> checkerboard_figure(ramp, {"t2": -ramp}, Path(tempfile.mkdtemp()) / "c.png").exists()
        True
    """
    _check_volumes(others, reference, None, spacing)
    tiles = [np.arange(n) * s // tile_mm for n, s in zip(np.shape(reference), spacing, strict=True)]
    odd = (tiles[0][:, None, None] + tiles[1][None, :, None] + tiles[2][None, None, :]) % 2 == 1
    base = _unit_window(reference)
    arrays = {name: np.where(odd, _unit_window(other), base) for name, other in others.items()}
    return _three_planes(arrays, path, None, spacing, {name: (0.0, 1.0) for name in arrays})


def plot_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Plot a training run's ``metrics.csv`` against its ``epoch`` column.

    Columns whose name contains ``loss`` share the first panel; every other numeric column (validation
    PSNR, SSIM, learning rate, ...) gets its own panel, since their scales differ. Empty cells (a metric
    not computed that epoch) are skipped. Panels fill a grid at most three wide (1,200 px at 100 dpi),
    so eight panels come out as 3 x 3 rather than one 3,200-pixel strip.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as stream:
            records = list(csv.DictReader(stream))
    except OSError as exc:
        raise DataError(
            f"cannot read the metrics file ({exc.strerror}); check the run folder", csv_path
        ) from exc
    if not records or "epoch" not in records[0]:
        raise DataError("no 'epoch' column or no rows; is this a medsynth metrics.csv?", csv_path)

    series = {name: np.array([_as_float(r.get(name)) for r in records]) for name in records[0]}
    epochs = series.pop("epoch")
    plotted = {name: values for name, values in series.items() if np.isfinite(values).any()}
    losses = [name for name in plotted if "loss" in name]
    panels = ([("losses", losses)] if losses else []) + [
        (name, [name]) for name in plotted if name not in losses
    ]
    if not panels:
        raise DataError("no numeric columns besides 'epoch' to plot", csv_path)

    n_cols = _curve_columns(len(panels))
    n_rows = -(-len(panels) // n_cols)
    width, height = _CURVE_PANEL_INCHES
    figure = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.remove()
    for ax, (title, names) in zip(axes, panels, strict=False):
        for name in names:
            finite = np.isfinite(epochs) & np.isfinite(plotted[name])
            ax.plot(epochs[finite], plotted[name][finite], marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        if len(names) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(figure, png_path)


def _curve_columns(n_panels: int) -> int:
    """Panels per line: one line up to two panels, then a grid at most three wide (1,200 px)."""
    if n_panels <= 2:
        return n_panels
    return 2 if n_panels <= 4 else _CURVE_COLUMNS


def _as_float(text: str | None) -> float:
    """A CSV cell as a number; empty or non-numeric cells become NaN (not plotted)."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan
