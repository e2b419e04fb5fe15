"""``medsynth info``: fast (no torch import), one screen, ``--json`` with the documented fields, and the
precision each card would get, driven by injected NVML answers (a T4, a V100, an A100, an H100, a P100)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medsynth import info
from medsynth.cli import main
from medsynth.model.device import CpuMatrixUnits


def _card(name: str, major: int, minor: int, total_gib: float = 16, free_gib: float = 15) -> dict:
    return {
        "name": name,
        "uuid": f"GPU-{name.replace(' ', '')}-0000",
        "total": int(total_gib * 2**30),
        "free": int(free_gib * 2**30),
        "compute_capability": (major, minor),
    }


CARDS = [
    _card("Tesla T4", 7, 5),
    _card("Tesla V100-SXM2-32GB", 7, 0, 32, 2),  # another job holds 30 GiB
    _card("NVIDIA A100-SXM4-80GB", 8, 0, 80, 79),
    _card("NVIDIA H100 80GB HBM3", 9, 0, 80, 79),
    _card("Tesla P100-PCIE-16GB", 6, 0),
]


@pytest.fixture
def cards(monkeypatch):
    monkeypatch.setattr(info, "nvml_devices", lambda: (CARDS, "560.35.03", None))
    monkeypatch.setattr(info, "_torch_build", lambda: {"version": "2.13.0+cu128", "cuda": "12.8"})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_info_is_one_screen_without_importing_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from medsynth.cli import main; code = main(['info', '--runs-dir', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'monai', 'SimpleITK', 'pydicom', 'nibabel', 'numpy') if m in sys.modules]; "
        "print('heavy:', heavy); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[-1] == "heavy: []", done.stdout
    assert len(lines) <= 30 and lines[0].startswith("medsynth ")
    text = done.stdout
    for expected in ("torch", "MONAI", "nibabel", "SimpleITK", "pydicom", "CPU", "bf16 unit", "runs folder"):
        assert expected in text
    assert "medsynth info --json" in text


def test_info_json_holds_the_documented_fields(tmp_path: Path, capsys) -> None:
    assert main(["info", "--json", "--runs-dir", str(tmp_path / "runs")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "medsynth",
        "python",
        "platform",
        "packages",
        "torch_build",
        "cpu",
        "cuda",
        "runs_dir",
    }
    assert set(report["packages"]) == {"torch", "MONAI", "nibabel", "SimpleITK", "pydicom", "numpy"}
    assert report["packages"]["torch"] and report["torch_build"]["version"] == report["packages"]["torch"]
    cpu = report["cpu"]
    assert {"model", "cores", "usable_cores", "cpu_quota", "vector", "memory", "bf16", "choice"} <= set(cpu)
    assert set(cpu["bf16"]) == {"amx_bf16", "avx512_bf16", "onednn_bf16", "bf16_unit"}
    assert set(cpu["choice"]) == {"precision", "memory_format", "reason"}
    assert set(report["cuda"]) == {"driver", "devices", "note"}
    runs = report["runs_dir"]
    assert runs["path"] == str(tmp_path / "runs") and runs["exists"] is False and runs["free_bytes"] > 0


def test_each_card_gets_the_precision_of_its_capability(cards, tmp_path: Path) -> None:
    report = info.collect(tmp_path)
    devices = report["cuda"]["devices"]
    assert [d["precision"] for d in devices] == ["fp16", "fp16", "bf16", "bf16", "fp32"]
    assert [d["compute_capability"] for d in devices] == ["7.5", "7.0", "8.0", "9.0", "6.0"]
    assert "fp16 autocast with a gradient scaler" in devices[0]["reason"]
    assert "no tensor cores" in devices[4]["reason"]
    assert devices[1]["memory_free_bytes"] == 2 * 2**30  # a card another process fills
    assert report["cuda"]["note"] is None and report["cuda"]["driver"] == "560.35.03"
    text = info.render(report)
    assert "cuda:0  Tesla T4, compute capability 7.5, 16.0 GiB (15.0 GiB free)" in text
    assert "cuda:1  Tesla V100-SXM2-32GB, compute capability 7.0, 32.0 GiB (2.0 GiB free)" in text
    assert "medsynth on cuda:2 (precision auto): bf16, channels_last" in text


def test_cuda_visible_devices_picks_and_orders_the_cards(cards, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-TeslaT4")
    names = [d["name"] for d in info.collect(tmp_path)["cuda"]["devices"]]
    assert names == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    report = info.collect(tmp_path)
    assert report["cuda"]["devices"] == [] and "hides every card" in report["cuda"]["note"]


def test_a_cpu_build_of_torch_on_a_machine_with_a_card_says_so(cards, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(info, "_torch_build", lambda: {"version": "2.13.0+cpu", "cuda": None})
    note = info.collect(tmp_path)["cuda"]["note"]
    assert "built without CUDA" in note and "install a CUDA build of torch" in note


def test_no_driver_is_no_device(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        info, "nvml_devices", lambda: ([], None, "no NVIDIA driver (libnvidia-ml.so.1 not found)")
    )
    report = info.collect(tmp_path)
    assert report["cuda"]["devices"] == []
    assert "CUDA  no device" in info.render(report)


@pytest.mark.parametrize(
    "units, precision, said",
    [
        (CpuMatrixUnits(), "fp32", "nothing is measured"),
        (CpuMatrixUnits(onednn_bf16=True), "fp32", "bf16 would be emulated"),
        (
            CpuMatrixUnits(amx_bf16=True, avx512_bf16=True, onednn_bf16=True),
            "measured",
            "AMX: when training starts",
        ),
    ],
)
def test_the_cpu_choice_is_said_without_measuring(
    monkeypatch, tmp_path: Path, units, precision, said
) -> None:
    monkeypatch.setattr(info, "cpu_matrix_units_from_flags", lambda: units)
    choice = info.collect(tmp_path)["cpu"]["choice"]
    assert choice["precision"] == precision and said in choice["reason"]


def test_the_torch_build_is_read_without_importing_torch() -> None:
    build = info._torch_build()
    import torch  # the tests have it loaded anyway: compare with torch's own answer

    assert build["version"] == torch.__version__ and build["cuda"] == torch.version.cuda
