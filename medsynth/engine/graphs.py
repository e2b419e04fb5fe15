"""A whole training step captured once in a CUDA graph and replayed (``train.cuda_graphs``).

Why: on a GPU, a small step is bound by a fixed cost of launching its few hundred kernels from Python
(about 9-14 ms per eager pix2pix step on an H100, ``/work/shared/gpu-measurements.md``), not by
arithmetic. Replaying a captured graph launches them all at once: the measured ``demo_cpu`` networks
went from 14 to 49 TFLOP/s at batch 64 (2 -> 14 at batch 8), the batch-norm pix2pix networks at 128²
from 69 to 144 TFLOP/s. Instance-norm networks at 256² gain little (125 -> 128): they are bound by the
norm kernels, not by launches.

What a graph needs, and how the loop provides it:

* static shapes: the loader drops the last partial batch, so every batch has the recipe's shape;
* static input buffers: each batch is copied into the tensors the graph was captured with;
* an optimiser whose state lives on the GPU: Adam with ``capturable=True`` (the trainer and the GAN
  objective build it so when graphs are on), and learning rates that are *tensors* during capture, so
  that the schedule (a float in ``param_groups``, as everywhere else) is written into them before each
  replay without recapturing;
* no host synchronisation inside the step (the objectives return detached device tensors, which are
  cloned out of the graph's static outputs here);
* autocast without its weight-cast cache (``cache_enabled=False``), as PyTorch requires inside a capture.

The first ``warmup`` steps run eagerly on a side stream (cuDNN algorithm choice, optimiser state,
lazily built buffers), then the step is captured and replayed from then on. On a CPU there is nothing to
capture: :func:`graphed_step` logs one line and returns the eager step unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger("medsynth")

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]


class CudaCapture:
    """The real backend: ``torch.cuda.graph`` capture, ``CUDAGraph.replay``, side-stream warm-up."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph: Any = None

    def warm(self, function: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = function()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return out

    def capture(self, function: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return function()

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """Call like the objective's ``step``; captures it after ``warmup`` eager steps, then replays."""

    def __init__(
        self,
        step: Step,
        optimizers: Sequence[torch.optim.Optimizer],
        device: torch.device,
        *,
        warmup: int = 3,
        backend: Any = None,
    ) -> None:
        self.step, self.optimizers, self.device, self.warmup = step, list(optimizers), device, warmup
        self.backend = backend if backend is not None else CudaCapture(device)
        self.steps = 0
        self._inputs: tuple[torch.Tensor | None, ...] | None = None
        self._outputs: dict[str, torch.Tensor] | None = None
        #: (optimiser, group index, device tensor read by the captured optimiser step), and the float it holds.
        #: Groups are found by index at each replay: ``load_state_dict`` replaces the group dicts.
        self._lr: list[tuple[torch.optim.Optimizer, int, torch.Tensor]] = []
        self._lr_values: list[float] = []

    @property
    def captured(self) -> bool:
        return self._outputs is not None

    def __call__(
        self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        self.steps += 1
        if not self.captured and self.steps <= self.warmup:
            return self.backend.warm(lambda: self.step(source, target, mask))
        if not self.captured:
            self._capture(source, target, mask)
        self._feed(source, target, mask)
        self.backend.replay()
        assert self._outputs is not None
        # Clones: the graph overwrites its outputs at the next replay, the loop sums these later.
        return {key: value.clone() for key, value in self._outputs.items()}

    def _capture(self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None and mask.shape[0] != source.shape[0]:  # pragma: no cover - loader guarantees it
            raise ValueError("a captured step needs equal batches")
        self._inputs = (source.clone(), target.clone(), None if mask is None else mask.clone())
        self._lr = [
            (optimizer, index, torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device))
            for optimizer in self.optimizers
            for index, group in enumerate(optimizer.param_groups)
        ]
        self._lr_values = [float(o.param_groups[i]["lr"]) for o, i, _ in self._lr]
        for optimizer in self.optimizers:  # backward() then allocates the grads in the graph's pool
            optimizer.zero_grad(set_to_none=True)
        for optimizer, index, tensor in self._lr:
            optimizer.param_groups[index]["lr"] = tensor
        try:
            static_source, static_target, static_mask = self._inputs
            assert static_source is not None and static_target is not None
            self._outputs = self.backend.capture(lambda: self.step(static_source, static_target, static_mask))
        finally:  # the schedule, checkpoints and logs keep seeing floats
            for (optimizer, index, _), value in zip(self._lr, self._lr_values, strict=True):
                optimizer.param_groups[index]["lr"] = value
        log.info("training step captured in a CUDA graph after %d eager warm-up steps", self.warmup)

    def _feed(self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Copy the batch into the static inputs and the current learning rates into their tensors."""
        assert self._inputs is not None
        for static, value in zip(self._inputs, (source, target, mask), strict=True):
            if static is not None and value is not None:
                static.copy_(value, non_blocking=True)
        for number, (optimizer, index, tensor) in enumerate(self._lr):
            value = float(optimizer.param_groups[index]["lr"])
            if value != self._lr_values[number]:  # the schedule moved: one fill kernel, no host sync
                tensor.fill_(value)
                self._lr_values[number] = value


def graphs_apply(device: torch.device) -> bool:
    """CUDA graphs capture CUDA work only."""
    return device.type == "cuda"


def graphed_step(
    step: Step, optimizers: Sequence[torch.optim.Optimizer], device: torch.device, *, enabled: bool
) -> Step:
    """``step`` captured in a CUDA graph when ``enabled`` on a CUDA device; else ``step`` itself.

    ``train.cuda_graphs`` on a CPU is not an error (a GPU recipe also runs on a laptop): one log line
    says it is ignored.
    """
    if not enabled:
        return step
    if not graphs_apply(device):
        log.info("train.cuda_graphs applies to CUDA devices only; the step runs eagerly on %s", device)
        return step
    torch.backends.cudnn.benchmark = True  # static shapes: choose each convolution's fastest algorithm once
    return GraphedStep(step, optimizers, device)
