"""FLOPs and time of one pix2pix training step (critic step + generator step), on a CPU or a GPU.

The step is the one the trainer runs: the generator synthesises a batch; the critic scores
(source, real) and (source, synthetic.detach()) and steps; the generator is scored again through the
frozen critic and steps on LSGAN + lambda * L1. FLOPs are counted by ``torch.utils.flop_counter`` on
that exact step (convolutions and matrix products, forward and backward; the optimiser's element-wise
update is not counted) and reported per slice (per patch in 3D). The throughput is put against the
machine's own matrix-product peak, measured in the same run (:mod:`machine`).

    python benchmarks/flops.py                              # pix2pix: U-Net 7 levels @128, 70x70 critic, batch 8
    python benchmarks/flops.py --generator resvit --size 128 --batch 2
    python benchmarks/flops.py --device cuda --batch 32     # on a GPU (fp32 step; peak = bf16 matmul)
"""

from __future__ import annotations

import argparse
import time

import machine
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medsynth.losses import GeneratorLoss, LSGANLoss
from medsynth.nets import PatchGAN, UNet, build_critic, build_generator

GENERATOR_LOSS = GeneratorLoss()


def training_step(
    generator: nn.Module,
    critic: nn.Module,
    optimisers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    source: torch.Tensor,
    target: torch.Tensor,
) -> None:
    """One critic update and one generator update, as the trainer does them."""
    g_optimiser, d_optimiser = optimisers
    synthetic = generator(source)

    critic.requires_grad_(True)
    d_optimiser.zero_grad(set_to_none=True)
    real_scores = critic(torch.cat([source, target], 1))
    fake_scores = critic(torch.cat([source, synthetic.detach()], 1))
    LSGANLoss.critic(real_scores, fake_scores).backward()
    d_optimiser.step()

    critic.requires_grad_(False)  # the generator step needs input gradients only, not weight gradients
    g_optimiser.zero_grad(set_to_none=True)
    GENERATOR_LOSS(critic(torch.cat([source, synthetic], 1)), synthetic, target).total.backward()
    g_optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="unet", choices=["unet", "resvit"])
    parser.add_argument("--spatial-dims", type=int, default=2, choices=[2, 3])
    parser.add_argument("--size", type=int, default=128, help="slice/patch side in voxels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument(
        "--depth", type=int, default=None, help="U-Net levels (default: UNet.depth_for(size))"
    )
    parser.add_argument("--critic-layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="channels_last(_3d) memory format")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    machine.cuda_or_exit(args.device)
    torch.set_num_threads(args.threads)
    print(machine.describe(args.device))
    peak = machine.measure_peak(args.device)
    print(peak)
    torch.manual_seed(0)
    if args.generator == "unet":
        depth = args.depth or UNet.depth_for(args.size)
        g_args = {"base_channels": args.base_channels, "depth": depth}
    else:
        g_args = {"base_channels": args.base_channels, "img_size": args.size}
    generator = build_generator(
        args.generator, spatial_dims=args.spatial_dims, in_channels=args.in_channels, out_channels=1, **g_args
    )
    critic: PatchGAN = build_critic(
        "patchgan",
        spatial_dims=args.spatial_dims,
        in_channels=args.in_channels + 1,
        base_channels=args.base_channels,
        n_layers=args.critic_layers,
    )
    generator, critic = generator.to(args.device), critic.to(args.device)
    shape = (args.batch, args.in_channels, *(args.size,) * args.spatial_dims)
    source = torch.randn(shape, device=args.device)
    target = torch.rand(args.batch, 1, *shape[2:], device=args.device) * 2 - 1
    if args.channels_last:
        fmt = torch.channels_last if args.spatial_dims == 2 else torch.channels_last_3d
        generator, critic = generator.to(memory_format=fmt), critic.to(memory_format=fmt)
        source, target = source.to(memory_format=fmt), target.to(memory_format=fmt)
    optimisers = (
        torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999)),
    )

    with FlopCounterMode(display=False) as counter:
        training_step(generator, critic, optimisers, source, target)  # also the warm-up
    gflop = counter.get_total_flops() / 1e9
    machine.synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        training_step(generator, critic, optimisers, source, target)
    machine.synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.repeats

    g_params = sum(p.numel() for p in generator.parameters()) / 1e6
    d_params = sum(p.numel() for p in critic.parameters()) / 1e6
    print(f"generator  {args.generator} {g_args} ({g_params:.1f} M parameters)")
    print(
        f"critic     PatchGAN n_layers={args.critic_layers}, receptive field {critic.receptive_field()} "
        f"({d_params:.1f} M parameters)"
    )
    print(
        f"input      batch {args.batch} x {args.in_channels} x {args.size}^{args.spatial_dims}, "
        f"{args.device}, {args.threads} threads{', channels_last' if args.channels_last else ''}"
    )
    print(f"FLOPs      {gflop:.1f} GFLOP per step, {gflop / args.batch:.2f} GFLOP per slice")
    print(f"time       {seconds:.2f} s per step, {seconds / args.batch * 1e3:.0f} ms per slice")
    print(f"throughput {machine.fraction(gflop / seconds, peak)}")


if __name__ == "__main__":
    main()
