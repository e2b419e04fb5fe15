"""model_card.md / model_card.json: written at the end of training, refreshed by evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medsynth.evaluate import evaluate
from medsynth.model.checkpoint import file_digest
from medsynth.model.synthesis import SynthesisModel
from medsynth.model_card import CARD_JSON, CARD_MD, _best


def test_training_writes_the_card(tiny_run: Path) -> None:
    card = json.loads((tiny_run / CARD_JSON).read_text())
    assert card["task"] == "t1->t2"
    assert card["checkpoint"]["sha256"] == file_digest(tiny_run / "checkpoint_best.pt")
    assert card["data"]["splits"] == {"train": 3, "val": 1, "test": 1}
    assert card["data"]["modalities"]["t1"]["spacing_mm_min"] == [6.0, 6.0, 6.0]
    assert card["training"]["epochs"] == 2 and card["training"]["seconds"] > 0
    assert card["evaluation"] is None and card["medsynth_version"]
    text = (tiny_run / CARD_MD).read_text()
    for heading in ("## Intended use", "## Known limits", "## Training data", "## Held-out evaluation"):
        assert heading in text
    assert card["checkpoint"]["sha256"] in text and "Not evaluated yet" in text


def test_evaluate_refreshes_the_card_with_the_table(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tensorboard", "samples", "eval"))
    model = SynthesisModel.from_checkpoint(run)
    evaluate(model, tiny_cohort, run / "eval", baselines=True, progress=False)
    card = json.loads((run / CARD_JSON).read_text())
    methods = {group["method"] for group in card["evaluation"]["groups"]}
    assert methods == {"model", "identity", "lut"}
    text = (run / CARD_MD).read_text()
    assert "| model | t1 -> t2 | 1 |" in text and "| lut | t1 -> t2 | 1 |" in text


def test_the_card_says_how_the_best_score_was_measured() -> None:
    """Unpaired runs score held-out targets registered onto their sources, or the round trip: the card says
    which; a plain comparison with aligned targets needs no note."""
    best = {"metric": "psnr", "value": 18.4, "epoch": 29}
    assert _best({**best, "validation": "target"}) == "best validation psnr 18.400 at epoch 29"
    assert "registered rigidly onto its source" in _best({**best, "validation": "registered target"})
    assert "neither compares with a real target" in _best({**best, "validation": "round trip"})
