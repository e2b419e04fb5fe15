"""The normalisation fingerprint: training subjects only, medians, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsynth.config import load_config
from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
from medsynth.data.splits import make_splits
from medsynth.errors import ConfigError, DataError, MedsynthError
from medsynth.io.volume import Volume

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _subject(scale: float, seed: int) -> dict[str, Volume]:
    rng = np.random.default_rng(seed)
    shape = (16, 16, 12)
    head = np.zeros(shape, bool)
    head[3:13, 3:13, 2:10] = True
    t1 = rng.normal(1.0, 0.5, shape)
    t1[head] = rng.uniform(200.0, 800.0, head.sum()) * scale
    ct = np.full(shape, -1000.0)
    ct[head] = rng.uniform(0.0, 80.0, head.sum())
    return {"t1": Volume(t1, AFFINE), "ct": Volume(ct, AFFINE)}


SPECS = {"t1": NormalizationSpec(), "ct": NormalizationSpec.for_modality("ct")}


@pytest.fixture
def cohort() -> dict[str, dict[str, Volume]]:
    subjects = {f"sub-{i:02d}": _subject(1.0 + 0.1 * i, i) for i in range(8)}
    return subjects


def test_fingerprint_uses_training_subjects_only(cohort) -> None:
    splits = make_splits(cohort, val=2, test=2, seed=0)
    train = [(sid, cohort[sid]) for sid in splits["train"]]
    reference = Fingerprint.compute(train, SPECS)
    huge = splits["val"][0]
    cohort[huge] = _subject(1000.0, 99)  # a validation subject with absurd intensities
    again = Fingerprint.compute(((sid, cohort[sid]) for sid in splits["train"]), SPECS)
    assert again.cohort == reference.cohort and again.digest() == reference.digest()
    assert set(again.subjects) == set(splits["train"])
    uppers = [again.subjects[sid]["t1"]["normalizer"]["upper"] for sid in splits["train"]]
    assert again.cohort["t1"]["upper"] == pytest.approx(np.median(uppers))
    entry = again.subjects[splits["train"][0]]["t1"]
    assert entry["spacing"] == [2.0, 2.0, 3.0] and entry["shape"] == [16, 16, 12]


def test_median_resists_one_odd_training_subject(cohort) -> None:
    base = Fingerprint.compute(cohort.items(), SPECS)
    odd = dict(cohort, odd=_subject(1000.0, 42))
    moved = Fingerprint.compute(odd.items(), SPECS)
    assert moved.cohort["t1"]["upper"] < 1.2 * base.cohort["t1"]["upper"]


def test_input_and_output_normalizers(cohort) -> None:
    fingerprint = Fingerprint.compute(cohort.items(), SPECS)
    volume = cohort["sub-03"]["t1"].array * 3.0  # a brighter scanner: per-volume fitting absorbs it
    normalised = fingerprint.input_normalizer("t1", volume).forward(volume)
    assert normalised.min() >= -1.0 and normalised.max() == pytest.approx(1.0)
    output = fingerprint.output_normalizer("t1")
    assert output.inverse(np.array([1.0]))[0] == pytest.approx(fingerprint.cohort["t1"]["upper"], rel=1e-6)
    ct = fingerprint.output_normalizer("ct")
    np.testing.assert_allclose(ct.inverse(np.array([-1.0, 1.0])), [-1024.0, 3071.0])
    with pytest.raises(MedsynthError, match="no statistics for 'pd'"):
        fingerprint.output_normalizer("pd")


def test_save_load_round_trip_and_digest(tmp_path, cohort) -> None:
    fingerprint = Fingerprint.compute(cohort.items(), SPECS)
    path = fingerprint.save(tmp_path / "fingerprint.json")
    loaded = Fingerprint.load(path)
    assert loaded.to_dict() == fingerprint.to_dict()
    assert loaded.digest() == fingerprint.digest()
    zscore = Fingerprint.compute(cohort.items(), {**SPECS, "t1": NormalizationSpec("zscore")})
    assert zscore.digest() != fingerprint.digest()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_bad_files_and_specs(tmp_path, cohort) -> None:
    with pytest.raises(DataError, match="not found"):
        Fingerprint.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a valid medsynth fingerprint") as info:
        Fingerprint.load(tmp_path / "bad.json")
    assert "bad.json" in str(info.value)
    with pytest.raises(ConfigError, match="valid schemes"):
        NormalizationSpec("minmax")
    with pytest.raises(DataError, match="has no pd image"):
        Fingerprint.compute(cohort.items(), {"pd": NormalizationSpec()})
    with pytest.raises(DataError, match="no training subjects"):
        Fingerprint.compute([], SPECS)


def test_histogram_spec_fits_the_standard_on_training_subjects(cohort) -> None:
    """Two passes (standard, then each subject onto it): a one-shot generator is refused, a function is
    not; the screen's appearance statistics stay the percentile scheme's."""
    specs = {"t1": NormalizationSpec(scheme="histogram"), "ct": SPECS["ct"]}
    train = sorted(cohort)[:6]
    with pytest.raises(TypeError, match="subjects twice"):
        Fingerprint.compute(((sid, cohort[sid]) for sid in train), specs)
    fingerprint = Fingerprint.compute(lambda: ((sid, cohort[sid]) for sid in train), specs)
    standard = fingerprint.cohort["t1"]["standard"]
    assert len(standard) == 11 and standard[0] == -1.0 and standard[-1] == 1.0
    assert (
        Fingerprint.from_dict(json.loads(json.dumps(fingerprint.to_dict()))).digest() == fingerprint.digest()
    )
    cohort[sorted(cohort)[-1]] = _subject(1000.0, 99)  # not a training subject: the standard ignores it
    again = Fingerprint.compute([(sid, cohort[sid]) for sid in train], specs)
    assert again.cohort["t1"]["standard"] == standard
    warped = np.abs(cohort["sub-01"]["t1"].array) ** 1.5  # another contrast of a training subject
    normalizer = fingerprint.input_normalizer("t1", warped)
    np.testing.assert_allclose(normalizer.forward(normalizer.landmarks), standard, atol=1e-6)
    plain = Fingerprint.compute(cohort.items(), {"t1": NormalizationSpec()})
    histogram = Fingerprint.compute(cohort.items(), {"t1": NormalizationSpec(scheme="histogram")})
    screened, percentile = (f.subjects["sub-01"]["t1"]["appearance"] for f in (histogram, plain))
    # The screen's view is the percentile scheme's; the depth histogram is what the network saw.
    assert screened.pop("depth_histogram") != percentile.pop("depth_histogram") and screened == percentile
    assert histogram.output_normalizer("t1").inverse(np.array([1.0]))[0] == pytest.approx(
        np.median([e["t1"]["normalizer"]["landmarks"][-1] for e in histogram.subjects.values()]), rel=1e-6
    )


def test_demo_robust_is_demo_cpu_with_a_standardised_t1() -> None:
    robust, plain = load_config("demo_robust").to_dict(), load_config("demo_cpu").to_dict()
    assert robust["data"].pop("normalization") == {"t1": {"scheme": "histogram"}}
    assert plain["data"].pop("normalization") == {} and robust == plain


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{t1: {scheme: histogram, lower_percentile: 50}}", "data.normalization.t1: the histogram scheme's inner landmarks are the deciles"),
        ("{t1: {scheme: minmax}}", "data.normalization.t1: unknown normalisation scheme 'minmax'"),
        ("{t1: {schem: histogram}}", "data.normalization.t1: unknown key"),
        ("{t1: histogram}", "data.normalization.t1 must be a mapping"),
        ("{t1: {scheme: histogram, lower_percentile: low}}", "data.normalization.t1: lower_percentile must be a number"),
        ("{ct: {scheme: window, window: [0]}}", "data.normalization.ct: window must be two numbers"),
    ],
)  # fmt: skip
def test_bad_normalisation_is_one_line_when_the_recipe_loads(value: str, message: str) -> None:
    """Refused with the recipe, before a run folder exists."""
    with pytest.raises(ConfigError) as error:
        load_config("demo_cpu", [f"data.normalization={value}"])
    assert message in str(error.value) and "\n" not in str(error.value)
