"""ResViT: any input size, the shared transformer, gradients, rebuilding and pretrained weights."""

from __future__ import annotations

import pytest
import torch

from medsynth.errors import CheckpointError, ConfigError
from medsynth.nets import ResViT, build_generator

TINY = {
    "base_channels": 4,
    "n_art_blocks": 6,
    "transformer_blocks": (0, 5),
    "embed_dim": 16,
    "n_heads": 2,
    "n_transformer_layers": 2,
    "img_size": 32,
}


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (40, 56), (37, 45), (16, 16)])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_resvit_keeps_any_input_size(size, patch_size):
    net = ResViT(2, 3, 1, patch_size=patch_size, **TINY)
    out = net(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)
    assert out.abs().max() <= 1


def test_resvit_3d():
    net = ResViT(3, 2, 1, **{**TINY, "img_size": 16})
    assert net(torch.randn(1, 2, 16, 20, 18)).shape == (1, 1, 16, 20, 18)


def test_resvit_positional_embedding_is_resized_not_recreated():
    net = ResViT(2, 1, 1, patch_size=2, **TINY)
    assert tuple(net.transformer.position.shape) == (1, 16, 4, 4)  # 32 / (4 * 2)
    net(torch.randn(1, 1, 48, 64))
    assert tuple(net.transformer.position.shape) == (1, 16, 4, 4)


def test_resvit_shares_one_transformer():
    net = ResViT(2, 1, 1, **TINY)
    transformer_params = {id(p) for p in net.transformer.parameters()}
    # counted once in the model, saved once in the state dict
    total = sum(p.numel() for p in net.parameters())
    assert total == sum(p.numel() for name, p in net.named_parameters(remove_duplicate=False))
    assert sum(1 for key in net.state_dict() if "transformer" in key) == len(net.transformer.state_dict())
    # only the selected blocks compress transformer features
    assert [block.compress is not None for block in net.art_blocks] == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    # both blocks use that one module: its output is requested twice per forward pass
    calls = []
    net.transformer.register_forward_hook(lambda module, args, out: calls.append(module))
    net(torch.randn(1, 1, 32, 32))
    assert len(calls) == 2 and calls[0] is calls[1] is net.transformer
    assert all(id(p) in transformer_params for p in calls[0].parameters())


def test_resvit_shared_transformer_gets_gradients_from_both_blocks():
    torch.manual_seed(0)
    net = ResViT(2, 1, 1, **TINY)
    x = torch.randn(2, 1, 32, 32)
    net(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    both = net.transformer.embed.weight.grad.clone()
    # with only the first block carrying it, the gradient differs: the second use contributed
    single = ResViT(2, 1, 1, **{**TINY, "transformer_blocks": (0,)})
    single.load_state_dict(net.state_dict(), strict=False)
    single(x).square().mean().backward()
    assert not torch.allclose(single.transformer.embed.weight.grad, both)


def test_resvit_cnn_only_has_no_transformer():
    net = ResViT(2, 1, 1, **{**TINY, "transformer_blocks": ()})
    assert net.transformer is None
    assert net(torch.randn(1, 1, 24, 28)).shape == (1, 1, 24, 28)


def test_resvit_refuses_input_smaller_than_a_patch():
    net = ResViT(2, 1, 1, patch_size=4, **TINY)
    assert net.min_input_size() == 16
    with pytest.raises(ConfigError, match="minimum of 16 a side"):
        net(torch.randn(1, 1, 12, 40))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transformer_blocks": (0, 6)}, r"distinct indices in 0\.\.5"),
        ({"transformer_blocks": (1, 1)}, "distinct indices"),
        ({"embed_dim": 15}, "multiple of n_heads"),
        ({"spatial_dims": 1}, "spatial_dims must be one of 2, 3"),
        ({"img_size": (32, 32, 32)}, "img_size must be a positive int or 2 positive ints"),
        ({"patch_size": 0}, "patch_size must be an integer >= 1"),
    ],
)
def test_resvit_refuses_bad_arguments(kwargs, message):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, **TINY, **kwargs}
    with pytest.raises(ConfigError, match=message):
        ResViT(**args)


def test_resvit_rebuilds_from_init_args(tmp_path):
    net = ResViT(2, 2, 1, **TINY).eval()
    path = tmp_path / "resvit.pt"
    torch.save({"init_args": net.init_args, "state": net.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    rebuilt = build_generator("resvit", **saved["init_args"]).eval()
    rebuilt.load_state_dict(saved["state"])
    x = torch.randn(1, 2, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x))


def test_load_pretrained_cnn_only_into_full_model(tmp_path):
    cnn_only = ResViT(2, 1, 1, **{**TINY, "transformer_blocks": ()})
    path = tmp_path / "cnn.pt"
    torch.save(cnn_only.state_dict(), path)
    full = ResViT(2, 1, 1, **TINY)
    missing = full.load_pretrained(path)
    assert missing and all(
        name.startswith(("transformer.", "art_blocks.0.compress", "art_blocks.5.compress"))
        for name in missing
    )
    torch.testing.assert_close(full.encoder[0][0].weight, cnn_only.encoder[0][0].weight)
    torch.testing.assert_close(
        full.art_blocks[3].residual[0][0].weight, cnn_only.art_blocks[3].residual[0][0].weight
    )


def test_load_pretrained_refuses_foreign_files(tmp_path):
    net = ResViT(2, 1, 1, **TINY)
    with pytest.raises(CheckpointError, match="no such state-dict file"):
        net.load_pretrained(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        net.load_pretrained(corrupt)
    other = tmp_path / "other.pt"
    torch.save(ResViT(2, 1, 1, **{**TINY, "base_channels": 8}).state_dict(), other)
    before = net.encoder[0][0].weight.clone()
    with pytest.raises(CheckpointError, match="of another shape"):
        net.load_pretrained(other)
    assert torch.equal(net.encoder[0][0].weight, before)  # nothing loaded on refusal
