"""Unified synthesis over T1w, T2w, PDw and FLAIR: sampling, train -> infer -> evaluate, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_modes import (
    TINY_RESVIT,
    anat,
    assert_on_input_grid,
    held_out_subject,
    one_line_error,
    read_rows,
    train_run,
)

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.data.datasets import SliceDataset
from medsynth.engine.setup import prepare_run_data
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.layout import InputLayout

MODALITIES = ("t1", "t2", "pd", "flair")
UNIFIED = ["unified", "--modalities", ",".join(MODALITIES)]


@pytest.fixture(scope="module")
def unified_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(
        tmp_path_factory.mktemp("unified"), "unified", UNIFIED, "unified_unet2d", [], tiny_cohort
    )


# ---------------------------------------------------------------------------------- sampling
def test_training_samples_on_the_cohort_cache(unified_run: Path) -> None:
    """The target is never an input; absent inputs are zero-filled exactly where availability says 0."""
    config = load_config(unified_run / "config.yaml")
    data = prepare_run_data(
        config, config.parsed_task(), unified_run, cache_dir=unified_run.parent / ".cache", progress=False
    )
    train = data.splits["train"]
    dataset = SliceDataset(data.cohort, train, [], None, unified_modalities=MODALITIES)
    # The same slices with every modality given: what each unified sample must be cut from.
    every = SliceDataset(data.cohort, train, MODALITIES, None)
    assert len(every) == len(dataset)
    images = every.__getitems__(np.arange(len(every)))["source"].numpy()
    count, rows = len(MODALITIES), np.arange(len(dataset))
    seen_targets, seen_sizes = set(), set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        batch = dataset.__getitems__(rows)
        source, target = batch["source"].numpy(), batch["target"].numpy()
        available, target_index = batch["available"].numpy(), batch["target_index"].numpy()
        assert not available[rows, target_index].any()  # the target is never among the inputs
        assert (available.sum(axis=1) >= 1).all()
        np.testing.assert_array_equal(source[:, :count], images * available[:, :, None, None])
        np.testing.assert_array_equal(target[:, 0], images[rows, target_index])
        for i in rows[:: max(len(rows) // 20, 1)]:
            # The sample equals what synthesis builds from the same images (one layout function).
            given = {
                m: images[i, j][None]
                for j, (m, a) in enumerate(zip(MODALITIES, available[i], strict=True))
                if a
            }
            rebuilt = InputLayout(MODALITIES, unified=True).assemble(given, MODALITIES[target_index[i]])
            np.testing.assert_array_equal(source[i], rebuilt)
        seen_targets |= set(target_index.tolist())
        seen_sizes |= set(available.sum(axis=1).astype(int).tolist())
    assert seen_targets == set(range(count)) and seen_sizes == {1, 2, 3}


# ----------------------------------------------------------------------- train, infer, evaluate
def test_unified_checkpoint_tells_both_networks_the_target(unified_run: Path) -> None:
    state = load_checkpoint(unified_run / "checkpoint_best.pt")
    assert state["plan"]["task"]["modalities"] == list(MODALITIES)
    images_and_codes = len(MODALITIES) + 2 * len(MODALITIES)  # images, availability, target one-hot
    assert state["plan"]["generator"]["init_args"]["in_channels"] == images_and_codes
    assert state["objective"]["critic"]["init_args"]["in_channels"] == images_and_codes + 1


def test_unified_infer_a_target_and_every_missing_one(
    unified_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    subject = held_out_subject(unified_run)
    t1, t2 = anat(tiny_cohort, subject, "T1w"), anat(tiny_cohort, subject, "T2w")
    given = ["--volume", f"t1={t1}", "--volume", f"t2={t2}"]
    common = ["infer", "--checkpoint", str(unified_run), "--quiet", *given]
    flair = tmp_path / "flair.nii.gz"
    assert main([*common, "--target", "flair", "--out", str(flair)]) == 0
    assert_on_input_grid(flair, t1)
    assert main([*common, "--target", "missing", "--out", str(tmp_path / "all")]) == 0
    written = sorted(p.name for p in (tmp_path / "all").glob("*.nii.gz"))
    assert written == [f"{subject}_T1w_flair.nii.gz", f"{subject}_T1w_pd.nii.gz"]
    again = assert_on_input_grid(tmp_path / "all" / f"{subject}_T1w_flair.nii.gz", t1)
    np.testing.assert_array_equal(again, np.asarray(nib.load(flair).dataobj))
    # Other inputs, other result: the availability planes reach the network.
    only_t1 = tmp_path / "flair_from_t1.nii.gz"
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(unified_run),
                "--quiet",
                "--volume",
                f"t1={t1}",
                "--target",
                "flair",
                "--out",
                str(only_t1),
            ]
        )
        == 0
    )
    assert not np.array_equal(np.asarray(nib.load(only_t1).dataobj), again)


def test_unified_evaluate_scores_every_target_from_every_subset(unified_run: Path) -> None:
    assert main(["evaluate", "--run", str(unified_run), "--quiet"]) == 0
    rows = read_rows(unified_run / "eval" / "metrics.csv")
    cases = {(r["target"], r["inputs"]) for r in rows}
    expected = set()
    for target in MODALITIES:
        others = [m for m in MODALITIES if m != target]
        expected |= {(target, "+".join(s)) for n in (1, 2, 3) for s in itertools.combinations(others, n)}
    assert cases == expected and len(rows) == len(expected) == 28
    assert all(np.isfinite(float(r["psnr_masked"])) for r in rows)
    assert len(list((unified_run / "eval").glob("*.png"))) == len(MODALITIES)  # one figure per target


def test_unified_resvit_recipe(tiny_cohort: Path, tmp_path: Path) -> None:
    run = train_run(
        tmp_path,
        "uresvit",
        UNIFIED,
        "unified_resvit2d",
        ["train.epochs=1", "train.decay_epochs=0", "train.steps_per_epoch=2", TINY_RESVIT],
        tiny_cohort,
    )
    subject = held_out_subject(run)
    pd = anat(tiny_cohort, subject, "PDw")
    out = tmp_path / "t2.nii.gz"
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(run),
                "--volume",
                f"pd={pd}",
                "--target",
                "t2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert_on_input_grid(out, pd)


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--volume", "t1={t1}", "--target", "ct"], "outside this unified model's set"),
        (["--volume", "t1={t1}", "--target", "t1"], "the target must be a modality you do not have"),
        (["--volume", "{t1}", "--target", "t2"], "named inputs"),
        (["--volume", "t1={t1}"], "needs --target"),
    ],
)
def test_unified_bad_requests_are_one_line(
    arguments: list[str],
    message: str,
    unified_run: Path,
    tiny_cohort: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    t1 = anat(tiny_cohort, held_out_subject(unified_run), "T1w")
    filled = [a.format(t1=t1) for a in arguments]
    code = main(["infer", "--checkpoint", str(unified_run), "--out", str(tmp_path / "x.nii.gz"), *filled])
    one_line_error(capsys, code, message)
    assert not list(tmp_path.iterdir())
