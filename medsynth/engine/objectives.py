"""Training objectives: what one optimisation step does, behind one seam the loop calls.

The loop (:class:`~medsynth.engine.trainer.Trainer`) owns the generator, its optimiser and the data;
an objective owns everything else a method needs (a critic and its optimiser for a GAN) and performs
one step. A new method (CycleGAN, a diffusion or flow-matching generator) is a new class registered in
:data:`OBJECTIVES`, selected with ``train.objective`` in a recipe; the loop does not change.

Every step returns its losses as *detached device tensors*: reading them forces the host to wait for
the GPU, so the loop reads them only when it logs.

Every backward and optimiser step goes through the context's gradient scaler (:meth:`_Context.backward`,
:meth:`_Context.step`, :meth:`_Context.update`): under fp16 autocast (cards of compute capability 7.x,
:func:`medsynth.model.device.choose_precision`) small gradients would underflow to zero without it; in
bf16 and fp32 it is disabled and each call is the plain ``backward()`` / ``optimizer.step()``. Its scale
is part of the objective's state, so a resumed run continues with it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..config import Config
from ..losses import GeneratorLoss, LSGANLoss, l1_loss, laplace_nll
from ..model.device import autocast, autocast_dtype
from ..model.networks import build_model_critic
from .distributed import Dist


class Objective(Protocol):
    """One training method; see the module docstring."""

    #: Losses a step reports, in order (columns of metrics.csv).
    loss_names: tuple[str, ...]

    def step(
        self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]: ...

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Its own optimisers (not the generator's); the loop sets their learning rates."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class _Context:
    """What every objective receives from the loop."""

    def __init__(
        self,
        config: Config,
        generator: nn.Module,
        in_channels: int,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        memory_format: torch.memory_format,
        precision: str,
        distributed: Dist | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        #: The generator's forward (possibly ``torch.compile``-d) and its input channels.
        self.config, self.generator, self.in_channels, self.optimizer = (
            config,
            generator,
            in_channels,
            optimizer,
        )
        self.device, self.memory_format, self.precision = device, memory_format, precision
        #: The torchrun job (one process when absent): wraps an objective's own networks in DDP.
        self.distributed = distributed or Dist()
        #: Loss scaling for fp16 (one scaler for every optimiser of a step, updated once per step);
        #: disabled, and then free, for bf16 and fp32.
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        #: Optimisers the scaler stepped since its last update (a step that stopped half-way leaves some).
        self._stepped: set[int] = set()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` on unscaled gradients; skipped when fp16 gradients overflowed."""
        if self.scaler.is_enabled():
            if id(optimizer) in self._stepped:
                # The previous step stopped between its optimiser steps (an out-of-memory the loop backed
                # off from, a failed CUDA-graph capture): the scaler would refuse a second step before an
                # update. Start its bookkeeping afresh; its scale and growth tracker are kept.
                fresh = torch.amp.GradScaler(self.device.type, enabled=True)
                fresh.load_state_dict(self.scaler.state_dict())
                fresh.scale(torch.zeros((), device=self.device))  # its scale tensor, for this step's loss
                self.scaler, self._stepped = fresh, set()
            self._stepped.add(id(optimizer))
        self.scaler.step(optimizer)

    def update(self) -> None:
        """End of a training step: the scaler grows or backs off its scale."""
        self.scaler.update()
        self._stepped.clear()

    def scaler_state(self) -> dict[str, Any]:
        """The scaler's state for the checkpoint (nothing when it is disabled)."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    @property
    def cuda_graphs(self) -> bool:
        """The step is captured in a CUDA graph (:mod:`.graphs`): capturable optimisers, no autocast cache."""
        return bool(self.config.train.cuda_graphs) and self.device.type == "cuda"

    def autocast(self) -> Any:
        return autocast(self.device, self.precision, cache=not self.cuda_graphs)

    def critic_pair(self, source: torch.Tensor) -> Any:
        """``image -> cat([source, image])`` in the autocast dtype (bf16 on a GPU, unchanged on a CPU).

        The critic's first convolution would cast a float32 concatenation to bf16 anyway; casting the
        source once per step and concatenating in bf16 gives the same values without three float32
        concatenations and their casts (a bf16 ``synthetic`` used to be promoted to float32 and back).
        """
        dtype = autocast_dtype(self.device, self.precision) or source.dtype
        low = source.to(dtype)
        return lambda image: torch.cat([low, image.to(dtype)], dim=1)


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


class L1Objective:
    """Reconstruction only: ``lambda_l1 * L1(G(x), y)``, no critic (the pix2pix paper's "L1 alone").

    With ``model.predict_scale`` the term is the Laplace NLL (:class:`ScaleReconstruction`).
    """

    loss_names = ("loss_l1",)

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

    def state_dict(self) -> dict[str, Any]:
        return self.ctx.scaler_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state beyond the generator's, and the fp16 gradient scaler's."""
        self.ctx.load_scaler_state(state)

    def describe(self) -> dict[str, Any]:
        return {"name": "l1", "lambda_l1": self.loss.lambda_l1, **_describe_scale(self.scale)}


def _describe_scale(scale: ScaleReconstruction | None) -> dict[str, Any]:
    return {} if scale is None else {"reconstruction": "laplace_nll", "laplace_beta": scale.beta}


class GANObjective:
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

    loss_names = ("loss_critic", "loss_adv", "loss_l1")

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
                terms = self.loss(fake_scores, synthetic, target, mask)
                total, losses = terms.total, {"loss_adv": terms.adversarial, "loss_l1": terms.l1}
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.backward(total)
        ctx.step(ctx.optimizer)
        ctx.update()
        return {"loss_critic": loss_critic.detach(), **losses}

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

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
            "name": "gan",
            "critic": {"name": self.ctx.config.model.critic, "init_args": dict(self.critic.init_args)},
            "lambda_l1": self.loss.lambda_l1,
            "adversarial_weight": self.loss.adversarial_weight,
            **_describe_scale(self.scale),
        }


#: ``train.objective`` -> class; :data:`medsynth.config.OBJECTIVES` lists the same names for validation.
OBJECTIVES: dict[str, type] = {"gan": GANObjective, "l1": L1Objective}


def build_objective(name: str, **context: Any) -> Objective:
    """The objective registered as ``name``, given the loop's generator, optimiser, device and recipe."""
    return OBJECTIVES[name](_Context(**context))
