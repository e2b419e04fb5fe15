"""Figures: PNGs are written atomically, laid out as asked, and drawn in radiological orientation."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread, imsave
from scipy import ndimage

from medsynth.errors import DataError
from medsynth.viz import comparison_grid, plot_curves, subject_figure

SHAPE = (24, 28, 20)


def _head() -> tuple[np.ndarray, np.ndarray]:
    i, j, k = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    mask = ((i - 12) / 10) ** 2 + ((j - 14) / 12) ** 2 + ((k - 10) / 8) ** 2 < 1
    return np.where(mask, 0.5 + 0.02 * i, 0.0), mask


def _marker_quadrant(png) -> tuple[str, str]:
    """Where the white marker sits inside the (black) displayed slice: ('top'|'bottom', 'left'|'right')."""
    grey = imread(png)[..., :3].mean(axis=-1)
    labels, count = ndimage.label(grey < 0.1)
    sizes = ndimage.sum(np.ones_like(grey), labels, index=range(1, count + 1))
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))  # the slice is the largest dark blob
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    window = grey[top : bottom + 1, left : right + 1]
    marker_rows, marker_cols = np.nonzero(window > 0.9)
    vertical = "top" if marker_rows.mean() < window.shape[0] / 2 else "bottom"
    horizontal = "left" if marker_cols.mean() < window.shape[1] / 2 else "right"
    return vertical, horizontal


def test_axial_slices_are_shown_anterior_up_and_patient_right_on_the_left(tmp_path):
    plane = np.zeros((32, 32))  # [i, j]: i runs left -> right, j posterior -> anterior
    plane[24:30, 24:30] = 1.0  # right and anterior
    path = comparison_grid([{"t1": plane}], tmp_path / "grid.png", error_column=False)
    assert _marker_quadrant(path) == ("top", "left")
    plane = np.zeros((32, 32))
    plane[2:8, 2:8] = 1.0  # left and posterior
    assert _marker_quadrant(comparison_grid([{"t1": plane}], path, error_column=False)) == ("bottom", "right")


def test_comparison_grid_writes_one_row_per_example_and_adds_the_error_column(tmp_path):
    head, _ = _head()
    rows = [{"t1": head[:, :, k], "synthetic": head[:, :, k] + 0.1, "target": head[:, :, k]} for k in (8, 10)]
    out = tmp_path / "samples" / "epoch_001.png"
    assert comparison_grid(rows, out, titles=["a k=8", "a k=10"]) == out
    height, width = imread(out).shape[:2]
    assert width / height == pytest.approx(4 / 2, rel=0.05)  # t1, synthetic, target, |error| by 2 rows
    without_error = comparison_grid(rows, tmp_path / "plain.png", error_column=False, vmin={"t1": 0.0})
    height, width = imread(without_error).shape[:2]
    assert width / height == pytest.approx(3 / 2, rel=0.05)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["epoch_001.png", "plain.png"]


def test_comparison_grid_refuses_inconsistent_rows(tmp_path):
    plane = np.zeros((16, 16))
    with pytest.raises(ValueError, match="row 1 has columns"):
        comparison_grid([{"synthetic": plane, "target": plane}, {"target": plane}], tmp_path / "g.png")
    with pytest.raises(ValueError, match="needs 'synthetic' and 'target'"):
        comparison_grid([{"t1": plane, "target": plane}], tmp_path / "g.png")
    with pytest.raises(ValueError, match="expected a 2D slice"):
        comparison_grid([{"synthetic": np.zeros((4, 4, 4)), "target": plane}], tmp_path / "g.png")
    with pytest.raises(ValueError, match="1 titles for 2 rows"):
        comparison_grid([{"synthetic": plane, "target": plane}] * 2, tmp_path / "g.png", titles=["x"])
    assert not (tmp_path / "g.png").exists()


def test_subject_figure_shows_three_planes_and_replaces_an_old_file(tmp_path):
    head, mask = _head()
    out = tmp_path / "subject.png"
    out.write_bytes(b"old")
    subject_figure({"t1": head, "pd": 1 - head}, head + 0.05, head, out, mask=mask, spacing=(1.0, 1.0, 2.0))
    image = imread(out)
    height, width = image.shape[:2]
    assert width / height == pytest.approx(5 / 3, rel=0.1)  # t1, pd, synthetic, target, |error| by 3 planes
    assert [p.name for p in tmp_path.iterdir()] == ["subject.png"]


def test_subject_figure_refuses_mismatched_shapes(tmp_path):
    head, mask = _head()
    with pytest.raises(ValueError, match="'t1' has shape"):
        subject_figure({"t1": head[:-1]}, head, head, tmp_path / "s.png")
    with pytest.raises(ValueError, match="mask has shape"):
        subject_figure({"t1": head}, head, head, tmp_path / "s.png", mask=mask[:, :, :-1])
    assert not (tmp_path / "s.png").exists()


def test_plot_curves_reads_a_metrics_csv_with_gaps(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,loss_g,loss_d,val_psnr\n0,1.0,0.5,\n1,0.8,0.4,21.5\n2,0.7,0.35,23.0\n")
    out = plot_curves(csv_path, tmp_path / "curves.png")
    height, width = imread(out).shape[:2]
    assert width > height  # losses panel and val_psnr panel side by side


def test_plot_curves_explains_unusable_files(tmp_path):
    with pytest.raises(DataError, match="cannot read the metrics file"):
        plot_curves(tmp_path / "missing.csv", tmp_path / "c.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,0.5\n")
    with pytest.raises(DataError, match="no 'epoch' column"):
        plot_curves(bad, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------------------- readable at 1,200 px
#: The columns the trainer writes to metrics.csv (three losses share a panel: ten panels).
TRAINER_COLUMNS = [
    "steps", "seconds", "val_seconds", "io_seconds", "slices_per_s", "lr",
    "loss_critic", "loss_adv", "loss_l1", "val_psnr", "val_ssim", "val_mae",
]  # fmt: skip


def _size(png) -> tuple[int, int]:
    height, width = imread(png).shape[:2]
    return width, height


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["loss_g"], (400, 320)),
        (["loss_g", "val_psnr"], (800, 320)),
        (["loss_g", "val_psnr", "val_ssim"], (800, 640)),  # 2 x 2, one cell empty
        (
            ["loss_g", "val_psnr", "val_ssim", "val_mae", "lr", "seconds", "steps", "slices_per_s"],
            (1200, 960),
        ),
        (TRAINER_COLUMNS, (1200, 1280)),
    ],
)
def test_plot_curves_lays_panels_out_in_a_grid_at_most_1200_px_wide(tmp_path, columns, expected):
    lines = ["epoch," + ",".join(columns)] + [f"{e}," + ",".join(["1.5"] * len(columns)) for e in range(3)]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    width, height = _size(plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png"))
    assert (width, height) == expected
    assert width / height <= 3


@pytest.mark.parametrize("n_inputs", [1, 2, 3, 5])
@pytest.mark.parametrize("n_rows", [1, 2, 3])
def test_comparison_grid_is_never_more_than_three_times_wider_than_tall(tmp_path, n_rows, n_inputs):
    plane = _head()[0][:, :, 10]
    row = {**{f"in{i}": plane for i in range(n_inputs)}, "synthetic": plane, "target": plane}
    width, height = _size(comparison_grid([row] * n_rows, tmp_path / "g.png"))
    assert width / height <= 3
    panels = n_inputs + 3
    transposed = panels > 2.5 * n_rows
    assert width == pytest.approx(220 * (n_rows if transposed else panels), abs=2)


def test_a_single_example_is_drawn_one_image_per_row(tmp_path):
    plane = np.zeros((32, 32))
    plane[24:30, 24:30] = 1.0  # right and anterior: top left in the radiological view
    row = {"t1": plane, "synthetic": plane, "target": plane}
    path = comparison_grid([row], tmp_path / "g.png", error_column=False, titles=["sub-01 k=10"])
    assert _size(path) == (220, 660)
    top = imread(path)[:220]  # the first image (t1) still reads in radiological orientation
    imsave(tmp_path / "top.png", top)
    assert _marker_quadrant(tmp_path / "top.png") == ("top", "left")


@pytest.mark.parametrize("n_inputs", [1, 3, 4, 6])
def test_subject_figure_stays_within_three_to_one(tmp_path, n_inputs):
    head, mask = _head()
    inputs = {f"m{i}": head for i in range(n_inputs)}
    width, height = _size(subject_figure(inputs, head, head, tmp_path / "s.png", mask=mask))
    assert width / height <= 3
    if n_inputs == 1:
        assert width <= 1200  # the usual one-input figure reads at full size
