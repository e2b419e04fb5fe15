"""What every training objective shares: the protocol the loop calls and the context it hands over.

See the package docstring (:mod:`medsynth.engine.objectives`) for the seam itself.

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

from ...config import Config
from ...model.device import autocast, autocast_dtype
from ...model.plan import SynthesisPlan
from ..distributed import Dist


class Objective(Protocol):
    """One training method; see the package docstring."""

    #: Losses a step reports, in order (columns of metrics.csv).
    loss_names: tuple[str, ...]
    #: Batch entries :meth:`step` takes, in order (:data:`BATCH_ENTRIES`); an entry the batch lacks is
    #: passed as None, and masks are passed only with ``train.masked_l1``.
    inputs: tuple[str, ...]
    #: Whether the step may be captured in a CUDA graph (no host-side decisions inside it).
    capturable: bool
    #: Whether validation registers each held-out target onto its source before scoring it (a method
    #: that trains through misalignment; ``train.register_validation`` asks it of any paired method).
    registers_validation: bool

    @staticmethod
    def check_config(config: Config) -> None:
        """Refuse a recipe the method cannot train (one line), before any data or network is built."""
        ...

    def step(self, *batch: torch.Tensor | None) -> dict[str, torch.Tensor]: ...

    @property
    def modules(self) -> list[nn.Module]:
        """Networks it trains besides the loop's generator (compared across torchrun ranks)."""
        ...

    def directions(self) -> list[tuple[SynthesisPlan, nn.Module]]:
        """Further inference directions it trains (a reverse generator), with their plans; else []."""
        ...

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
        plan: SynthesisPlan | None = None,
    ) -> None:
        #: The generator's forward (possibly ``torch.compile``-d) and its input channels.
        self.config, self.generator, self.in_channels, self.optimizer = (
            config,
            generator,
            in_channels,
            optimizer,
        )
        self.device, self.memory_format, self.precision = device, memory_format, precision
        #: How the loop's generator is run at inference (its task, window, context): an objective that
        #: trains another direction derives that direction's plan from it.
        self.plan = plan
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


#: Batch entries an objective may ask for (:attr:`Objective.inputs`): the source channels, the target's
#: centre slice, the foreground mask of the source slice; the target's own 2.5D neighbourhood
#: ``(B, context, H, W)`` and foreground, which differ from the source's when the data is unpaired.
BATCH_ENTRIES = ("source", "target", "mask", "target_stack", "target_mask")
#: Entries that are masks: moved to the device only with ``train.masked_l1``.
MASK_ENTRIES = ("mask", "target_mask")


def step_inputs(
    objective: Objective, batch: dict[str, torch.Tensor], device: torch.device,
    memory_format: torch.memory_format, masked: bool,
) -> list[torch.Tensor | None]:  # fmt: skip
    """The batch entries ``objective.inputs`` names, on the device in the run's memory format; None for an
    entry the batch lacks, and for masks unless ``train.masked_l1``."""
    inputs: list[torch.Tensor | None] = []
    for name in objective.inputs:
        value = batch.get(name)
        if value is None or (name in MASK_ENTRIES and not masked):
            inputs.append(None)
        elif name in MASK_ENTRIES:
            inputs.append(value.to(device, non_blocking=True))
        else:
            inputs.append(value.to(device, non_blocking=True).contiguous(memory_format=memory_format))
    return inputs
