"""Issue 25: ``medsynth export --format monai-bundle`` and ``monai.bundle run`` on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsynth.cli import main
from medsynth.io.readers import read_volume
from medsynth.model.bundle import EXPORT_FILE, METADATA, MODEL_FILE, README, REQUIRED_FIELDS, TENSOR_FIELDS


def _held_out_t1(run: Path, cohort: Path) -> Path:
    subject = json.loads((run / "splits.json").read_text())["test"][0]
    return cohort / subject / "anat" / f"{subject}_T1w.nii.gz"


@pytest.fixture(scope="module")
def bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "t1_to_t2_bundle"
    assert main(["export", "--checkpoint", str(tiny_run), "--format", "monai-bundle", "--out", str(out)]) == 0
    return out


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_the_bundle_has_monai_layout_and_metadata(bundle: Path, tiny_run: Path) -> None:
    for name in (METADATA, "configs/inference.json", MODEL_FILE, EXPORT_FILE, README):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / METADATA).read_text())
    assert not [field for field in REQUIRED_FIELDS if field not in meta]
    assert meta["changelog"] and meta["schema"].startswith("https://")
    for kind, key in (("inputs", "image"), ("outputs", "pred")):
        entry = meta["network_data_format"][kind][key]
        assert not [field for field in TENSOR_FIELDS if field not in entry], (kind, entry)
    block = meta["medsynth"]
    assert block["task"] == "t1->t2" and block["sources"] == ["t1"] and block["target"] == "t2"
    assert set(block["training_data"]) >= {"t1", "t2"}
    assert all(len(item["spacing_mm_min"]) == 3 for item in block["training_data"].values())
    assert "t2" in block["intensity"]
    card = tiny_run / "model_card.md"
    if card.is_file():
        assert (bundle / README).read_text() == card.read_text()


def test_monai_bundle_run_reproduces_infer(
    bundle: Path, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    from monai.bundle import run

    source = _held_out_t1(tiny_run, tiny_cohort)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(source, data / "case01.nii.gz")
    with pytest.warns(UserWarning):  # MONAI's own note that a config file is code
        run(
            config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / METADATA),
            logging_file=False, precision="fp32", bundle_root=str(bundle), dataset_dir=str(data),
            output_dir=str(tmp_path / "out"),
        )  # fmt: skip
    reference = tmp_path / "ref.nii.gz"
    argv = ["infer", "--volume", str(source), "--checkpoint", str(tiny_run), "--out", str(reference)]
    assert main([*argv, "--quiet", "--precision", "fp32"]) == 0
    got, want = read_volume(tmp_path / "out" / "case01_t2.nii.gz"), read_volume(reference)
    np.testing.assert_allclose(got.array, want.array, atol=1e-4 * max(1.0, float(np.abs(want.array).max())))
    np.testing.assert_array_equal(got.affine, want.affine)
    # medsynth infer reads the bundle folder too
    again = tmp_path / "again.nii.gz"
    argv = ["infer", "--volume", str(source), "--checkpoint", str(bundle), "--out", str(again)]
    assert main([*argv, "--quiet", "--precision", "fp32"]) == 0
    np.testing.assert_allclose(
        read_volume(again).array, want.array, atol=1e-4 * max(1.0, float(np.abs(want.array).max()))
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: meta["medsynth"].update(task="t1->flair"), "metadata was edited"),
        (lambda meta: meta["medsynth"].update(window=[8, 8]), "metadata was edited"),
        (lambda meta: meta.pop("monai_version"), "required field"),
        (lambda meta: meta["medsynth"]["files"].update({MODEL_FILE: "0" * 64}), "SHA-256"),
    ],
)
def test_a_bundle_with_edited_metadata_is_one_line(
    bundle: Path, tiny_run: Path, tiny_cohort: Path, tmp_path: Path, edit, message: str, capsys
) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    meta = json.loads((copy / METADATA).read_text())
    edit(meta)
    (copy / METADATA).write_text(json.dumps(meta))
    out = tmp_path / "syn.nii.gz"
    argv = ["infer", "--volume", str(_held_out_t1(tiny_run, tiny_cohort)), "--checkpoint", str(copy)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    assert message in _one_error(capsys)
    assert not out.exists()


def test_export_does_not_replace_a_foreign_folder(tiny_run: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    code = main(["export", "--checkpoint", str(tiny_run), "--format", "monai-bundle", "--out", str(folder)])
    assert code == 2 and "not a medsynth bundle" in _one_error(capsys)
    assert (folder / "notes.txt").read_text() == "keep"


def test_python_m_monai_bundle_run_executes_the_bundle(
    bundle: Path, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """The command a MONAI user types, in a fresh interpreter (medsynth importable, nothing else set)."""
    pytest.importorskip("fire")  # MONAI's command line needs it (pip install fire)
    import os
    import subprocess
    import sys

    source = _held_out_t1(tiny_run, tiny_cohort)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(source, data / "case01.nii.gz")
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / "inference.json"), "--meta_file", str(bundle / METADATA),
        "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"),
        "--precision", "fp32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "ref.nii.gz"
    argv = ["infer", "--volume", str(source), "--checkpoint", str(tiny_run), "--out", str(reference)]
    assert main([*argv, "--quiet", "--precision", "fp32"]) == 0
    got, want = read_volume(tmp_path / "out" / "case01_t2.nii.gz"), read_volume(reference)
    np.testing.assert_allclose(got.array, want.array, atol=1e-4 * max(1.0, float(np.abs(want.array).max())))


def test_held_out_metrics_of_the_model_card_reach_the_metadata(tiny_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    card_path = run / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    groups = [{"method": "medsynth", "target": "t2", "psnr_masked_mean": 27.5, "n": 1}]
    card["evaluation"] = {"split": "test", "space": "normalised", "mask": "foreground", "groups": groups}
    card_path.write_text(json.dumps(card))
    (run / "model_card.md").write_text("# Model card: run\n\nheld-out PSNR 27.5\n")
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(run), "--format", "monai-bundle", "--out", str(out)]) == 0
    meta = json.loads((out / METADATA).read_text())
    assert meta["eval_metrics"]["groups"] == groups and meta["eval_metrics"]["split"] == "test"
    assert meta["medsynth"]["held_out_evaluation"]["groups"] == groups
    assert (out / README).read_text() == "# Model card: run\n\nheld-out PSNR 27.5\n"
    # exporting again replaces the earlier bundle whole
    assert main(["export", "--checkpoint", str(run), "--format", "monai-bundle", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "run"]
