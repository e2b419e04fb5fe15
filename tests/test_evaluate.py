"""``medsynth evaluate`` on a tiny trained run: files, stated spaces, baselines and the table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from medsynth.cli import main


def test_evaluate_writes_rows_summary_and_figures(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(tiny_run), "--baselines", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "normalised [-1, 1], data range 2" in printed and "lut" in printed and "identity" in printed
    with open(out / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    splits = json.loads((tiny_run / "splits.json").read_text())
    assert {r["subject"] for r in rows} == set(splits["test"])  # held-out subjects only
    assert {r["method"] for r in rows} == {"model", "identity", "lut"}
    for row in rows:
        assert float(row["psnr_masked"]) > 0 and -1 <= float(row["ssim3d_masked"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and "data range 2" in summary["space"] and "mask" in summary
    assert {g["method"] for g in summary["groups"]} == {"model", "identity", "lut"}
    assert len(list(out.glob("*.png"))) == len(splits["test"])


def test_native_space_states_the_target_range(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "native"
    assert main(["evaluate", "--run", str(tiny_run), "--space", "native", "--out", str(out), "--quiet"]) == 0
    with open(out / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert all(r["space"] == "native t2 intensity" and float(r["data_range"]) > 2 for r in rows)


def test_checkpoint_with_foreign_data_needs_split_all(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other" / "sub-99" / "anat"
    other.mkdir(parents=True)
    for suffix in ("T1w", "T2w"):
        source = tiny_cohort / "sub-01" / "anat" / f"sub-01_{suffix}.nii.gz"
        (other / f"sub-99_{suffix}.nii.gz").write_bytes(source.read_bytes())
    base = ["evaluate", "--checkpoint", str(tiny_run / "checkpoint_best.pt"), "--data", str(tmp_path / "other"),
            "--out", str(tmp_path / "e"), "--quiet"]  # fmt: skip
    assert main(base) == 2
    assert "--split all" in capsys.readouterr().err  # sub-99 is in none of the run's splits
    assert main([*base, "--split", "all"]) == 0
