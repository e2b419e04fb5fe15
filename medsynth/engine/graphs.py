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

A capture that fails (an operation that synchronises with the host or is not allowed while a stream
captures, in a network or a loss) is not fatal: one log line names the operation's file, line and code,
and the step runs eagerly from then on, starting with the batch whose capture failed. An out-of-memory
during the capture is left to the caller, which backs off the batch (:mod:`medsynth.engine.trainer`).
"""

from __future__ import annotations

import linecache
import logging
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("medsynth")

#: A capturable objective's step (``source, target, mask``: the pix2pix objectives' inputs); an objective
#: that takes other entries is not capturable and never reaches this module.
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
        #: Why the capture failed (one line), once it has: the step then runs eagerly.
        self.failure: str | None = None
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
        if self.failure is not None:
            return self.step(source, target, mask)
        if not self.captured and self.steps <= self.warmup:
            return self.backend.warm(lambda: self.step(source, target, mask))
        if not self.captured:
            out_of_memory = ""
            try:
                self._capture(source, target, mask)
            except Exception as exc:  # any failure of the capture: say where, then train eagerly
                # Ending a capture that ran out of memory raises again, with the out-of-memory as context.
                out_of_memory = next(
                    (str(e) for e in _chain(exc) if isinstance(e, torch.OutOfMemoryError)), ""
                )
                self.failure = None if out_of_memory else capture_failure(exc)
            if out_of_memory:  # the trainer's back-off halves the batch and captures anew
                self._abandon()
                raise torch.OutOfMemoryError(out_of_memory)
            if self.failure is not None:
                self._abandon()
                log.warning(
                    "CUDA graph capture failed at %s; the training step runs eagerly from now on "
                    "(set train.cuda_graphs=false to skip the attempt)",
                    self.failure,
                )
                return self.step(source, target, mask)
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

    def _abandon(self) -> None:
        """Forget a failed capture: its buffers, and gradients that live in its memory pool."""
        self._inputs, self._outputs, self._lr, self._lr_values = None, None, [], []
        self.backend.graph = None
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

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


#: Frames of the capture machinery itself: the operation that broke a capture is called from outside them.
_CAPTURE_FRAMES = ("torch/cuda/graphs.py", "medsynth/engine/graphs.py", "contextlib.py")


def capture_failure(exc: BaseException) -> str:
    """One line on what broke a capture: the innermost call outside the capture machinery (file, line and
    the code there, which names the operation), the medsynth line that led to it, and the error's first line.

    Example: ``torch/nn/functional.py:4571 `return torch._C._nn.upsample_nearest2d(...)` from
    medsynth/nets/unet.py:88 `x = F.interpolate(x, scale_factor=2)` (RuntimeError: CUDA error: operation
    not permitted when stream is capturing)``.
    """
    # A failed operation invalidates the capture, and ending it raises again ("operation failed due to a
    # previous error during capture") from inside torch: the first error of the chain names the operation.
    frames: list[traceback.FrameSummary] = []
    chain = _chain(exc)
    for exc in reversed(chain):
        frames = [
            f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith(_CAPTURE_FRAMES)
        ]
        if frames:
            break
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if not frames:
        return f"the capture itself ({error})"
    ours = [f for f in frames if _ours(f.filename)]
    where = _where(frames[-1])
    if ours and ours[-1] is not frames[-1]:
        where += f" from {_where(ours[-1])}"
    return f"{where} ({error})"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised while handling, outermost first."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__context__
    return chain


def _where(frame: traceback.FrameSummary, limit: int = 100) -> str:
    """``file:line `code``` (a statement over several lines joined into one, shortened to ``limit``)."""
    first = frame.lineno or 0
    last = max(getattr(frame, "end_lineno", None) or first, first)
    lines = [linecache.getline(frame.filename, n).strip() for n in range(first, min(last, first + 10) + 1)]
    code = " ".join(line for line in lines if line) or (frame.line or "").strip()
    code = code.replace("( ", "(").replace(" )", ")")
    if len(code) > limit:
        code = code[: limit - 3] + "..."
    return f"{_short_path(frame.filename)}:{frame.lineno} `{code}`"


#: The medsynth package folder: frames under it are "ours".
_PACKAGE = Path(__file__).resolve().parents[1]


def _ours(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(_PACKAGE)


def _short_path(filename: str) -> str:
    """``medsynth/losses.py``, ``torch/nn/modules/conv.py`` (from site-packages), or relative to the
    working folder."""
    path = Path(filename).resolve()
    packages = [p for p in path.parents if p.name in ("site-packages", "dist-packages")]
    for root in (*packages, _PACKAGE.parent):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return filename


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
