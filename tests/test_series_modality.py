"""One rule set for series → modality, shared by ``medsynth convert`` and the ``dicom`` dataset layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsynth.convert.classify import classify_series
from medsynth.convert.discovery import SeriesRecord
from medsynth.data.layouts import scan_dataset, series_modality
from medsynth.io.dicom import list_dicom_series, write_dicom_series
from medsynth.io.series_modality import classify_info, classify_tags
from medsynth.io.volume import Volume

CASES = [
    ({"description": "t1_mprage_sag_p2"}, "t1"),
    ({"description": "AX T1 POST GAD"}, "t1c"),
    ({"description": "T1 +C"}, "t1c"),
    ({"description": "T1W_3D_TFE", "contrast_agent": "Gadovist"}, "t1c"),
    ({"description": "t2_tirm_tra_dark-fluid FLAIR"}, "flair"),
    ({"description": "AX T2F"}, "flair"),
    ({"description": "PD_T2_dual_echo"}, None),
    ({"description": "sag 3d", "repetition_time": 8.0, "echo_time": 3.0}, "t1"),
    ({"description": "T2 localizer"}, None),
    ({"description": "T2w", "image_type": ("DERIVED", "SECONDARY")}, None),
    ({"description": "head", "dicom_modality": "CT"}, "ct"),
]


@pytest.mark.parametrize(("tags", "expected"), CASES)
def test_convert_and_layout_rules_agree(tags, expected):
    decided = classify_tags(**tags)
    assert decided.modality == expected and decided.reason
    record = SeriesRecord(series_uid="1.2.3", **{"dicom_modality": "MR", **tags})
    assert classify_series(record) == decided
    if set(tags) <= {"description", "dicom_modality", "contrast_agent"}:
        assert (
            series_modality(
                tags["description"], tags.get("dicom_modality", "MR"), tags.get("contrast_agent", "")
            )
            == expected
        )


def _series(folder: Path, description: str, number: int, **tags) -> None:
    volume = Volume(np.random.default_rng(number).random((8, 7, 5), dtype=np.float32) * 400, np.eye(4))
    for path in write_dicom_series(volume, folder, series_description=description, series_number=number):
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def test_dicom_layout_uses_the_convert_rules(tmp_path):
    """Physics alone (no keyword) and the protocol name now decide in the layout as they do in convert."""
    for subject in ("a", "b"):
        _series(tmp_path / subject / "s1", "sag 3d", 1, RepetitionTime=8.0, EchoTime=3.0)
        _series(tmp_path / subject / "s2", "series 2", 2, ProtocolName="t2_tse_tra")
        _series(tmp_path / subject / "s3", "AX T2 synthetic", 3)  # derived output of a model: never an input
    records = scan_dataset(tmp_path)
    assert [r.modalities for r in records] == [("t1", "t2"), ("t1", "t2")]
    for info in list_dicom_series(tmp_path / "a", recursive=True):
        assert classify_info(info) == classify_series(SeriesRecord.from_info(info))
