"""benchmarks/compare_modes.py: run bookkeeping and the markdown tables, on a tiny finished run."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from medsynth.cli import main

_SPEC = importlib.util.spec_from_file_location(
    "benchmarks_compare_modes", Path(__file__).parents[1] / "benchmarks" / "compare_modes.py"
)
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the script imports ``machine``
compare = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = compare
_SPEC.loader.exec_module(compare)


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny T1w -> T2w run as the comparison's ``demo_cpu``, evaluated with baselines."""
    folder = tmp_path_factory.mktemp("compare")
    shutil.copytree(tiny_run, folder / "demo_cpu", ignore=shutil.ignore_patterns("eval"))
    assert main(["evaluate", "--run", str(folder / "demo_cpu"), "--baselines", "--quiet"]) == 0
    return folder


def _score(psnr: float, ssim: float = 0.8, mae: float = 0.1) -> dict[str, tuple[float, float]]:
    return {"psnr": (psnr, 0.5), "ssim": (ssim, 0.01), "mae": (mae, 0.01), "n": (2, 0.0)}


def test_finished_runs_are_skipped(runs: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert compare.run_state(runs / "demo_cpu") == "finished"
    assert compare.run_state(runs / "nothing") == "missing"
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("trained a finished run"))
    args = compare.parse_args(["--data", "unused", "--runs", str(runs), "--only", "demo_cpu"])
    compare.train("demo_cpu", "demo_cpu", args, 1.0, [])
    assert "skipped" in capsys.readouterr().out
    compare.evaluate(runs / "demo_cpu", "cpu")  # eval/metrics.csv is newer than the checkpoint: no call


def test_table_of_a_real_run_names_cost_minutes_and_scores(runs: Path) -> None:
    records = compare.collect(compare.ENTRIES, runs)
    assert [r["entry"].name for r in records] == ["demo_cpu"]  # runs without eval/ are left out
    record = records[0]
    assert record["parameters"] > 0 and record["flops"] > 0 and record["minutes"] > 0
    assert set(record["scores"]) >= {("model", "t2", "t1"), ("lut", "t2", "t1"), ("identity", "t2", "t1")}
    table = compare.build_table(records)
    lines = table.splitlines()
    assert lines[0].startswith("| generator / mode | task | recipe") and len(lines) == 3
    row = lines[2].split(" | ")
    assert row[1] == "T1w → T2w" and row[2] == "`demo_cpu`" and row[3].endswith(" M")
    psnr = record["scores"][("model", "t2", "t1")]["psnr"]
    assert f"{psnr[0]:.2f} ± {psnr[1]:.2f}" in lines[2]
    args = compare.parse_args(["--data", "demo/data", "--minutes", "3", "--threads", "1"])
    text = compare.report(records, args, "machine: test")
    assert "machine: test" in text and "1 thread(s)" in text and table in text


def test_unified_rows_sit_beside_the_dedicated_models_with_the_gap() -> None:
    entries = {e.name: e for e in compare.ENTRIES}
    common = {"parameters": 1e6, "flops": 2e9, "minutes": 8.0, "wall": 9.0}
    records = [
        {**common, "entry": entries["demo_cpu"], "scores": {("model", "t2", "t1"): _score(26.0)}},
        {**common, "entry": entries["demo_many_to_one"], "scores": {("model", "flair", "t1+t2+pd"): _score(24.0)}},
        {**common, "entry": entries["demo_unified"], "scores": {
            ("model", "t2", "t1"): _score(25.7), ("model", "flair", "t1+t2+pd"): _score(24.2),
            ("model", "t1", "t2"): _score(23.0)}},
    ]  # fmt: skip
    table = compare.build_table(records)
    assert "| unified U-Net 2D | T1w → T2w |" in table
    assert "| unified U-Net 2D | T1w + T2w + PDw → FLAIR |" in table
    assert "| T1w → T2w | `demo_cpu` | 26.00 | 25.70 | -0.30 | +0.000 |" in table
    assert "| T1w + T2w + PDw → FLAIR | `demo_many_to_one` | 24.00 | 24.20 | +0.20 | +0.000 |" in table
    directions = compare.directions_table(records[2])
    assert directions.count("\n") == 4 and "T2w → T1w" in directions


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        compare.parse_args(["--data", "d", "--only", "demo_cpu,demo_nope"])
    assert "demo_nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--data", "d", "--minutes", "0"])


def test_the_report_goes_to_the_runs_folder_unless_docs_is_named(tmp_path: Path) -> None:
    """A partial `--only` run must not overwrite the repository's full report by default."""
    runs = tmp_path / "compare"
    assert compare.parse_args(["--data", "d", "--runs", str(runs), "--only", "demo_cpu"]).docs == runs
    assert compare.parse_args(["--data", "d", "--docs", "docs"]).docs == Path("docs")
