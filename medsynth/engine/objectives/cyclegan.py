"""CycleGAN (Zhu et al. 2017): learning a translation, and its reverse, from unpaired images.

The loop's generator ``G`` translates the run's source into its target; this objective adds the reverse
generator ``F`` (target -> source, same architecture and arguments) and two *unconditional* PatchGAN
critics, ``D_target`` on target-domain images and ``D_source`` on source-domain images. One step:

1. generators: ``LSGAN(D_target(G(x))) + LSGAN(D_source(F(y)))``
   ``+ cycle_weight * (|F(G(x)) - x| + |G(F(y)) - y|)``
   ``+ identity_weight * cycle_weight * (|G(y) - y| + |F(x) - x|)`` (only where a generator's input and
   output hold the same channels: one source, no 2.5D context), with both critics frozen;
2. critics: each on real images vs a synthetic image drawn from its pool of the last ``pool_size``
   synthetic images (Shrivastava et al. 2017): half the time the new image, half an older one, so the
   critics do not chase the generators' latest state.

**What the critics see.** With ``critic_blur`` (a Gaussian's sigma in voxels; 0, the paper, by default)
every image shown to a critic, real or synthetic, in both steps, is low-passed first. A critic that sees
the scanner's noise demands it, and a generator that draws noise of its own is penalised twice by any
voxel-wise score (its noise and the real image's add up). Blurred, the critics judge contrast and anatomy;
the fine scale is left to the cycle terms, which favour the mean. Measured on the 2 mm study cohort without
a pair (docs/cyclegan_experiments.md): T1w -> CT 148.7 against 175.6 HU at sigma 1 (161.5 at sigma 2);
T1w -> T2w 0.3 dB better but with less edge agreement, the shells' edges no longer sharpened.

Nothing in the step needs ``x`` and ``y`` to come from the same subject or position, which is why it
trains on ``data.pairing: unpaired`` batches (it also accepts paired ones).

**2.5D context.** ``G`` keeps the run's layout (the source's ``context`` neighbouring slices in, the
target's centre slice out); ``F`` is a plain 2D generator (one target slice in, the source's centre slice
out). The target-side cycle maps each of the target's ``context`` slices through ``F`` and gives ``G`` the
stack it expects, so both cycles are closed with the networks' own layouts and ``F`` is an ordinary
one-slice model at inference. Only the centre slice's ``F`` carries gradients (the neighbours' forward is
batched under ``no_grad``): every slice is the centre of its own samples, and the step costs a third less.

**What it saves.** ``F``'s weights and plan go into every checkpoint as a second inference direction
(:meth:`directions`; the model home serves it with ``--target``); critics, optimisers and pools go into
the resumable state. Under torchrun each process keeps its own pools; the checkpoint holds rank 0's,
which every rank starts from when the run resumes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ...config import Config
from ...errors import ConfigError
from ...losses import LSGANLoss, l1_loss
from ...model.plan import NetworkSpec, SynthesisPlan
from ...nets.registry import build_critic, build_generator
from ...task import Task
from .base import _Context


@dataclass(frozen=True)
class CycleSettings:
    """``train.objective_args`` of this objective, with the paper's values as defaults."""

    #: Weight of each cycle-consistency L1 term (the paper's lambda).
    cycle_weight: float = 10.0
    #: Identity terms' weight as a fraction of ``cycle_weight`` (the paper's 0.5 x lambda).
    identity_weight: float = 0.5
    #: Synthetic images each critic draws from (0: always the newest).
    pool_size: int = 50
    #: Sigma (voxels) of the Gaussian every critic input is low-passed with; 0: none (module docstring).
    critic_blur: float = 0.0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> CycleSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(
                f"unknown train.objective_args key {unknown[0]!r} for cyclegan; valid: {', '.join(sorted(known))}"
            )
        settings = cls(**args)
        for name in ("cycle_weight", "identity_weight", "critic_blur"):
            value = getattr(settings, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"train.objective_args.{name} must be a number >= 0, got {value!r}")
        if (
            isinstance(settings.pool_size, bool)
            or not isinstance(settings.pool_size, int)
            or settings.pool_size < 0
        ):
            raise ConfigError(
                f"train.objective_args.pool_size must be an integer >= 0, got {settings.pool_size!r}"
            )
        return settings


class ImagePool:
    """The last ``size`` synthetic images a critic has been shown, one entry per image (not per batch).

    Its decisions draw from torch's global generator, which the checkpoint saves, so a resumed run makes
    the same choices. Images are kept detached, on the device they were made on.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        chosen = []
        for image in batch.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                chosen.append(image)
                continue
            if float(torch.rand(())) < 0.5:
                slot = int(torch.randint(len(self.images), ()))
                chosen.append(self.images[slot].clone())
                self.images[slot] = image.clone()
            else:
                chosen.append(image)
        return torch.stack(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "images": list(self.images)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.images = [image.to(device) for image in state["images"]][: self.size]


class CriticView(nn.Module):
    """What a critic is shown: the image as it is, or low-passed by a Gaussian of ``sigma`` voxels.

    MONAI's separable Gaussian pads with zeros; images are shifted so their background (-1) is the
    padding's value while they are filtered, so no bright rim appears at the border.
    """

    def __init__(self, spatial_dims: int, sigma: float) -> None:
        super().__init__()
        from monai.networks.layers import GaussianFilter

        self.blur = GaussianFilter(spatial_dims, float(sigma)) if sigma > 0 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.blur is None else self.blur(images + 1.0) - 1.0


class CycleGANObjective:
    """Two generators, two critics, cycle consistency; see the module docstring."""

    loss_names = ("loss_critic", "loss_adv", "loss_cycle", "loss_identity")
    inputs = ("source", "target", "mask", "target_stack", "target_mask")
    #: The image pools decide on the host which image each critic sees: a captured graph would replay
    #: one decision for ever.
    capturable = False
    #: Unpaired data promise no alignment, so a held-out subject with both images is scored after its
    #: target is registered onto its source (a misaligned pair would choose a blurred checkpoint); held-out
    #: subjects with one image each are scored on the round trip and its target divergence.
    registers_validation = True

    @staticmethod
    def check_config(config: Config) -> None:
        task = config.parsed_task()
        if task.is_unified or len(task.sources) != 1:
            raise ConfigError(
                f"train.objective=cyclegan translates between two modalities; {task} has "
                f"{'a modality set' if task.is_unified else f'{len(task.sources)} sources'}: give one source"
            )
        if config.model.predict_scale:
            raise ConfigError("model.predict_scale is not available with train.objective=cyclegan")
        CycleSettings.from_args(dict(config.train.objective_args))

    def __init__(self, context: _Context) -> None:
        self.ctx = context
        config = context.config
        self.check_config(config)
        task = config.parsed_task()
        if context.plan is None:  # pragma: no cover - the trainer always passes its plan
            raise ConfigError("the cyclegan objective needs the run's synthesis plan")
        self.settings = CycleSettings.from_args(dict(config.train.objective_args))
        self.source_modality, self.target_modality = task.sources[0], str(task.target)
        self.context_slices = config.data.context
        train, model, device = config.train, config.model, context.device
        distributed = context.distributed
        # The reverse generator is built like the forward one, without model.generator_weights (they
        # initialise the forward direction).
        reverse_args = {**model.generator_args, "out_channels": 1}
        reverse = build_generator(
            model.generator, spatial_dims=model.spatial_dims, in_channels=1, **reverse_args
        )
        self.reverse = distributed.sync_batchnorm(reverse, device).to(
            device, memory_format=context.memory_format
        )
        self.reverse_spec = NetworkSpec(model.generator, dict(self.reverse.init_args))

        def critic() -> nn.Module:
            built = build_critic(
                model.critic, spatial_dims=model.spatial_dims, in_channels=1, **model.critic_args
            )
            return distributed.sync_batchnorm(built, device).to(device, memory_format=context.memory_format)

        self.critic_target, self.critic_source = critic(), critic()
        adam = {"betas": (train.beta1, train.beta2), "fused": device.type == "cuda"}
        self.optimizer_reverse = torch.optim.Adam(self.reverse.parameters(), lr=train.lr_generator, **adam)
        self.optimizer_critics = torch.optim.Adam(
            [*self.critic_target.parameters(), *self.critic_source.parameters()], lr=train.lr_critic, **adam
        )
        wrap = lambda module: distributed.wrap(module, device)  # noqa: E731
        compile_ = (lambda m: torch.compile(m)) if train.compile else (lambda m: m)
        self.forward_reverse = compile_(wrap(self.reverse))
        self.train_critic_target = compile_(wrap(self.critic_target))
        self.train_critic_source = compile_(wrap(self.critic_source))
        # The generator step's critics: frozen, so the bare modules (a DDP forward of frozen parameters
        # would wait for a gradient reduction that never comes); gradients still reach the generators.
        self.frozen_critic_target = compile_(self.critic_target)
        self.frozen_critic_source = compile_(self.critic_source)
        self.pool_target, self.pool_source = (
            ImagePool(self.settings.pool_size),
            ImagePool(self.settings.pool_size),
        )
        self.critic_view = CriticView(model.spatial_dims, self.settings.critic_blur)
        # Identity terms compare a generator's input with its output: only when both are one image.
        self.identity = self.settings.identity_weight > 0 and context.in_channels == 1

    # ------------------------------------------------------------------------------------ step
    def step(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None,
        target_stack: torch.Tensor | None,
        target_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        ctx, weight = self.ctx, self.settings.cycle_weight
        centre = self.context_slices // 2
        source_centre = source[:, centre : centre + 1]
        stack = target if target_stack is None else target_stack
        if target_mask is None:  # paired batches: one mask for both images
            target_mask = mask
        for critic in (self.critic_target, self.critic_source):
            critic.requires_grad_(False)
        with ctx.autocast():
            synthetic_target = ctx.generator(source)  # G(x)
            cycled_source = self.forward_reverse(synthetic_target)  # F(G(x))
            # F on the target's centre slice, and on its neighbours without gradients: G needs the stack
            # it was built for, and every slice is the centre of its own samples, where F learns from it.
            target_centre = stack[:, centre : centre + 1]
            synthetic_source = self.forward_reverse(target_centre)  # F(y)
            cycled_target = ctx.generator(self._reverse_stack(stack, synthetic_source, centre))  # G(F(y))
            view = self.critic_view
            adversarial = LSGANLoss.generator(
                self.frozen_critic_target(view(synthetic_target))
            ) + LSGANLoss.generator(self.frozen_critic_source(view(synthetic_source)))
            cycle = l1_loss(cycled_source, source_centre, mask) + l1_loss(cycled_target, target, target_mask)
            total = adversarial + weight * cycle
            if self.identity:
                identity = l1_loss(ctx.generator(target), target, target_mask) + l1_loss(
                    self.forward_reverse(source), source, mask
                )
                total = total + self.settings.identity_weight * weight * identity
            else:
                identity = torch.zeros((), device=source.device)
        ctx.optimizer.zero_grad(set_to_none=True)
        self.optimizer_reverse.zero_grad(set_to_none=True)
        ctx.backward(total)
        ctx.step(ctx.optimizer)
        ctx.step(self.optimizer_reverse)

        for critic in (self.critic_target, self.critic_source):
            critic.requires_grad_(True)
        shown_target = self.pool_target.query(synthetic_target.float())
        shown_source = self.pool_source.query(synthetic_source.float())
        with ctx.autocast():
            loss_critic = LSGANLoss.critic(
                self.train_critic_target(view(target)), self.train_critic_target(view(shown_target))
            ) + LSGANLoss.critic(
                self.train_critic_source(view(source_centre)), self.train_critic_source(view(shown_source))
            )
        self.optimizer_critics.zero_grad(set_to_none=True)
        ctx.backward(loss_critic)
        ctx.step(self.optimizer_critics)
        ctx.update()
        return {
            "loss_critic": loss_critic.detach(),
            "loss_adv": adversarial.detach(),
            "loss_cycle": cycle.detach(),
            "loss_identity": identity.detach(),
        }

    def _reverse_stack(self, stack: torch.Tensor, centre_image: torch.Tensor, centre: int) -> torch.Tensor:
        """``F`` of every slice of the target's 2.5D stack: the centre's given (with gradients), the
        neighbours' computed in one batched forward without them (a third of the cost of the stack)."""
        if stack.shape[1] == 1:
            return centre_image
        neighbours = torch.cat([stack[:, :centre], stack[:, centre + 1 :]], dim=1)
        with torch.no_grad():
            planes = neighbours.reshape(-1, 1, *neighbours.shape[2:])
            mapped = self.reverse(planes).reshape(neighbours.shape).to(centre_image.dtype)
        return torch.cat([mapped[:, :centre], centre_image, mapped[:, centre:]], dim=1)

    # ---------------------------------------------------------------------------- the seam
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer_reverse, self.optimizer_critics]

    @property
    def modules(self) -> list[nn.Module]:
        return [self.reverse, self.critic_target, self.critic_source]

    def directions(self) -> list[tuple[SynthesisPlan, nn.Module]]:
        """The reverse generator as a one-slice model: target -> source on the forward plan's grid rules."""
        plan = self.ctx.plan
        assert plan is not None
        reverse = SynthesisPlan(
            task=Task(sources=(self.target_modality,), target=self.source_modality),
            generator=self.reverse_spec, spatial_dims=plan.spatial_dims, axis=plan.axis, context=1,
            window=plan.window, sliding_overlap=plan.sliding_overlap, precision=plan.precision,
        )  # fmt: skip
        return [(reverse, self.reverse)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "reverse_state": self.reverse.state_dict(),
            "critic_target_state": self.critic_target.state_dict(),
            "critic_source_state": self.critic_source.state_dict(),
            "optimizer_reverse": self.optimizer_reverse.state_dict(),
            "optimizer_critics": self.optimizer_critics.state_dict(),
            "pools": {"target": self.pool_target.state_dict(), "source": self.pool_source.state_dict()},
            **self.ctx.scaler_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reverse.load_state_dict(state["reverse_state"])
        self.critic_target.load_state_dict(state["critic_target_state"])
        self.critic_source.load_state_dict(state["critic_source_state"])
        self.optimizer_reverse.load_state_dict(state["optimizer_reverse"])
        self.optimizer_critics.load_state_dict(state["optimizer_critics"])
        self.pool_target.load_state_dict(state["pools"]["target"], self.ctx.device)
        self.pool_source.load_state_dict(state["pools"]["source"], self.ctx.device)
        self.ctx.load_scaler_state(state)

    def describe(self) -> dict[str, Any]:
        model = self.ctx.config.model
        return {
            "name": "cyclegan",
            "pairing": self.ctx.config.data.pairing,
            "critic": {
                "name": model.critic,
                "init_args": dict(self.critic_target.init_args),
                "conditional": False,
            },
            "reverse_generator": self.reverse_spec.to_dict(),
            "directions": [
                f"{self.source_modality}->{self.target_modality}",
                f"{self.target_modality}->{self.source_modality}",
            ],
            **asdict(self.settings),
            "identity_applied": self.identity,
        }
