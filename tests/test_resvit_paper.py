"""ResViT as published: per-block token paths around shared transformer layers, and two-stage training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from medsynth.config import load_config
from medsynth.engine.run import claim_run_dir, train
from medsynth.errors import ConfigError
from medsynth.model.networks import build_model_generator
from medsynth.nets import ResViT

PAPER = {
    "base_channels": 4,
    "n_art_blocks": 6,
    "transformer_blocks": [0, 5],
    "art_style": "paper",
    "patch_size": 1,
    "token_downsampling": 2,
    "embed_dim": 16,
    "n_heads": 2,
    "n_transformer_layers": 2,
    "img_size": 32,
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (37, 45), (16, 16)])
def test_paper_resvit_keeps_any_input_size(size):
    net = ResViT(2, 2, 1, **PAPER)
    out = net(torch.randn(2, 2, *size))
    assert out.shape == (2, 1, *size) and out.abs().max() <= 1


def test_paper_resvit_3d():
    net = ResViT(3, 1, 1, **{**PAPER, "img_size": 16})
    assert net(torch.randn(1, 1, 16, 20, 18)).shape == (1, 1, 16, 20, 18)


def test_paper_token_grid_is_sized_for_the_training_slice():
    net = ResViT(2, 1, 1, **{**PAPER, "img_size": 96})
    # 96 px / 2**2 (encoder) / 2**2 (token path) / patch 1 = 6x6 tokens, as 256 px gives the paper's 16x16.
    assert tuple(net.art_blocks[0].tokens.position.shape) == (1, 16, 6, 6)
    assert net.art_blocks[1].tokens is None and net.art_blocks[1].compress is None


def test_shared_transformer_is_one_module_with_one_set_of_parameters():
    shared = ResViT(2, 1, 1, **PAPER)
    assert shared.transformer_of(0) is shared.transformer_of(5) is shared.transformer
    assert shared.transformers is None and shared.transformer_of(1) is None
    own = ResViT(2, 1, 1, **{**PAPER, "share_transformer": False})
    assert own.transformer is None and own.transformer_of(0) is not own.transformer_of(5)
    # Unsharing adds exactly one more copy of the transformer layers.
    assert _count(own) - _count(shared) == _count(shared.transformer)
    names = [name for name in shared.state_dict() if name.startswith("transformer.")]
    assert names and not any(".transformer." in name for name in shared.state_dict())  # stored once
    # Both blocks' gradients reach the shared weights.
    out = shared(torch.randn(1, 1, 32, 32))
    out.mean().backward()
    assert all(p.grad is not None for p in shared.transformer.parameters())


def test_compact_style_still_shares_its_whole_patch_transformer():
    net = ResViT(2, 1, 1, **{**PAPER, "art_style": "compact", "patch_size": 2})
    assert net.art_blocks[0].tokens is None
    assert "transformer.embed.weight" in net.state_dict() and "transformer.position" in net.state_dict()


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("art_style", "published", "art_style"),
        ("share_transformer", "yes", "share_transformer"),
        ("token_downsampling", -1, "token_downsampling"),
    ],
)
def test_bad_paper_arguments_are_named(argument, value, message):
    with pytest.raises(ConfigError, match=message):
        ResViT(2, 1, 1, **{**PAPER, argument: value})


def _stage_two_names_unset(missing: list[str], blocks: list[int]) -> None:
    """Only the transformer path may be left unset by a CNN-only stage 1."""
    allowed = (
        "transformer.",
        *(f"art_blocks.{b}.tokens." for b in blocks),
        *(f"art_blocks.{b}.compress." for b in blocks),
    )
    assert missing and all(name.startswith(allowed) for name in missing), missing
    assert any(name.startswith("transformer.") for name in missing)


def test_stage_two_loads_stage_one_and_sets_all_but_the_transformer_path():
    stage1 = ResViT(2, 1, 1, **{**PAPER, "transformer_blocks": []})
    stage2 = ResViT(2, 1, 1, **PAPER)
    missing = stage2.load_pretrained(stage1.state_dict())
    _stage_two_names_unset(missing, [0, 5])
    own = stage2.state_dict()
    for name, tensor in stage1.state_dict().items():
        torch.testing.assert_close(own[name], tensor, rtol=0, atol=0)


def test_stage_two_recipe_starts_from_the_stage_one_run(tiny_cohort: Path, tmp_path: Path) -> None:
    """demo_resvit_stage1 -> run folder -> demo_resvit with model.generator_weights=<run folder>."""
    tiny = {**PAPER, "base_channels": 4}
    stage1_args = {**tiny, "transformer_blocks": []}
    extra = ["model.generator=resvit", "model.critic_args={base_channels: 8, n_layers: 2, norm: batch}",
             "train.steps_per_epoch=1", "train.epochs=1", "train.decay_epochs=0"]  # fmt: skip
    config = tiny_config(tiny_cohort, extra=[*extra, f"model.generator_args={stage1_args}"])
    run = tmp_path / "stage1"
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    for recipe in ("demo_resvit", "t1_to_t2_resvit2d", "demo_resvit_stage1", "t1_to_t2_resvit2d_stage1"):
        load_config(recipe)  # the shipped recipes parse
    stage2 = load_config("demo_resvit", [f"model.generator_args={tiny}", f"model.generator_weights={run}"])
    generator, spec = build_model_generator(stage2.model, in_channels=1)
    assert spec.init_args["transformer_blocks"] == [0, 5]
    saved = torch.load(run / "checkpoint_best.pt", weights_only=True)["generator_state"]
    own = generator.state_dict()
    _stage_two_names_unset([n for n in own if n not in saved], [0, 5])
    for name, tensor in saved.items():
        torch.testing.assert_close(own[name], tensor, rtol=0, atol=0)


def test_shipped_resvit_recipes_are_the_paper_layout_and_stage_pairs_match():
    for stage2, stage1 in (
        ("demo_resvit", "demo_resvit_stage1"),
        ("t1_to_t2_resvit2d", "t1_to_t2_resvit2d_stage1"),
    ):
        two, one = load_config(stage2).model.generator_args, load_config(stage1).model.generator_args
        assert two["art_style"] == "paper" and two["share_transformer"] is True
        assert one["transformer_blocks"] == [] and two["transformer_blocks"] == [0, 5]
        assert {k: v for k, v in one.items() if k != "transformer_blocks"} == {
            k: v for k, v in two.items() if k != "transformer_blocks"
        }
