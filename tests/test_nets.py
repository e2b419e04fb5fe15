"""U-Net and PatchGAN shapes, options and rebuilding; the network registry."""

from __future__ import annotations

import json

import pytest
import torch

from medsynth.errors import ConfigError
from medsynth.nets import PatchGAN, UNet, build_critic, build_generator, init_weights

TINY_UNET = {"base_channels": 4, "max_channels": 16}


@pytest.mark.parametrize(
    ("spatial_dims", "size", "depth"),
    [(2, (32, 32), 5), (2, (37, 53), 3), (2, (17, 40), 4), (3, (16, 16, 16), 3), (3, (13, 19, 22), 2)],
)
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_unet_keeps_any_input_size(spatial_dims, size, depth, norm):
    net = UNet(spatial_dims, 3, 2, depth=depth, norm=norm, **TINY_UNET)
    out = net(torch.randn(2, 3, *size))
    assert out.shape == (2, 2, *size)
    assert out.abs().max() <= 1  # tanh head


def test_unet_resize_upsampling_and_linear_head():
    net = UNet(2, 1, 1, depth=3, upsample="resize", final_activation=None, **TINY_UNET)
    out = net(torch.randn(1, 1, 21, 30) * 50)
    assert out.shape == (1, 1, 21, 30)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())


def test_unet_levels_match_pix2pix():
    net = UNet(2, 1, 1, depth=8)  # pix2pix unet_256
    widths = [block[0].out_channels for block in net.encoder]
    assert widths == [64, 128, 256, 512, 512, 512, 512, 512]
    # dropout on the three decoder levels right under the innermost, nowhere else
    dropout = [any(isinstance(m, torch.nn.Dropout) for m in block.modules()) for block in net.decoder]
    assert dropout == [False, True, True, True, False, False, False]
    # the bottleneck is 1x1 at 256 px, where instance norm is undefined: the innermost level has none
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.encoder[-1].modules())


def test_unet_dropout_only_in_train_mode():
    torch.manual_seed(0)
    net = UNet(2, 1, 1, depth=4, dropout=0.5, **TINY_UNET)
    x = torch.randn(1, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))
    no_dropout = UNet(2, 1, 1, depth=4, dropout=0.0, **TINY_UNET).train()
    with torch.no_grad():
        assert torch.equal(no_dropout(x), no_dropout(x))


@pytest.mark.parametrize(
    ("size", "min_bottleneck", "expected"), [(256, 1, 8), (128, 1, 7), ((37, 53), 1, 5), (40, 4, 3)]
)
def test_unet_depth_for(size, min_bottleneck, expected):
    assert UNet.depth_for(size, min_bottleneck) == expected


def test_unet_depth_for_refuses_tiny_input():
    with pytest.raises(ConfigError, match="at least 8 voxels"):
        UNet.depth_for(7, min_bottleneck=4)


@pytest.mark.parametrize(("spatial_dims", "fmt"), [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_unet_channels_last_gives_same_output(spatial_dims, fmt):
    net = UNet(spatial_dims, 2, 2, depth=3, **TINY_UNET).eval()
    x = torch.randn(1, 2, *(20,) * spatial_dims)
    with torch.no_grad():
        expected = net(x)
        out = net.to(memory_format=fmt)(x.to(memory_format=fmt))
    assert out.stride(1) == 1  # channels stay innermost in memory
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 4}, "spatial_dims must be one of 2, 3"),
        ({"norm": "group"}, "norm must be one of 'instance', 'batch'"),
        ({"depth": 0}, "depth must be an integer >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"max_channels": 2}, "max_channels must be an integer >= 4"),
        ({"upsample": "pixelshuffle"}, "upsample must be one of"),
    ],
)
def test_unet_refuses_bad_arguments(kwargs, message):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, **TINY_UNET, **kwargs}
    with pytest.raises(ConfigError, match=message):
        UNet(**args)


@pytest.mark.parametrize(
    ("spatial_dims", "size", "n_layers", "grid"),
    [
        (2, (64, 64), 3, (6, 6)),
        (2, (37, 53), 3, (2, 4)),
        (2, (31, 26), 2, (5, 4)),
        (3, (20, 24, 17), 2, (3, 4, 2)),
    ],
)
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_patchgan_score_map_shape(spatial_dims, size, n_layers, grid, norm):
    critic = PatchGAN(spatial_dims, 3, base_channels=4, n_layers=n_layers, norm=norm)
    scores = critic(torch.randn(2, 3, *size))
    assert scores.shape == (2, 1, *grid)


def test_patchgan_scores_are_raw():
    critic = PatchGAN(2, 2, base_channels=4, norm="none")
    scores = critic(torch.randn(1, 2, 40, 40) * 100)
    assert scores.min() < 0 or scores.max() > 1  # no sigmoid squashing


@pytest.mark.parametrize(("n_layers", "field"), [(1, 16), (2, 34), (3, 70), (4, 142)])
def test_patchgan_receptive_field(n_layers, field):
    assert PatchGAN(2, 2, base_channels=4, n_layers=n_layers).receptive_field() == field


def test_patchgan_receptive_field_is_real():
    """A score depends on exactly receptive_field() input pixels along an axis."""
    critic = PatchGAN(2, 1, base_channels=4, n_layers=3, norm="none").double()
    x = torch.randn(1, 1, 100, 100, dtype=torch.double, requires_grad=True)
    critic(x)[0, 0, 5, 5].backward()  # away from the zero-padded border
    rows = x.grad[0, 0].abs().sum(dim=1).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70


def test_patchgan_refuses_too_small_input():
    critic = PatchGAN(2, 2, base_channels=4, n_layers=3)
    assert critic.min_input_size() == 24
    critic(torch.randn(1, 2, 24, 24))
    with pytest.raises(ConfigError, match="minimum of 24"):
        critic(torch.randn(1, 2, 23, 40))


def test_patchgan_spectral_norm():
    critic = PatchGAN(2, 2, base_channels=4, norm="none", spectral_norm=True)
    critic(torch.randn(1, 2, 32, 32))  # one power iteration per layer
    weight = critic.layers[1][0].weight.flatten(1)
    assert torch.linalg.matrix_norm(weight.detach(), ord=2).item() == pytest.approx(1.0, rel=0.1)


def test_init_weights_is_pix2pix():
    torch.manual_seed(0)
    net = UNet(2, 1, 1, base_channels=32, depth=3, norm="batch")
    init_weights(net)
    conv = net.encoder[1][0].weight
    assert conv.mean().abs() < 0.002 and conv.std().item() == pytest.approx(0.02, rel=0.05)
    scale = net.encoder[1][1].weight
    assert scale.mean().item() == pytest.approx(1.0, abs=0.02)
    assert net.encoder[1][0].bias is None  # followed by a norm: no bias
    assert torch.equal(net.head[0].bias, torch.zeros_like(net.head[0].bias))


@pytest.mark.parametrize(
    ("builder", "name", "args"),
    [
        (
            build_generator,
            "unet",
            {"spatial_dims": 3, "in_channels": 2, "out_channels": 1, "depth": 2, **TINY_UNET},
        ),
        (
            build_generator,
            "UNet",
            {
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 1,
                "base_channels": 8,
                "depth": 3,
                "norm": "batch",
            },
        ),
        (
            build_critic,
            "patchgan",
            {"spatial_dims": 2, "in_channels": 2, "base_channels": 4, "spectral_norm": True},
        ),
    ],
)
def test_rebuild_from_init_args_through_a_checkpoint_file(tmp_path, builder, name, args):
    net = builder(name, **args)
    path = tmp_path / "net.pt"
    torch.save(
        {"name": name, "init_args": json.loads(json.dumps(net.init_args)), "state": net.state_dict()}, path
    )
    saved = torch.load(path, weights_only=True)
    rebuilt = builder(saved["name"], **saved["init_args"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    rebuilt.load_state_dict(saved["state"])
    x = torch.randn(1, args["in_channels"], *(24,) * args["spatial_dims"])
    net.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x))


def test_registry_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown generator 'pix2pixhd'; choose one of: resvit, unet"):
        build_generator("pix2pixhd", spatial_dims=2, in_channels=1, out_channels=1)
    with pytest.raises(ConfigError, match="unknown critic 'unet'; choose one of: patchgan"):
        build_critic("unet", spatial_dims=2, in_channels=1)


def test_registry_names_bad_arguments():
    with pytest.raises(ConfigError, match="unknown argument.*n_filters.*valid: spatial_dims"):
        build_generator("unet", spatial_dims=2, in_channels=1, out_channels=1, n_filters=8)
    with pytest.raises(ConfigError, match="needs the argument.*in_channels"):
        build_critic("patchgan", spatial_dims=2)
    with pytest.raises(ConfigError, match="norm must be one of"):
        build_critic("patchgan", spatial_dims=2, in_channels=2, norm="layer")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_stem_adds_a_full_resolution_path(spatial_dims: int) -> None:
    size = (37, 29) if spatial_dims == 2 else (13, 11, 9)
    plain = UNet(spatial_dims, 2, 1, base_channels=4, depth=2)
    stem = UNet(spatial_dims, 2, 1, base_channels=4, depth=2, stem_channels=3)
    x = torch.randn(2, 2, *size)
    assert stem(x).shape == plain(x).shape == (2, 1, *size)
    assert stem.stem is not None and plain.stem is None
    rebuilt = UNet(**stem.init_args)
    assert rebuilt.state_dict().keys() == stem.state_dict().keys()
    with pytest.raises(ConfigError, match="stem_channels"):
        UNet(spatial_dims, 1, 1, stem_channels=-1)
