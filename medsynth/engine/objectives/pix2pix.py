"""The pix2pix objectives: a conditional PatchGAN with LSGAN + L1 (``gan``), and L1 alone (``l1``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import Config
from ...errors import ConfigError
from ...losses import GeneratorLoss, LSGANLoss, l1_loss, laplace_nll
from ...model.networks import build_model_critic
from .base import _Context


class _PairedStep:
    """What the pix2pix objectives share at the seam: a step on aligned (source, target, mask) that a CUDA
    graph can capture, every task and layout the recipes allow, and no direction besides the run's own."""

    inputs = ("source", "target", "mask")
    capturable = True
    #: Validation scores against held-out targets as they are (they are assumed aligned).
    registers_validation = False
    #: ``train.objective`` of the class, and the recipe keys that set it: it has no ``objective_args``.
    name: str
    settings: tuple[str, ...]

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Refuse any ``train.objective_args``: these objectives read none, so a key there (a typo of
        ``lambda_l1``, another objective's setting) would be a setting silently ignored."""
        unknown = sorted(config.train.objective_args)
        if unknown:
            raise ConfigError(
                f"unknown train.objective_args key {unknown[0]!r} for {cls.name}; valid: none "
                f"({cls.name} is set by {', '.join(cls.settings)})"
            )

    def directions(self) -> list:
        return []


class ScaleReconstruction:
    """The reconstruction term of a generator that predicts its own Laplace scale (``model.predict_scale``).

    The generator's output is ``(mean, log b)``; the term is ``lambda_l1 * laplace_nll(mean, log b, y)``
    (:func:`medsynth.losses.laplace_nll`, ``train.laplace_beta``), which is ``lambda_l1 * L1`` at a
    fixed ``b = 1``. Only the mean is an image: the critic sees channel 0.
    """

    def __init__(self, config: Config) -> None:
        self.lambda_l1, self.beta = config.train.lambda_l1, config.train.laplace_beta

    def __call__(
        self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(image, lambda_l1 * NLL, losses to log)``; the L1 of the mean is logged for comparison."""
        image = output[:, :1]
        nll = laplace_nll(image, output[:, 1:], target, mask, beta=self.beta)
        l1 = l1_loss(image, target, mask).detach()
        return image, self.lambda_l1 * nll, {"loss_l1": l1, "loss_nll": nll.detach()}


def scale_reconstruction(context: _Context) -> ScaleReconstruction | None:
    return ScaleReconstruction(context.config) if context.config.model.predict_scale else None


class L1Objective(_PairedStep):
    """Reconstruction only: ``lambda_l1 * L1(G(x), y)``, no critic (the pix2pix paper's "L1 alone").

    With ``model.predict_scale`` the term is the Laplace NLL (:class:`ScaleReconstruction`).
    """

    loss_names = ("loss_l1",)
    name, settings = "l1", ("train.lambda_l1",)

    def __init__(self, context: _Context) -> None:
        self.ctx = context
        self.loss = GeneratorLoss(context.config.train.lambda_l1, adversarial_weight=0.0)
        self.scale = scale_reconstruction(context)

    def step(
        self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        with self.ctx.autocast():
            synthetic = self.ctx.generator(source)
        if self.scale is not None:
            _, total, losses = self.scale(synthetic, target, mask)
        else:
            # No synthetic.float(): bf16 - float32 promotes to float32 by itself, without a copy.
            terms = self.loss(None, synthetic, target, mask)
            total, losses = terms.total, {"loss_l1": terms.l1}
        self.ctx.optimizer.zero_grad(set_to_none=True)
        self.ctx.backward(total)
        self.ctx.step(self.ctx.optimizer)
        self.ctx.update()
        return losses

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    @property
    def modules(self) -> list[nn.Module]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return self.ctx.scaler_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state beyond the generator's, and the fp16 gradient scaler's."""
        self.ctx.load_scaler_state(state)

    def describe(self) -> dict[str, Any]:
        return {"name": "l1", "lambda_l1": self.loss.lambda_l1, **_describe_scale(self.scale)}


def _describe_scale(scale: ScaleReconstruction | None) -> dict[str, Any]:
    return {} if scale is None else {"reconstruction": "laplace_nll", "laplace_beta": scale.beta}


class GANObjective(_PairedStep):
    """pix2pix: a conditional PatchGAN critic, LSGAN + ``lambda_l1`` * L1.

    1. critic step on ``(source, target)`` (real) vs ``(source, G(source).detach())`` (synthetic);
    2. generator step on the least-squares adversarial term plus ``lambda_l1 * L1``, with the critic's
       parameters frozen so no critic weight gradients are computed. With ``model.predict_scale`` the
       L1 term is the Laplace NLL and the critic sees only the mean (:class:`ScaleReconstruction`).

    Under torchrun the critic step goes through the critic's DistributedDataParallel wrapper (its
    gradients are averaged over ranks); the generator step uses the unwrapped critic, since a DDP
    forward of frozen parameters would prepare a gradient reduction that never comes. Gradients still
    flow through it into the generator, whose own DDP wrapper averages them.
    """

    loss_names: tuple[str, ...] = ("loss_critic", "loss_adv", "loss_l1")
    name, settings = "gan", ("train.lambda_l1", "train.adversarial_weight")

    def __init__(self, context: _Context) -> None:
        self.ctx = context
        config = context.config
        train = config.train
        distributed = context.distributed
        critic = distributed.sync_batchnorm(
            build_model_critic(config.model, context.in_channels), context.device
        )
        self.critic = critic.to(context.device, memory_format=context.memory_format)
        self.optimizer = torch.optim.Adam(
            self.critic.parameters(), lr=train.lr_critic, betas=(train.beta1, train.beta2),
            fused=context.device.type == "cuda", capturable=context.cuda_graphs,
        )  # fmt: skip
        self.loss = GeneratorLoss(train.lambda_l1, train.adversarial_weight)
        self.scale = scale_reconstruction(context)
        wrapped = distributed.wrap(self.critic, context.device)
        self.forward_critic: nn.Module = torch.compile(wrapped) if train.compile else wrapped
        #: The generator step's critic: the same object in one process, the bare module under DDP.
        self.frozen_critic: nn.Module = (
            self.forward_critic
            if wrapped is self.critic
            else (torch.compile(self.critic) if train.compile else self.critic)
        )

    def step(
        self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        ctx, critic = self.ctx, self.forward_critic
        with ctx.autocast():
            synthetic = ctx.generator(source)
        output = synthetic
        if self.scale is not None:
            synthetic, reconstruction, losses = self.scale(output, target, mask)
        pair = ctx.critic_pair(source)
        self.critic.requires_grad_(True)
        with ctx.autocast():
            real_score = critic(pair(target))
            fake_score = critic(pair(synthetic.detach()))
            loss_critic = LSGANLoss.critic(real_score, fake_score)
        self.optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss_critic)
        ctx.step(self.optimizer)
        # The generator step needs gradients through the critic, not of its weights.
        self.critic.requires_grad_(False)
        with ctx.autocast():
            fake_scores = self.frozen_critic(pair(synthetic))
            if self.scale is not None:
                adversarial = LSGANLoss.generator(fake_scores)
                total = self.loss.adversarial_weight * adversarial + reconstruction
                losses = {"loss_adv": adversarial.detach(), **losses}
            else:
                total, losses = self.generator_terms(fake_scores, synthetic, target, mask, source)
        trained = (ctx.optimizer, *self.generator_side)
        for optimizer in trained:
            optimizer.zero_grad(set_to_none=True)
        ctx.backward(total)
        for optimizer in trained:
            ctx.step(optimizer)
        ctx.update()
        return {"loss_critic": loss_critic.detach(), **losses}

    def generator_terms(
        self,
        fake_scores: torch.Tensor,
        synthetic: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None,
        source: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator step's loss and its logged parts: LSGAN + ``lambda_l1`` * L1. The seam of a variant
        that changes only the reconstruction term (one that registers the synthetic image onto the target)."""
        terms = self.loss(fake_scores, synthetic, target, mask)
        return terms.total, {"loss_adv": terms.adversarial, "loss_l1": terms.l1}

    @property
    def generator_side(self) -> tuple[torch.optim.Optimizer, ...]:
        """Optimisers the generator's loss steps besides the generator's own (a registration network's)."""
        return ()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    @property
    def modules(self) -> list[nn.Module]:
        return [self.critic]

    def state_dict(self) -> dict[str, Any]:
        return {
            "critic_state": self.critic.state_dict(),
            "optimizer_critic": self.optimizer.state_dict(),
            **self.ctx.scaler_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic_state"])
        self.optimizer.load_state_dict(state["optimizer_critic"])
        self.ctx.load_scaler_state(state)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "critic": {"name": self.ctx.config.model.critic, "init_args": dict(self.critic.init_args)},
            "lambda_l1": self.loss.lambda_l1,
            "adversarial_weight": self.loss.adversarial_weight,
            **_describe_scale(self.scale),
        }
