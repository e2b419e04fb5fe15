"""Generators (U-Net, ResViT) and the PatchGAN critic, 2D and 3D, rebuildable from their ``init_args``."""

from .blocks import init_weights
from .patchgan import PatchGAN
from .registry import CRITICS, GENERATORS, build_critic, build_generator
from .resvit import ResViT
from .unet import UNet

__all__ = [
    "CRITICS",
    "GENERATORS",
    "PatchGAN",
    "ResViT",
    "UNet",
    "build_critic",
    "build_generator",
    "init_weights",
]
