"""The misregistered demo cohort: the reference stays put, the rest moves by the recorded rigid transform."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import resample_moved
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medsynth.cli import main
from medsynth.data import demo
from medsynth.errors import ConfigError
from medsynth.io.volume import Volume

SPACING = 8.0  # 25 x 30 x 24 voxels
SEED = 7
SUFFIX = {"t1": "T1w", "t2": "T2w", "pd": "PDw", "flair": "FLAIR", "ct": "CT"}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same two subjects plain (library) and misregistered by up to 4 mm / 4 deg (CLI)."""
    root = tmp_path_factory.mktemp("misregister")
    demo.make_demo_cohort(root / "plain", n_subjects=2, spacing_mm=SPACING, seed=SEED, progress=False)
    argv = ["data", "demo", "--out", str(root / "moved"), "--subjects", "2", "--spacing", "8"]
    assert main([*argv, "--seed", str(SEED), "--misregister", "4,4"]) == 0
    return root / "plain", root / "moved"


def _file(cohort: Path, subject: str, modality: str) -> Path:
    return cohort / subject / "anat" / f"{subject}_{SUFFIX[modality]}.nii.gz"


def _motions(cohort: Path) -> dict[str, demo.Misregistration]:
    info = json.loads((cohort / "dataset_description.json").read_text())["MedsynthDemo"]["misregistration"]
    lines = (cohort / "participants.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    motions = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t"), strict=True))
        motions[row["participant_id"]] = demo.Misregistration(
            tuple(float(row[f"misregister_t{a}_mm"]) for a in "xyz"),  # type: ignore[arg-type]
            tuple(float(row[f"misregister_axis_{a}"]) for a in "xyz"),  # type: ignore[arg-type]
            float(row["misregister_rotation_deg"]),
            tuple(info["centre_mm"]),  # type: ignore[arg-type]
        )
    return motions


def test_reference_is_untouched_and_the_rest_moves(cohorts: tuple[Path, Path]) -> None:
    plain, moved = cohorts
    for subject in ("sub-01", "sub-02"):
        # gzip headers carry a time stamp and a temporary name: compare the NIfTI bytes inside
        reference = [gzip.decompress(_file(c, subject, "t1").read_bytes()) for c in (plain, moved)]
        assert reference[0] == reference[1]
        for modality in ("t2", "pd", "flair", "ct"):
            before, after = (nib.load(_file(c, subject, modality)) for c in (plain, moved))
            assert not np.array_equal(np.asarray(before.dataobj), np.asarray(after.dataobj)), modality
            np.testing.assert_array_equal(after.affine, before.affine)
            np.testing.assert_array_equal(after.header.get_qform(), before.header.get_qform())
            np.testing.assert_array_equal(after.header.get_sform(), before.header.get_sform())
    plain_info = json.loads((plain / "dataset_description.json").read_text())["MedsynthDemo"]
    assert "misregistration" not in plain_info
    assert "misregister" not in (plain / "participants.tsv").read_text()


def test_participants_and_description_record_the_draws(cohorts: tuple[Path, Path]) -> None:
    _, moved = cohorts
    info = json.loads((moved / "dataset_description.json").read_text())["MedsynthDemo"]["misregistration"]
    assert info["max_mm"] == 4.0 and info["max_deg"] == 4.0 and info["reference"] == "t1"
    rows = (moved / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t")[4:] == list(demo.MISREGISTER_COLUMNS)
    for index, (subject, motion) in enumerate(_motions(moved).items()):
        assert 2.0 - 1e-3 <= motion.shift_mm <= 4.0 + 1e-3 and 2.0 <= abs(motion.angle_deg) <= 4.0
        assert math.isclose(np.linalg.norm(motion.axis), 1.0, abs_tol=1e-5)
        row = dict(zip(rows[0].split("\t"), rows[index + 1].split("\t"), strict=True))
        assert row["participant_id"] == subject
        assert math.isclose(float(row["misregister_translation_mm"]), motion.shift_mm, abs_tol=1e-3)
        drawn = demo.draw_misregistration(index, SEED, 4.0, 4.0, motion.centre_mm)
        np.testing.assert_allclose(drawn.translation_mm, motion.translation_mm, atol=1e-4)


def test_moved_head_is_where_the_recorded_transform_puts_it(cohorts: tuple[Path, Path]) -> None:
    """Centre of mass of the T2 head, mapped by the recorded motion, lands on the moved one (within 1 mm)."""
    plain, moved = cohorts
    for subject, motion in _motions(moved).items():
        centres = []
        for cohort in (plain, moved):
            image = nib.load(_file(cohort, subject, "t2"))
            array = np.asarray(image.dataobj)
            head = np.where(array > 0.2 * np.percentile(array, 99), array, 0.0)
            centres.append(image.affine @ [*ndimage.center_of_mass(head), 1.0])
        expected = motion.matrix() @ centres[0]
        assert np.linalg.norm(expected[:3] - centres[1][:3]) < 1.0, subject
        assert np.linalg.norm(centres[1][:3] - centres[0][:3]) > 1.5  # it did move


def test_ct_keeps_int16_and_air_background(cohorts: tuple[Path, Path]) -> None:
    plain, moved = cohorts
    image = nib.load(_file(moved, "sub-01", "ct"))
    ct = np.asarray(image.dataobj)
    before = np.asarray(nib.load(_file(plain, "sub-01", "ct")).dataobj)
    assert image.get_data_dtype() == np.int16 and ct.dtype == np.int16
    # every face but the inferior one (the MNI field of view cuts through the neck) is air
    faces = np.concatenate([ct[[0, -1]].ravel(), ct[:, [0, -1]].ravel(), ct[:, :, -1].ravel()])
    assert faces.min() >= -1024 and faces.max() < -900 and abs(np.median(faces) + 1000) < 30
    assert abs(float(np.median(ct[ct < -500])) - float(np.median(before[before < -500]))) < 5  # same air
    assert ct.max() > 300  # the skull moved, not lost


def test_a_moved_head_is_scanned_not_resampled(cohorts: tuple[Path, Path]) -> None:
    """The moved images are as sharp as the unmoved ones: the head moved before it was imaged.

    Resampling the finished volume (what the cohort did first) smooths anatomy and noise alike: its
    mean voxel-to-voxel difference falls by a quarter or more, and a model trained on it learns a blur.
    """
    plain, moved = cohorts

    def sharpness(array: np.ndarray) -> float:
        return float(np.mean([np.abs(np.diff(array, axis=a)).mean() for a in range(3)]))

    for subject, motion in _motions(moved).items():
        for modality in ("t2", "ct"):
            before = nib.load(_file(plain, subject, modality))
            after = np.asarray(nib.load(_file(moved, subject, modality)).dataobj, dtype=np.float64)
            unmoved = np.asarray(before.dataobj, dtype=np.float64)
            assert sharpness(after) > 0.93 * sharpness(unmoved), (subject, modality)
            air = -1024.0 if modality == "ct" else 0.0
            resampled = resample_moved(Volume(unmoved, before.affine), motion, fill=air).array
            assert sharpness(resampled) < 0.9 * sharpness(unmoved)  # what the test would catch


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([2.0, 2.0, 2.0, 1.0]),
        np.array([[0, 0, -3.0, 40], [-2.0, 0, 0, 30], [0, 2.5, 0, -20], [0, 0, 0, 1]]),
    ],
    ids=["ras", "permuted-flipped"],
)
def test_the_resampling_helper_is_exact_for_a_linear_ramp(affine: np.ndarray) -> None:
    """Linear interpolation reproduces a linear field exactly, so moved(y) == f(T^-1 y) in world mm."""
    gradient = np.array([0.3, -0.7, 1.1])
    shape = (20, 22, 18)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    volume = Volume(world @ gradient + 100.0, affine)
    motion = demo.Misregistration((1.5, -2.0, 0.7), (0.6, 0.0, 0.8), 7.0, tuple(world.mean(axis=(0, 1, 2))))
    moved = resample_moved(volume, motion, fill=-1.0)
    rotation = Rotation.from_rotvec(np.deg2rad(motion.angle_deg) * np.array(motion.axis)).as_matrix()
    centre = np.array(motion.centre_mm)
    source = (world - centre - motion.translation_mm) @ rotation + centre  # R^T (y - c - t) + c
    expected = source @ gradient + 100.0
    source_ijk = (source - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((source_ijk >= 0) & (source_ijk <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.5 and (moved.array[~inside] == -1.0).any()
    np.testing.assert_allclose(moved.array[inside], expected[inside], atol=1e-3)
    np.testing.assert_array_equal(moved.affine, affine)


def test_reference_can_be_any_demo_modality() -> None:
    volumes, _ = demo.simulate_subject(0, SPACING, seed=0)
    motion = demo.draw_misregistration(0, 0, 4.0, 4.0, demo.head_centre_mm(SPACING))
    moved, _ = demo.simulate_subject(0, SPACING, seed=0, motion=motion, reference="ct")
    np.testing.assert_array_equal(moved["ct"].array, volumes["ct"].array)
    assert not np.array_equal(moved["t1"].array, volumes["t1"].array)
    assert moved["t1"].array.min() >= 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--misregister", "4"], "MM,DEG"),
        (["--misregister", "a,b"], "MM,DEG"),
        (["--misregister", "4,4,4"], "MM,DEG"),
        (["--misregister=-1,4"], "out of range"),
        (["--misregister", "4,nan"], "out of range"),
        (["--misregister", "4,4", "--misregister-reference", "t1c"], "not a demo modality"),
        (["--misregister", "4,4", "--misregister-reference", "bone"], "not a demo modality"),
        (["--misregister-reference", "t2"], "need --misregister"),
        (["--misregister-plane", "axial"], "need --misregister"),
    ],
)
def test_bad_arguments_give_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new"
    assert main(["data", "demo", "--out", str(out), "--spacing", "8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err
    assert not out.exists()


@pytest.mark.parametrize(("plane", "normal"), [("axial", 2), ("coronal", 1), ("sagittal", 0)])
def test_a_motion_in_a_plane_has_the_same_size_and_no_part_across_it(plane: str, normal: int) -> None:
    """The plane keeps each draw's length and angle and removes what crosses the plane; the rest moves as drawn."""
    centre = demo.head_centre_mm(SPACING)
    for index in range(4):
        free = demo.draw_misregistration(index, 0, 4.0, 4.0, centre)
        flat = demo.draw_misregistration(index, 0, 4.0, 4.0, centre, plane=plane)
        assert flat.translation_mm[normal] == 0.0 and flat.axis == tuple(np.eye(3)[normal])
        assert flat.shift_mm == pytest.approx(free.shift_mm) and flat.angle_deg == free.angle_deg
        rotation = flat.matrix()[:3, :3]
        assert rotation[normal, normal] == pytest.approx(1.0)  # the normal is left where it is
        assert flat.matrix()[normal, 3] == pytest.approx(0.0, abs=1e-12)  # nothing moves across the plane


def test_the_cli_offers_the_planes_the_library_knows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for plane in demo.MISREGISTER_PLANES:  # the parser lists them itself (it imports nothing heavy)
        args = ["data", "demo", "--out", str(tmp_path / plane), "--misregister-plane", plane]
        assert main(args) == 2 and "need --misregister" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own one-line usage error
        main(["data", "demo", "--out", str(tmp_path / "x"), "--misregister-plane", "oblique"])
    assert "invalid choice" in capsys.readouterr().err


def test_library_refuses_bad_values(tmp_path: Path) -> None:
    for misregister in [(-1.0, 4.0), (4.0, 200.0), (4.0,), "4,4", (True, 4.0)]:
        with pytest.raises(ConfigError):
            demo.make_demo_cohort(tmp_path / "x", spacing_mm=SPACING, misregister=misregister, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="t1, t2, pd, flair, ct"):
        demo.make_demo_cohort(tmp_path / "x", spacing_mm=SPACING, misregister=(4, 4), reference="T1c")
    with pytest.raises(ConfigError, match="axial"):
        demo.make_demo_cohort(
            tmp_path / "x", spacing_mm=SPACING, misregister=(4, 4), misregister_plane="oblique"
        )
    with pytest.raises(ConfigError, match="needs misregister"):
        demo.make_demo_cohort(tmp_path / "x", spacing_mm=SPACING, misregister_plane="axial")
    assert not (tmp_path / "x").exists()
