"""Recipe loading: strict keys, typed values, overrides, every shipped recipe valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsynth.config import CONFIG_DIR, Config, load_config
from medsynth.errors import ConfigError


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe: str) -> None:
    config = load_config(recipe)
    assert isinstance(config, Config)
    config.parsed_task()


def test_overrides_and_values_apply_in_order() -> None:
    config = load_config(
        "demo_cpu", ["train.epochs=3", "data.val=2", "train.lr_generator=1e-3"], {"train.epochs": 4}
    )
    assert config.train.epochs == 4  # explicit flags win over --set
    assert config.data.val == 2 and isinstance(config.data.val, int)  # a count stays a count
    assert config.train.lr_generator == pytest.approx(1e-3)


def test_unknown_key_names_key_and_valid_keys(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch .*valid keys here: .*epochs"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=eight", "train.batch_size must be int"),
        ("train.batch_size=0", "batch_size must be >= 1"),
        ("data.context=2", "odd number"),
        ("model.spatial_dims=4", "spatial_dims must be 2 or 3"),
        ("train.best_metric=loss", "best_metric"),
        ("train.amp=yes please", "train.amp must be bool"),
        ("epochs", "section.key=value"),
    ],
)
def test_bad_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo_cpu", [override])


def test_missing_recipe_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="demo_cpu"):
        load_config("no_such_recipe")


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    config = load_config("t1_to_t2_unet2d", ["train.epochs=7"])
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").to_dict() == config.to_dict()


def test_every_registered_objective_has_a_class_and_unknown_names_are_refused() -> None:
    """``train.objective`` is checked against the registry at load time; every name must import."""
    from medsynth.engine.objectives import OBJECTIVES, objective_class

    for name in OBJECTIVES:
        cls = objective_class(name)
        assert cls.loss_names and cls.inputs[0] == "source"
    with pytest.raises(ConfigError, match="train.objective must be one of gan, l1, cyclegan"):
        load_config("t1_to_t2_unet2d", ["train.objective=wgan"])


def test_unpaired_data_needs_an_objective_that_learns_without_pairs() -> None:
    with pytest.raises(ConfigError, match="data.pairing=unpaired needs an objective .*cyclegan"):
        load_config("t1_to_t2_unet2d", ["data.pairing=unpaired"])
    with pytest.raises(ConfigError, match="data.pairing must be paired or unpaired"):
        load_config("t1_to_t2_unet2d", ["data.pairing=aligned"])
    assert load_config("t1_to_t2_unet2d", ["data.pairing=unpaired", "train.objective=cyclegan"])
