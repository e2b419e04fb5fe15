"""RegGAN (Kong et al., NeurIPS 2021): paired training through residual misalignment.

Real pairs are never voxel-aligned: whatever ``medsynth data register`` leaves (or what was never
registered), a paired L1 punishes as the generator's error, and the generator learns to blur. RegGAN
treats the misaligned target as a *noisy label*: a registration network ``R``, trained jointly with the
generator ``G``, warps the synthetic image onto the target before the L1, and a smoothness penalty keeps
the displacement field a plausible motion, so ``G`` is not blamed for where the target lies, only for
what it looks like.

Everything but the L1 term is the ``gan`` objective's (:class:`~.pix2pix.GANObjective`: conditional
PatchGAN critic, LSGAN; the critic sees ``G(x)`` as it is, on the source's grid). The generator step is ::

    synthetic = G(x);  ddf = R(synthetic, y);  warped = Warp(synthetic, ddf)
    loss = adversarial + lambda_l1 * L1(warped, y) + smooth_weight * diffusion(ddf)
           [+ anchor_weight * lambda_l1 * L1(synthetic, y)] [+ structure_weight * MIND-L1(synthetic, x)]

The bracketed terms answer one weakness: ``G`` and ``R`` share a degree of freedom (``G`` may move
anatomy that ``R`` moves back), so something must tie ``G(x)`` to ``x``'s geometry. The anchor ties it to
the target's, which on misaligned pairs is each subject's motion; the structure term ties it to the
input's boundaries (MIND descriptors, contrast-free) and trains through the motion.

One backward updates ``G`` and ``R`` (``R`` has its own Adam, driven by the loop's schedule). ``R`` is
MONAI's LocalNet, 2 channels in (synthetic, target), 2 out: an in-plane displacement in voxels, applied
by MONAI's ``Warp`` (bilinear, border padding) in float32; the penalty is MONAI's ``DiffusionLoss``. The
output layer starts at zero, so training starts at the identity warp: on aligned data the objective
begins as the ``gan`` objective and ``R`` moves only where a shift pays for its smoothness.

**Training machinery only.** ``R`` and its optimiser live in the resumable state (:meth:`state_dict`);
:meth:`directions` is empty, so ``checkpoint_best.pt``, ``infer`` and ``export`` serve ``G`` alone. What
``R`` does shows in ``metrics.csv``: ``loss_smooth`` (the unweighted penalty) and ``reg_shift_px`` (the
mean displacement length in voxels).

**Validation** registers each held-out target onto its source first (``registers_validation``), so
misaligned held-out pairs do not choose ``checkpoint_best.pt``.

2D and 2.5D only: ``G``'s output and the target are single slices (a through-plane shift cannot be undone
in-plane); one target per run (no unified model) and paired data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...config import Config
from ...errors import ConfigError
from ...losses import LSGANLoss, l1_loss, structure_loss
from .base import _Context
from .pix2pix import GANObjective


@dataclass(frozen=True)
class RegistrationSettings:
    """``train.objective_args`` of this objective."""

    #: Weight of the diffusion penalty on the displacement field. The paper weighs it 10 against its L1
    #: weight of 20; 50 keeps that ratio at this project's ``train.lambda_l1`` of 100. A rigid shift costs
    #: nothing; the weight decides how much local deformation ``R`` may use to explain a difference.
    smooth_weight: float = 50.0
    #: ``R``'s Adam learning rate (None: ``train.lr_generator``); its schedule is the loop's.
    registration_lr: float | None = None
    #: LocalNet's first-level channels (doubled at each level). 8 keeps ``R`` cheaper than the demo's
    #: generator (about 2.8 vs 4 GFLOP per forward of a 96 x 112 batch of 8); 16 would cost 11.
    registration_channels: int = 8
    #: LocalNet's levels below the input: its field is the mean of the ``0..depth`` levels' outputs.
    registration_depth: int = 3
    #: ``R`` sees the pair averaged over blocks of this many voxels a side, and its field is interpolated
    #: back to the full grid (displacements scaled to full-grid voxels). The field is coarse anyway
    #: (``field_spacing``), and at full resolution ``R``'s forward and backward cost about as much as the
    #: generator's step: 2 makes ``R`` about 3 times, 4 about 10 times cheaper (measured on a batch of 8
    #: 96 x 112 slices, one Xeon thread: 0.25, 0.08, 0.024 s), and every minute saved is generator steps.
    registration_scale: int = 1
    #: Voxels per control point of the field: ``R``'s field is averaged over blocks of this size and
    #: interpolated back (a coarse grid, as a B-spline registration's). A per-voxel field lets ``G``
    #: and ``R`` cheat together: ``G`` draws a fine pattern of every intensity, and sub-voxel shifts
    #: pick the target's value at each voxel through the bilinear warp (measured on the demo cohort:
    #: L1 after the warp below the ``gan`` objective's, 11.9 dB held out). Misregistration is smooth;
    #: 8 voxels (16 mm at 2 mm) still follows a rotation of the head.
    field_spacing: int = 8
    #: Weight, as a fraction of ``train.lambda_l1``, of the L1 between the *unwarped* synthetic image and
    #: the target (0: the paper's objective). ``G`` and ``R`` share a degree of freedom: ``G`` may move
    #: anatomy that ``R`` moves back, and nothing in the warped L1 ties ``G(x)`` to the input's geometry
    #: (measured: sharp, deformed images, 6.6 dB behind the ``gan`` objective on aligned pairs). A small
    #: unwarped term makes every such move cost; the misaligned part of a pair it blurs with this weight only.
    anchor_weight: float = 0.0
    #: Weight of a term that ties ``G(x)`` to the *input's* geometry instead: the L1 between the MIND
    #: descriptors of ``G(x)`` and of each input's centre slice (:func:`~medsynth.losses.structure_loss`;
    #: 0 leaves it out). The anchor ties ``G`` to the target, whose pose on misaligned pairs is the
    #: subject's motion, so it also teaches ``G`` each training subject's pose; the input's pose is the one
    #: ``G`` must keep. Measured on the demo's T1w -> T2w pairs moved 2-4 mm / 2-4 degrees (10 CPU minutes):
    #: 21.6 dB with weight 10 against 19.6 with the anchor; 100 makes ``G`` copy the input's boundaries.
    #: Its cost is a target with boundaries of its own: a CT lacks most of a T1w's (47.7 against 35.2 HU
    #: on aligned pairs), where the anchor is the better tie.
    structure_weight: float = 0.0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RegistrationSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(
                f"unknown train.objective_args key {unknown[0]!r} for reggan; valid: {', '.join(sorted(known))}"
            )
        settings = cls(**args)
        for name in ("smooth_weight", "anchor_weight", "structure_weight"):
            value = getattr(settings, name)
            if not _number(value) or value < 0:
                raise ConfigError(f"train.objective_args.{name} must be a number >= 0, got {value!r}")
        lr = settings.registration_lr
        if lr is not None and (not _number(lr) or lr <= 0):
            raise ConfigError(f"train.objective_args.registration_lr must be a number > 0, got {lr!r}")
        for name, low in (("registration_channels", 1), ("registration_depth", 1), ("registration_scale", 1),
                          ("field_spacing", 1)):  # fmt: skip
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"train.objective_args.{name} must be an integer >= {low}, got {value!r}")
        return settings


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class RegistrationNetwork(nn.Module):
    """MONAI's LocalNet predicting a 2D displacement field (voxels) that moves ``moving`` onto ``fixed``.

    With ``scale`` > 1 the pair is first averaged over ``scale`` x ``scale`` blocks, and the field LocalNet
    predicts there is interpolated back to the input's grid, in its voxels. LocalNet halves the grid
    ``depth`` times, so its input is padded (edge values) to a multiple of ``2 ** depth`` and the field
    cropped back: any training crop works. Its output convolutions start at zero (they have no bias), so a
    new network is the identity warp.

    Example:
        >>> net = RegistrationNetwork(channels=4, depth=2, scale=2)
        >>> field = net(torch.rand(1, 1, 30, 20), torch.rand(1, 1, 30, 20))
        >>> tuple(field.shape), float(field.abs().max())
        ((1, 2, 30, 20), 0.0)
    """

    def __init__(self, spatial_dims: int = 2, channels: int = 8, depth: int = 3, scale: int = 1) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(
                f"RegistrationNetwork: in-plane fields only (spatial_dims=2), got {spatial_dims}"
            )
        if channels < 1 or depth < 1 or scale < 1:
            raise ValueError(
                f"RegistrationNetwork: channels, depth and scale must be >= 1, got {channels}, {depth}, {scale}"
            )
        from monai.networks.nets import LocalNet

        #: Constructor arguments, recorded in the checkpoint's description of the objective.
        self.init_args = {"spatial_dims": spatial_dims, "channels": channels, "depth": depth, "scale": scale}
        self.multiple, self.scale = 2**depth, scale
        self.net = LocalNet(
            spatial_dims=spatial_dims, in_channels=2, out_channels=spatial_dims, num_channel_initial=channels,
            extract_levels=tuple(range(depth + 1)),  # type: ignore[arg-type]  # MONAI annotates a 1-tuple
            out_kernel_initializer="zeros",
        )  # fmt: skip

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([moving, fixed.to(moving.dtype)], dim=1)
        size = pair.shape[2:]
        if self.scale > 1:
            pair = F.avg_pool2d(pair, self.scale, ceil_mode=True)
        height, width = pair.shape[2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:
            pair = F.pad(pair, (0, pad_w, 0, pad_h), mode="replicate")
        field = self.net(pair)[:, :, :height, :width]
        if self.scale > 1:
            field = self.scale * F.interpolate(field, size=size, mode="bilinear", align_corners=False)
        return field


def coarse_field(field: torch.Tensor, spacing: int) -> torch.Tensor:
    """``field`` averaged over ``spacing`` x ``spacing`` blocks and interpolated back to its size.

    Example:
        >>> field = torch.zeros(1, 2, 16, 16)
        >>> field[0, 0, 3, 5] = 64.0  # one voxel's shift: spread over its block
        >>> float(coarse_field(field, 8).abs().max()) < 1.5
        True
    """
    if spacing == 1:
        return field
    coarse = F.avg_pool2d(field, spacing, ceil_mode=True)
    return F.interpolate(coarse, size=field.shape[2:], mode="bilinear", align_corners=False)


class RegGANObjective(GANObjective):
    """The ``gan`` objective whose L1 compares the registered synthetic image; see the module docstring."""

    loss_names = ("loss_critic", "loss_adv", "loss_l1", "loss_smooth", "reg_shift_px", "loss_l1_unwarped")
    name = "reggan"
    #: Trained on targets assumed misaligned: validation registers each held-out target onto its source
    #: first, or misaligned held-out pairs would choose checkpoint_best.pt (engine/validation.py).
    registers_validation = True

    @classmethod
    def check_config(cls, config: Config) -> None:
        task = config.parsed_task()
        if task.is_unified:
            raise ConfigError(
                "train.objective=reggan registers one synthetic image onto its target; a unified model has "
                "many targets: use train.objective=gan"
            )
        if config.model.spatial_dims != 2:
            raise ConfigError(
                "train.objective=reggan learns an in-plane field (2D and 2.5D); set model.spatial_dims=2"
            )
        if config.data.pairing != "paired":
            raise ConfigError("train.objective=reggan needs pairs of one subject; set data.pairing=paired")
        if config.model.predict_scale:
            raise ConfigError("model.predict_scale is not available with train.objective=reggan")
        RegistrationSettings.from_args(dict(config.train.objective_args))

    def __init__(self, context: _Context) -> None:
        from monai.losses import DiffusionLoss
        from monai.networks.blocks import Warp

        self.check_config(context.config)
        super().__init__(context)
        train, device = context.config.train, context.device
        self.options = RegistrationSettings.from_args(dict(train.objective_args))
        distributed = context.distributed
        registration = RegistrationNetwork(
            channels=self.options.registration_channels,
            depth=self.options.registration_depth,
            scale=self.options.registration_scale,
        )
        self.registration = distributed.sync_batchnorm(registration, device).to(
            device, memory_format=context.memory_format
        )
        lr = self.options.registration_lr
        self.registration_lr = train.lr_generator if lr is None else lr
        self.optimizer_registration = torch.optim.Adam(
            self.registration.parameters(), lr=self.registration_lr, betas=(train.beta1, train.beta2),
            fused=device.type == "cuda", capturable=context.cuda_graphs,
        )  # fmt: skip
        wrapped = distributed.wrap(self.registration, device)
        self.forward_registration: nn.Module = torch.compile(wrapped) if train.compile else wrapped
        with warnings.catch_warnings():  # it says it uses torch's grid_sample: what it should do here
            warnings.simplefilter("ignore")
            self.warp = Warp(mode="bilinear", padding_mode="border")
        self.smoothness = DiffusionLoss()
        self.context_slices = context.config.data.context
        if self.options.structure_weight > 0:
            self.loss_names = (*RegGANObjective.loss_names, "loss_structure")
        # MONAI 1.6 indexes with a list, which torch warns about on the first step of every run.
        warnings.filterwarnings(
            "ignore",
            message="Using a non-tuple sequence for multidimensional indexing",
            module="monai.losses.deform",
        )

    def generator_terms(
        self,
        fake_scores: torch.Tensor,
        synthetic: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None,
        source: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LSGAN + ``lambda_l1`` * L1(warped synthetic, target) + ``smooth_weight`` * diffusion(field)
        [+ the anchor and the structure term, when weighted].

        The field comes from the autocast dtype; warping and both penalties run in float32 (a bf16 grid
        would round voxel positions beyond 256 and the small differences the penalty measures).
        """
        adversarial = LSGANLoss.generator(fake_scores)
        ddf = self.forward_registration(synthetic, target)
        with torch.autocast(self.ctx.device.type, enabled=False):
            field = coarse_field(ddf.float(), self.options.field_spacing)
            warped = self.warp(synthetic.float(), field)
            l1 = l1_loss(warped, target, mask)
            unwarped = l1_loss(synthetic.float(), target, mask)
            smooth = self.smoothness(field)
        total = self.loss.adversarial_weight * adversarial + self.loss.lambda_l1 * l1
        total = total + self.options.smooth_weight * smooth
        if self.options.anchor_weight > 0:
            total = total + self.options.anchor_weight * self.loss.lambda_l1 * unwarped
        shift = field.detach().square().sum(dim=1).sqrt().mean()
        losses = {
            "loss_adv": adversarial.detach(),
            "loss_l1": l1.detach(),
            "loss_smooth": smooth.detach(),
            "reg_shift_px": shift,
            "loss_l1_unwarped": unwarped.detach(),
        }
        if self.options.structure_weight > 0:
            structure = self.input_structure(synthetic, source, mask)
            total = total + self.options.structure_weight * structure
            losses["loss_structure"] = structure.detach()
        return total, losses

    def input_structure(
        self, synthetic: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """MIND L1 between ``G(x)`` and each input's centre slice (source-major channels), averaged."""
        centres = source[:, self.context_slices // 2 :: self.context_slices]
        count = centres.shape[1]
        with torch.autocast(self.ctx.device.type, enabled=False):
            inputs = centres.float().reshape(-1, 1, *centres.shape[2:])
            repeated = synthetic.float().repeat_interleave(count, dim=0)
            weights = None if mask is None else mask.repeat_interleave(count, dim=0)
            return structure_loss(repeated, inputs, weights)

    @property
    def generator_side(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.optimizer_registration,)

    # ---------------------------------------------------------------------------- the seam
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, self.optimizer_registration]

    @property
    def modules(self) -> list[nn.Module]:
        return [self.critic, self.registration]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "registration_state": self.registration.state_dict(),
            "optimizer_registration": self.optimizer_registration.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.registration.load_state_dict(state["registration_state"])
        self.optimizer_registration.load_state_dict(state["optimizer_registration"])

    def describe(self) -> dict[str, Any]:
        """The ``gan`` description plus ``R``'s network and settings (a record: inference never builds ``R``)."""
        return {
            **super().describe(),
            "registration": {"network": "monai.LocalNet", "init_args": dict(self.registration.init_args)},
            "smooth_weight": self.options.smooth_weight,
            "registration_lr": self.registration_lr,
        }
