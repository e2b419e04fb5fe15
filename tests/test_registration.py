"""``medsynth data register``: known motions recovered, HU kept, a copy that trains, QC, failures, inputs untouched;
``data check`` flags a shifted pair."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import resample_moved
from scipy import ndimage

from medsynth.cli import main
from medsynth.data import demo
from medsynth.data.alignment import misalignment, normalised_mutual_information
from medsynth.data.check import check_dataset
from medsynth.data.layouts import scan_dataset
from medsynth.data.register import transform_path
from medsynth.data.registration import RegistrationSettings, ct_air, register_pair, resample
from medsynth.data.template import load_template, template_on_grid
from medsynth.errors import MedsynthError
from medsynth.io.readers import read_volume
from medsynth.io.volume import LPS_TO_RAS, Volume

#: Label -> value per modality: air, scalp, skull, brain, CSF, three asymmetric blobs (so a rotation shows).
TABLES = {
    "t1": [0.0, 900.0, 100.0, 700.0, 200.0, 1000.0, 400.0, 550.0],
    "t2": [0.0, 500.0, 50.0, 450.0, 1000.0, 200.0, 800.0, 300.0],
    "ct": [-1000.0, 40.0, 1500.0, 35.0, 10.0, 60.0, 20.0, 45.0],
}
SUFFIX = {"t1": "T1w", "t2": "T2w", "ct": "CT"}


def phantom(spacing: float, shape: tuple[int, int, int], seed: int = 0) -> dict[str, Volume]:
    """An ellipsoid head (scalp, skull, brain, ventricles, blobs) as T1w, T2w and an integer-HU CT."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing  # the head's centre at the world origin
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    x = ijk @ affine[:3, :3].T + affine[:3, 3]

    def inside(centre: list[float], radii: list[float]) -> np.ndarray:
        return (((x - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1

    labels = np.zeros(shape, dtype=np.int64)
    shapes = [(1, [0, 0, 0], [68, 84, 66]), (2, [0, 0, 0], [63, 79, 61]), (3, [0, 0, 0], [58, 74, 56]),
              (4, [-12, 6, 8], [8, 22, 10]), (4, [10, 2, 8], [6, 18, 9]), (5, [25, -35, -10], [12, 10, 14]),
              (6, [-30, 30, 20], [10, 14, 8]), (7, [5, -10, -30], [20, 8, 8])]  # fmt: skip
    for label, centre, radii in shapes:
        labels[inside(centre, radii)] = label
    rng = np.random.default_rng(seed)
    volumes = {}
    for name, table in TABLES.items():
        image = ndimage.gaussian_filter(np.asarray(table)[labels], 0.7)
        if name == "ct":
            image = np.clip(np.rint(image + rng.normal(0.0, 5.0, shape)), -1024, 3071)
        else:
            image = np.abs(image + rng.normal(0.0, 20.0, shape))
        volumes[name] = Volume(image.astype(np.float32), affine)
    return volumes


def moved(volume: Volume, motion: demo.Misregistration, modality: str) -> Volume:
    """``volume`` moved by ``motion`` as the demo moves its misregistered images (air fill, integer HU)."""
    if modality != "ct":
        return resample_moved(volume, motion)
    ct = resample_moved(volume, motion, fill=-1024.0)
    return ct.with_array(np.rint(ct.array))


def residual_mm(
    transform: object, volume: Volume, motion: demo.Misregistration, mask: np.ndarray
) -> np.ndarray:
    """|T x - M x| over ``mask``: where the registration looks for each voxel vs where the motion put it."""
    world = np.argwhere(mask) @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    truth = world @ motion.matrix()[:3, :3].T + motion.matrix()[:3, 3]
    flip = np.diag(LPS_TO_RAS)[:3]
    found = np.array([transform.TransformPoint(tuple(p)) for p in world * flip]) * flip  # type: ignore[attr-defined]
    return np.linalg.norm(found - truth, axis=1)


def test_recovers_a_known_rigid_motion() -> None:
    """3.9 mm and 4 degrees on 4 mm voxels: back to within a tenth of a voxel and a quarter of a degree."""
    head = phantom(4.0, (44, 50, 42))
    motion = demo.Misregistration((3.0, -2.0, 1.5), (0.6, 0.0, 0.8), 4.0, (0.0, 0.0, 0.0))
    pair = register_pair(
        head["t1"], moved(head["t2"], motion, "t2"), ct=False, settings=RegistrationSettings()
    )
    residual = residual_mm(pair.transform, head["t1"], motion, head["t1"].array > 100)
    assert residual.mean() < 0.4 and residual.max() < 0.8
    assert abs(pair.size.rotation_deg - 4.0) < 0.25
    assert abs(pair.size.translation_mm - motion.shift_mm) < 0.4  # the motion's centre is the head's
    assert pair.nmi_after > pair.nmi_before
    assert np.array_equal(pair.after.affine, head["t1"].affine) and pair.after.shape == head["t1"].shape


def test_the_same_pair_gives_the_same_transform_to_the_last_bit() -> None:
    """Four threads offered (ITK's default is every core): the transform is bit-identical run to run, as a
    resumed run's validation on registered targets needs (several threads moved it by ~1e-10 mm)."""
    import SimpleITK as sitk

    head = phantom(4.0, (44, 50, 42))
    motion = demo.Misregistration((3.0, -2.0, 1.5), (0.6, 0.0, 0.8), 4.0, (0.0, 0.0, 0.0))
    moving = moved(head["t2"], motion, "t2")
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
    try:
        runs = [
            register_pair(head["t1"], moving, ct=False, settings=RegistrationSettings()) for _ in range(3)
        ]
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    parameters = [tuple(run.transform.GetParameters()) for run in runs]
    assert parameters[0] == parameters[1] == parameters[2]
    assert np.array_equal(runs[0].after.array, runs[2].after.array)


@pytest.mark.parametrize("interpolation", ["linear", "bspline"])
def test_ct_keeps_hu_with_air_outside_its_field_of_view(interpolation: str) -> None:
    """A CT slid 30 mm out of the reference's field of view: air where it has no data, integer HU in range."""
    import SimpleITK as sitk

    ct = phantom(6.0, (30, 34, 28))["ct"]
    # a reference point p samples the CT at p + 30 mm along LPS x (= RAS -x = 5 voxels towards low i)
    out = resample(
        ct, ct, sitk.TranslationTransform(3, (30.0, 0.0, 0.0)), ct=True, interpolation=interpolation
    )
    assert np.array_equal(out.array, np.rint(out.array))
    assert ct.array.min() <= out.array.min() and out.array.max() <= ct.array.max()
    assert np.all(out.array[:5] == ct_air(ct.array))  # beyond the CT's field of view: its air
    np.testing.assert_allclose(out.array[5:], ct.array[:-5], atol=0.5)  # whole voxels: the values, exactly


@pytest.mark.parametrize(
    ("low", "air"), [(-1024.0, -1024.0), (-3024.0, -1024.0), (-1000.0, -1000.0), (-990.0, -1000.0)]
)
def test_ct_air_is_air_as_the_ct_stores_it(low: float, air: float) -> None:
    assert ct_air(np.array([low, 0.0, 1500.0])) == air


def test_nmi_and_the_shift_test_on_a_phantom() -> None:
    head = phantom(6.0, (30, 34, 28))
    t1, t2 = head["t1"].array, head["t2"].array
    assert normalised_mutual_information(t1, t1) == pytest.approx(2.0, abs=0.01)
    assert misalignment(t1, t2) is None
    shifted = np.roll(t2, 2, axis=1)
    found = misalignment(t1, shifted)
    assert found is not None and found.axis == 1 and found.shift == 2 and found.gain > 0.1


# ------------------------------------------------------------------------------- the whole command
MOTIONS = [
    demo.Misregistration((12.0, 0.0, 0.0), (0.0, 0.0, 1.0), 3.0, (0.0, 0.0, 0.0)),
    demo.Misregistration((0.0, -12.0, 3.0), (1.0, 0.0, 0.0), -3.0, (0.0, 0.0, 0.0)),
    demo.Misregistration((4.0, 4.0, -12.0), (0.8, 0.0, 0.6), 2.0, (0.0, 0.0, 0.0)),
]


#: The images moved against their T1w (one CT keeps the test fast): the copy's QC rows, in order.
MOVED = [("sub-01", "t2"), ("sub-01", "ct"), ("sub-02", "t2"), ("sub-03", "t2")]


def write_cohort(root: Path) -> None:
    """Three BIDS subjects at 6 mm whose T2w (and CT) are off their T1w by 12 mm and 2-3 degrees."""
    for index, motion in enumerate(MOTIONS):
        subject = f"sub-{index + 1:02d}"
        anat = root / subject / "anat"
        anat.mkdir(parents=True)
        for modality, volume in phantom(6.0, (30, 34, 28), seed=index).items():
            if modality != "t1" and (subject, modality) not in MOVED:
                continue
            volume = volume if modality == "t1" else moved(volume, motion, modality)
            array = volume.array.astype(np.int16 if modality == "ct" else np.float32)
            nib.save(nib.Nifti1Image(array, volume.affine), anat / f"{subject}_{SUFFIX[modality]}.nii.gz")
        (anat / f"{subject}_T2w.json").write_text('{"EchoTime": 0.1}\n')
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-0{n}\n" for n in (1, 2, 3)))
    (root / "dataset_description.json").write_text('{"Name": "phantoms", "BIDSVersion": "1.9.0"}\n')


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, str, dict[str, str]]:
    """The cohort, its registered copy, the exit code and output of the command, the input's hashes before."""
    root = tmp_path_factory.mktemp("register")
    write_cohort(root / "moved")
    before = tree_hash(root / "moved")
    import contextlib
    import io

    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        code = main(["data", "register", str(root / "moved"), "--out", str(root / "registered")])
    return root / "moved", root / "registered", code, stream.getvalue(), before


def test_inputs_are_never_written(registered: tuple[Path, Path, int, str, dict[str, str]]) -> None:
    source, _, code, _, before = registered
    assert code == 0
    assert tree_hash(source) == before


def test_copy_has_the_layout_images_transforms_and_qc(
    registered: tuple[Path, Path, int, str, dict[str, str]],
) -> None:
    source, out, _, output, _ = registered
    records = scan_dataset(out)
    assert [(r.id, r.layout) for r in records] == [(f"sub-0{n}", "bids") for n in (1, 2, 3)]
    assert [(r.id, m) for r in records for m in r.modalities if m != "t1"] == MOVED
    for record in records:
        t1 = record.paths["t1"]
        assert t1.read_bytes() == (source / t1.relative_to(out)).read_bytes()  # the reference is copied
        for modality in record.modalities[1:]:
            image = nib.load(record.paths[modality])
            assert np.array_equal(image.affine, nib.load(t1).affine)
            assert transform_path(record.paths[modality], "t1").is_file()
        assert (out / "registration" / f"{record.id}.png").stat().st_size > 10_000
        assert (record.paths["t2"].parent / f"{record.id}_T2w.json").is_file()
    assert (out / "participants.tsv").read_bytes() == (source / "participants.tsv").read_bytes()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][-1]["Name"] == "medsynth data register"
    rows = list(csv.DictReader((out / "registration" / "qc.csv").open()))
    assert nib.load(records[0].paths["ct"]).get_data_dtype() == np.int16
    assert [(r["subject"], r["modality"], r["status"]) for r in rows] == [(*pair, "ok") for pair in MOVED]
    for row, motion in zip(rows, [MOTIONS[int(subject[-1]) - 1] for subject, _ in MOVED], strict=True):
        assert float(row["nmi_after"]) > float(row["nmi_before"])
        assert abs(float(row["rotation_deg"]) - abs(motion.angle_deg)) < 0.5
        assert abs(float(row["translation_mm"]) - motion.shift_mm) < 1.5  # about the head's centre of mass
    assert "[3/3] sub-03: registered to t1" in output and "3 of 3 subjects registered" in output


def test_check_warns_on_the_input_and_not_on_the_copy(
    registered: tuple[Path, Path, int, str, dict[str, str]],
) -> None:
    source, out, _, _, _ = registered
    report = check_dataset(source, modalities=["t1", "t2"])  # the CT of sub-01 is checked too
    flagged = {(p.subject, p.modality) for p in report.problems}
    assert flagged == set(MOVED)
    assert not report.blocking and "medsynth data register" in report.problems[0].message
    assert {f.status for s in report.subjects for f in s.files if f.modality != "t1"} == {"misaligned"}
    assert check_dataset(source, modalities=["t1", "t2"], pairing="unpaired").problems == []
    assert check_dataset(out, modalities=["t1", "t2"]).problems == []


def test_a_rerun_skips_what_is_done(
    registered: tuple[Path, Path, int, str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, _, _, _ = registered
    written = tree_hash(out)
    assert main(["data", "register", str(source), "--out", str(out), "--quiet"]) == 0
    assert "registered before" not in capsys.readouterr().out  # --quiet: the table only
    assert {k: v for k, v in tree_hash(out).items() if not k.endswith("qc.csv")} == {
        k: v for k, v in written.items() if not k.endswith("qc.csv")
    }
    assert main(["data", "register", str(source), "--out", str(out), "--transform", "affine"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_failed_subject_is_one_line_and_the_rest_go_on(
    registered: tuple[Path, Path, int, str, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreadable image (sub-01) and a missing reference (sub-03): one line each, sub-02 is registered."""
    source, _, _, _, _ = registered
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "sub-01/anat/sub-01_T2w.nii.gz").write_bytes(b"\x1f\x8b truncated")
    (broken / "sub-03/anat/sub-03_T1w.nii.gz").unlink()
    code = main(["data", "register", str(broken), "--out", str(tmp_path / "out"), "--modalities", "t1,t2"])
    printed = capsys.readouterr().out
    assert code == 1
    failures = [line for line in printed.splitlines() if "FAILED" in line]
    assert len(failures) == 2
    assert failures[0].startswith("[1/3] sub-01: FAILED: ") and "sub-01_T2w.nii.gz" in failures[0]
    assert failures[1].startswith("[3/3] sub-03: FAILED: ") and "no t1 image, the reference" in failures[1]
    assert "[2/3] sub-02: registered to t1 (t2" in printed and "failed: sub-01, sub-03" in printed
    assert [r.id for r in scan_dataset(tmp_path / "out")] == ["sub-02"]
    rows = list(csv.DictReader((tmp_path / "out" / "registration" / "qc.csv").open()))
    assert [(r["subject"], r["status"]) for r in rows] == [
        ("sub-01", "failed"),
        ("sub-02", "ok"),
        ("sub-03", "failed"),
    ]


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_in_the_input_is_refused(
    registered: tuple[Path, Path, int, str, dict[str, str]], where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = registered[0]
    out = source if where == "same" else source / "derivatives" / "registered"
    assert main(["data", "register", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inside the input folder" in err
    assert not (source / "derivatives").exists() and not (source / "registration").exists()


def test_settings_are_checked() -> None:
    with pytest.raises(MedsynthError, match="rigid, affine, bspline"):
        RegistrationSettings(transform="elastic")
    with pytest.raises(MedsynthError, match="one smoothing per pyramid level"):
        RegistrationSettings(shrink_factors=(4, 2, 1), smoothing_mm=(2.0, 0.0))


def test_the_registered_file_is_what_the_transform_gives(
    registered: tuple[Path, Path, int, str, dict[str, str]],
) -> None:
    """``sitk.Resample(moving, reference, ReadTransform(tfm))`` reproduces the copy (the docs' promise)."""
    import SimpleITK as sitk

    source, out, _, _, _ = registered
    t2 = out / "sub-01/anat/sub-01_T2w.nii.gz"
    again = sitk.Resample(
        sitk.ReadImage(str(source / "sub-01/anat/sub-01_T2w.nii.gz"), sitk.sitkFloat32),
        sitk.ReadImage(str(out / "sub-01/anat/sub-01_T1w.nii.gz")),
        sitk.ReadTransform(str(transform_path(t2, "t1"))),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    expected = sitk.GetArrayFromImage(again).transpose(2, 1, 0)
    np.testing.assert_allclose(read_volume(t2).array, np.clip(expected, 0, None), atol=1e-3)


def test_a_manifest_comes_out_as_a_manifest_with_its_ids(
    registered: tuple[Path, Path, int, str, dict[str, str]], tmp_path: Path
) -> None:
    """Images listed anywhere come out BIDS-like in NIfTI, and manifest.csv keeps the subject's id."""
    source = registered[0]
    lines = ["subject,modality,path"] + [
        f'"pat 7, left",{m},{source / "sub-02/anat" / f"sub-02_{SUFFIX[m]}.nii.gz"}' for m in ("t1", "t2")
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "list.csv").write_text("\n".join(lines) + "\n")
    assert main(["data", "register", str(tmp_path / "in" / "list.csv"), "--out", str(tmp_path / "out")]) == 0
    (record,) = scan_dataset(tmp_path / "out")
    assert (record.id, record.layout, record.modalities) == ("pat 7, left", "manifest", ("t1", "t2"))
    t1 = read_volume(record.paths["t1"])
    assert np.array_equal(t1.array, read_volume(source / "sub-02/anat/sub-02_T1w.nii.gz").array)
    assert transform_path(record.paths["t2"], "t1").is_file()


# ------------------------------------------------------------------------------- template mode
#: Each subject's T1w and T2w moved each its own way (no image sits where the template does).
TEMPLATE_MOTIONS = {
    ("sub-01", "t1"): MOTIONS[0], ("sub-01", "t2"): MOTIONS[1],
    ("sub-02", "t1"): MOTIONS[2], ("sub-02", "t2"): MOTIONS[0],
}  # fmt: skip


def test_template_mode_moves_every_image_on_its_own_onto_the_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 3 mm template and 6 mm images: every image (the T1w too) lands on the template's field of view at
    6 mm, each within half a voxel of where its motion put it (12-13 mm before); QC names the template."""
    import SimpleITK as sitk

    template = phantom(3.0, (60, 68, 56))["t1"]
    nib.save(nib.Nifti1Image(template.array, template.affine), tmp_path / "template.nii.gz")
    unmoved = phantom(6.0, (30, 34, 28))
    for (subject, modality), motion in TEMPLATE_MOTIONS.items():
        anat = tmp_path / "in" / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        volume = moved(unmoved[modality], motion, modality)
        nib.save(nib.Nifti1Image(volume.array, volume.affine), anat / f"{subject}_{SUFFIX[modality]}.nii.gz")
    command = ["data", "register", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert main([*command, "--template", str(tmp_path / "template.nii.gz")]) == 0
    assert "[2/2] sub-02: registered to template (t1" in capsys.readouterr().out

    grid = template_on_grid(template, (6.0, 6.0, 6.0))
    assert grid.shape == (31, 35, 29)  # voxel centres 0 ... 177 mm on each 3 mm axis of 60, every 6 mm
    inside = grid.array > 100
    for record in scan_dataset(tmp_path / "out"):
        for modality in ("t1", "t2"):
            image = nib.load(record.paths[modality])
            np.testing.assert_allclose(image.affine, grid.affine, atol=1e-6)
            assert image.shape == grid.shape
            transform = sitk.ReadTransform(str(transform_path(record.paths[modality], "template")))
            residual = residual_mm(transform, grid, TEMPLATE_MOTIONS[record.id, modality], inside)
            assert residual.mean() < 3.0, (record.id, modality, residual.mean())  # measured: 0.8-1.9
    rows = list(csv.DictReader((tmp_path / "out" / "registration" / "qc.csv").open()))
    assert [(r["subject"], r["modality"], r["reference"]) for r in rows] == [
        (subject, modality, "template") for subject, modality in TEMPLATE_MOTIONS
    ]
    args = json.loads((tmp_path / "out" / "registration" / "args.json").read_text())
    assert args["template"] == str((tmp_path / "template.nii.gz").resolve())
    assert main([*command, "--template", "mni152"]) == 2  # another template: not this copy's
    assert "other settings" in capsys.readouterr().err


def test_template_and_reference_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    (source / "sub-01" / "anat").mkdir(parents=True)
    command = ["data", "register", str(source), "--out", str(tmp_path / "out"), "--template", "mni152"]
    assert main([*command, "--reference", "t1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--reference and --template" in err
    assert main(["data", "register", str(source), "--out", str(tmp_path / "out"), "--template", str(tmp_path / "none.nii.gz")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.nii.gz" in err
    assert not (tmp_path / "out").exists()


def test_mni152_is_nilearns_template_on_a_grid_at_the_images_voxel_size() -> None:
    template = load_template("MNI152")
    assert template.shape == (197, 233, 189) and template.spacing == pytest.approx((1.0, 1.0, 1.0))
    on_grid = template_on_grid(template, (2.0, 2.0, 2.0))
    assert on_grid.shape == (99, 117, 95)  # nilearn's 2 mm grid, and the demo's
    np.testing.assert_allclose(on_grid.affine[:3, 3], template.affine[:3, 3])
    np.testing.assert_allclose(on_grid.affine @ [98, 116, 94, 1], template.affine @ [196, 232, 188, 1])
    assert on_grid.array.max() > 0.5
