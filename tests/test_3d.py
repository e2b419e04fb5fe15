"""3D ``t1->t2``: patch training, sliding-window synthesis with Gaussian blending, infer and evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_modes import anat, assert_on_input_grid, held_out_subject, one_line_error, read_rows, train_run

from medsynth.cli import main
from medsynth.io.readers import read_volume
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.sliding import synthesize_patches
from medsynth.model.synthesis import SynthesisModel

PATCH = 16
TINY_3D = [
    f"data.crop_size=[{PATCH}, {PATCH}, {PATCH}]",
    "data.patches_per_epoch=8",
    "train.batch_size=2",
    "train.inference_batch_size=4",
]


@pytest.fixture(scope="module")
def run_3d(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(
        tmp_path_factory.mktemp("3d"), "unet3d", ["t1->t2"], "t1_to_t2_unet3d", TINY_3D, tiny_cohort
    )


class _FirstChannel(torch.nn.Module):
    """A 'generator' that returns its first input channel: blending must give the input back exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def test_sliding_windows_blend_to_the_exact_volume() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (30, 27, 21)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[6:25, 5:22, 4:17] = True
    result = synthesize_patches(
        _FirstChannel(), [image, -image], mask, patch_size=(12, 12, 12), overlap=0.5, batch_size=3, margin=2
    )
    box = (slice(4, 27), slice(3, 24), slice(2, 19))  # the mask's box grown by the margin
    np.testing.assert_allclose(result[box], image[box], atol=1e-5)
    outside = np.ones(image.shape, bool)
    outside[box] = False
    assert (result[outside] == -1.0).all()  # no computation on air: background


def test_sliding_windows_pad_a_box_smaller_than_the_patch() -> None:
    image = np.linspace(-1, 1, 10 * 11 * 12, dtype=np.float32).reshape(10, 11, 12)
    result = synthesize_patches(_FirstChannel(), [image], np.ones(image.shape, bool), patch_size=(16, 16, 16))
    np.testing.assert_allclose(result, image, atol=1e-6)


def test_3d_checkpoint_records_the_patch(run_3d: Path) -> None:
    state = load_checkpoint(run_3d / "checkpoint_best.pt")
    assert state["plan"]["spatial_dims"] == 3 and state["plan"]["window"] == [PATCH] * 3
    assert state["plan"]["generator"]["init_args"]["spatial_dims"] == 3
    assert state["objective"]["critic"]["init_args"]["spatial_dims"] == 3


def test_3d_infer_and_evaluate(run_3d: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    subject = held_out_subject(run_3d)
    t1 = anat(tiny_cohort, subject, "T1w")
    out = tmp_path / "t2_syn.nii.gz"
    assert (
        main(["infer", "--checkpoint", str(run_3d), "--volume", str(t1), "--out", str(out), "--quiet"]) == 0
    )
    assert_on_input_grid(out, t1)
    assert main(["evaluate", "--run", str(run_3d), "--quiet"]) == 0
    rows = read_rows(run_3d / "eval" / "metrics.csv")
    assert [(r["subject"], r["target"], r["inputs"]) for r in rows] == [(subject, "t2", "t1")]
    assert np.isfinite(float(rows[0]["ssim3d_masked"]))


def test_3d_window_batch_size_does_not_change_the_result(run_3d: Path, tiny_cohort: Path) -> None:
    predictor = SynthesisModel.from_checkpoint(run_3d)
    inputs = {"t1": read_volume(anat(tiny_cohort, held_out_subject(run_3d), "T1w"))}
    one, many = (predictor.predict(inputs, batch_size=b).normalised for b in (1, 5))
    np.testing.assert_allclose(one, many, atol=1e-5)


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        (
            ["t1->t2"],
            ["data.crop_size=[48, 16, 16]"],
            "data.crop_size: patch_size (48, 16, 16) does not fit the smallest volume; the largest patch that fits every subject is (33, 39, 32)",
        ),
        (["unified", "--modalities", "t1,t2"], TINY_3D, "set model.spatial_dims=2"),
        (["t1->t2"], ["data.crop_size=[16, 16, 16]", "data.context=3"], "applies to 2D models"),
    ],
)
def test_3d_bad_configuration_is_one_line(
    task: list[str],
    extra: list[str],
    message: str,
    tiny_cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = [
        "train",
        *task,
        "--data",
        str(tiny_cohort),
        "--config",
        "t1_to_t2_unet3d",
        "--runs-dir",
        str(tmp_path),
        "--quiet",
    ]
    for item in extra:
        arguments += ["--set", item]
    one_line_error(capsys, main(arguments), message)
