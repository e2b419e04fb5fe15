"""Demo input protocols: another site's T1w (SPGR, MPRAGE, 1.5 T) against the default cohort's targets."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from medsynth.cli import main
from medsynth.data import demo
from medsynth.errors import ConfigError

SPACING = 8.0  # 25 x 30 x 24 voxels
OTHER_PROTOCOLS = [name for name in demo.PROTOCOLS if name != demo.DEFAULT_PROTOCOL]

#: sha256 of subject 0's float32 arrays at 8 mm, seed 0, computed with the code before protocols existed
#: (commit e85cc25): the default protocol must not change a voxel of today's cohort (make demo, figures).
DEFAULT_SHA256 = {
    "t1": "93f325aef9223e34260feaaa6c37306fafe5775e33edf6444f6288a5eb13b765",
    "t2": "c67cd5de4e0cf99feee1db264742f5d4afe41314fec4c3514c8d3e2c13a8e187",
    "pd": "7a82fac67191221cd101a3a005ce1446875152082842d7cde707b011d34ac324",
    "flair": "cfac4329a207403de64664cbef197014c39235f01ff23a8d85f9a32d6053d360",
    "ct": "506ba3a4ac6a8d650cf93f447283863c3610eee1434571312d06bbc30a074153",
}


@pytest.fixture(scope="module")
def subjects() -> dict[str, dict[str, np.ndarray]]:
    """Subject 0 (seed 0, 8 mm) under every protocol."""
    return {
        name: {m: v.array for m, v in demo.simulate_subject(0, SPACING, seed=0, protocol=name)[0].items()}
        for name in demo.PROTOCOLS
    }


def test_default_protocol_is_todays_cohort(subjects: dict[str, dict[str, np.ndarray]]) -> None:
    default = subjects[demo.DEFAULT_PROTOCOL]
    assert {m: hashlib.sha256(a.tobytes()).hexdigest() for m, a in default.items()} == DEFAULT_SHA256


@pytest.mark.parametrize("name", OTHER_PROTOCOLS)
def test_protocol_changes_the_t1w_only(name: str, subjects: dict[str, dict[str, np.ndarray]]) -> None:
    default, other = subjects[demo.DEFAULT_PROTOCOL], subjects[name]
    for modality in ("t2", "pd", "flair", "ct"):
        np.testing.assert_array_equal(other[modality], default[modality], err_msg=modality)
    t1 = other["t1"]
    assert t1.dtype == np.float32 and t1.shape == default["t1"].shape
    assert np.isfinite(t1).all() and t1.min() >= 0.0
    # Not a rescaled copy: the shape of the intensity distribution differs, not only its scale.
    head = default["t2"] > np.percentile(default["t2"], 60)
    ratio = t1[head] / np.median(t1[head]) - default["t1"][head] / np.median(default["t1"][head])
    assert np.abs(ratio).mean() > 0.05


def test_protocols_differ_from_each_other(subjects: dict[str, dict[str, np.ndarray]]) -> None:
    t1 = [subjects[name]["t1"] for name in demo.PROTOCOLS]
    for i in range(len(t1)):
        for j in range(i + 1, len(t1)):
            assert not np.allclose(t1[i] / t1[i].mean(), t1[j] / t1[j].mean(), atol=0.05)


def test_spgr_signal_equation() -> None:
    """Ernst angle maximises the SPGR signal; at 90 deg and TR >> T1 it is PD e^(-TE/T2)."""
    t1, t2, pd = np.array([800.0]), np.array([80.0]), np.array([0.7])
    ernst = math.degrees(math.acos(math.exp(-20.0 / 800.0)))
    signals = [
        demo.GradientEcho("t1", "T1w", "x", tr_ms=20.0, te_ms=4.0, flip_deg=a).signal(t1, t2, pd)[0]
        for a in (ernst - 2.0, ernst, ernst + 2.0)
    ]
    assert signals[1] > signals[0] and signals[1] > signals[2]
    slow = demo.GradientEcho("t1", "T1w", "x", tr_ms=1e6, te_ms=4.0, flip_deg=90.0).signal(t1, t2, pd)
    np.testing.assert_allclose(slow, pd * np.exp(-4.0 / 80.0), rtol=1e-9)


def test_mprage_reduces_to_inversion_recovery() -> None:
    """A vanishing readout train (tiny flip, two readouts 1 us apart) leaves inversion recovery x sin(a):
    ``Mz(TI) = PD - (PD + A) e^(-TI/T1)`` with the steady state before each inversion
    ``A = PD (1 - e^(-TR/T1)) / (1 + e^(-TR/T1))`` (nothing saturates Mz between inversions)."""
    t1 = np.array([300.0, 832.0, 1331.0, 4163.0])
    t2, pd = np.full(4, 80.0), np.full(4, 0.8)
    flip = 0.01
    sequence = demo.MPRAGE("t1", "T1w", "x", tr_ms=2300.0, ti_ms=900.0, te_ms=3.0, flip_deg=flip,
                           echo_spacing_ms=1e-3, train_length=2)  # fmt: skip
    before = pd * (1.0 - np.exp(-2300.0 / t1)) / (1.0 + np.exp(-2300.0 / t1))
    longitudinal = pd - (pd + before) * np.exp(-900.0 / t1)
    expected = longitudinal * np.exp(-3.0 / t2) * math.sin(math.radians(flip))
    np.testing.assert_allclose(sequence.signal(t1, t2, pd), expected, rtol=1e-4)
    with pytest.raises(Exception, match="does not fit"):
        demo.MPRAGE("t1", "T1w", "x", tr_ms=2300.0, ti_ms=500.0, te_ms=3.0, flip_deg=9.0,
                    echo_spacing_ms=7.1, train_length=176)  # fmt: skip


def test_mprage_contrast_is_t1_weighted() -> None:
    """WM brighter than GM brighter than CSF, as on any MPRAGE; fat brightest."""
    sequence = demo.PROTOCOLS["mprage"].sequence
    t1 = np.array([t.t1_ms for t in demo.TISSUES])
    t2 = np.array([t.t2_ms for t in demo.TISSUES])
    pd = np.array([t.pd for t in demo.TISSUES])
    s = dict(zip([t.name for t in demo.TISSUES], np.abs(sequence.signal(t1, t2, pd)), strict=True))
    assert s["fat"] > s["wm"] > s["gm"] > s["csf"]


def test_15t_shortens_t1() -> None:
    protocol = demo.PROTOCOLS["1.5t"]
    t1 = np.array([t.t1_ms for t in demo.TISSUES])
    t2 = np.array([t.t2_ms for t in demo.TISSUES])
    pd = np.array([t.pd for t in demo.TISSUES])
    t1_15, _, pd_15 = protocol.relaxation((t1, t2, pd))
    assert np.all(t1_15 <= t1) and np.array_equal(pd_15, pd)
    assert t1_15[demo.TISSUE_INDEX["wm"]] == pytest.approx(832.0 * 884.0 / 1084.0)
    assert protocol.sequence.sidecar()["MagneticFieldStrength"] == 1.5


def test_cohort_records_the_protocol(tmp_path: Path) -> None:
    """CLI: participants.tsv and dataset_description.json name the protocol; the T1w sidecar is its own;
    the default cohort's files carry no protocol (byte-identical to before)."""
    argv = ["data", "demo", "--subjects", "2", "--spacing", "8", "--seed", "4"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--protocol", "mprage"]) == 0
    default, other = tmp_path / "a", tmp_path / "b"
    rows = [line.split("\t") for line in (other / "participants.tsv").read_text().splitlines()]
    assert rows[0][-1] == "t1w_protocol" and [r[-1] for r in rows[1:]] == ["mprage", "mprage"]
    info = json.loads((other / "dataset_description.json").read_text())["MedsynthDemo"]["protocol"]
    assert info["name"] == "mprage" and info["sequence"]["PulseSequenceType"] == "MPRAGE"
    assert "t1w_protocol" not in (default / "participants.tsv").read_text()
    assert "protocol" not in json.loads((default / "dataset_description.json").read_text())["MedsynthDemo"]
    sidecar = json.loads((other / "sub-01" / "anat" / "sub-01_T1w.json").read_text())
    assert sidecar["InversionTime"] == 0.9 and sidecar["FlipAngle"] == 9.0
    for suffix in ("T2w", "PDw", "FLAIR", "CT"):
        stems = [c / "sub-02" / "anat" / f"sub-02_{suffix}" for c in (default, other)]
        # gzip headers carry a time stamp: compare the NIfTI bytes inside
        images = [gzip.decompress(Path(f"{stem}.nii.gz").read_bytes()) for stem in stems]
        sidecars = [Path(f"{stem}.json").read_text() for stem in stems]
        assert images[0] == images[1] and sidecars[0] == sidecars[1], suffix


def test_unknown_protocol_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x"
    assert main(["data", "demo", "--out", str(out), "--spacing", "8", "--protocol", "flash"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(name in err for name in demo.PROTOCOLS)
    assert not out.exists()
    with pytest.raises(ConfigError, match="unknown demo protocol"):
        demo.simulate_subject(0, SPACING, protocol="3t")


def test_cli_help_names_every_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["data", "demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in demo.PROTOCOLS)
