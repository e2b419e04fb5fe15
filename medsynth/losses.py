"""Training losses: least-squares adversarial terms (Mao et al., LSGAN) and masked L1.

Convention (Mao et al., eq. 2 with a=0, b=c=1), every square averaged over the critic's score map:

* critic:    ``0.5 * mean((D(x, y) - 1)**2) + 0.5 * mean(D(x, G(x))**2)``
* generator: ``0.5 * mean((D(x, G(x)) - 1)**2)``

The generator's 0.5 makes its adversarial term half of pix2pix's (which drops the factor); with the
usual ``lambda_l1 = 100`` the L1 term dominates either way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.nn import functional as F

#: pix2pix's weight of the L1 term relative to the adversarial one.
DEFAULT_LAMBDA_L1 = 100.0


class LSGANLoss:
    """Least-squares GAN loss on raw critic scores (no sigmoid), for the critic and the generator step."""

    @staticmethod
    def critic(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """Push scores of real pairs to 1 and of synthetic pairs (detached from the generator) to 0."""
        return 0.5 * ((real_scores - 1).square().mean() + fake_scores.square().mean())

    @staticmethod
    def generator(fake_scores: torch.Tensor) -> torch.Tensor:
        """Push the critic's scores of synthetic pairs to 1 (the generator wants them taken as real)."""
        return 0.5 * (fake_scores - 1).square().mean()


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error, over the voxels where ``mask`` is set when a mask is given.

    ``mask`` (bool or float weights) broadcasts against ``pred``, e.g. ``(B, 1, ...)`` for a
    multi-channel ``pred``; the mean divides by the mask's total weight over all broadcast channels,
    so background voxels neither count nor dilute the loss. An empty mask gives 0, not NaN, so a batch
    of background-only slices cannot poison training.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"l1_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    error = (pred - target).abs()
    if mask is None:
        return error.mean()
    weights = mask.to(error.dtype).expand_as(error)
    # An empty mask makes the numerator 0 as well; the clamp turns 0/0 into 0 without a data-dependent branch.
    return (error * weights).sum() / weights.sum().clamp_min(torch.finfo(error.dtype).tiny)


class GeneratorLossTerms(NamedTuple):
    """The generator's loss and its parts (parts detached, for logging)."""

    total: torch.Tensor
    adversarial: torch.Tensor
    l1: torch.Tensor


class GeneratorLoss:
    """pix2pix generator objective: ``adversarial_weight * LSGAN generator term + lambda_l1 * L1``.

    ``fake_scores=None`` (training without a critic) leaves the L1 term alone; ``mask`` restricts L1.

    Example:
        >>> loss = GeneratorLoss(lambda_l1=100.0)
        >>> terms = loss(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 0.1))
        >>> round(terms.total.item(), 4), terms.adversarial.item()
        (10.0, 0.0)
    """

    def __init__(self, lambda_l1: float = DEFAULT_LAMBDA_L1, adversarial_weight: float = 1.0) -> None:
        if lambda_l1 < 0 or adversarial_weight < 0:
            raise ValueError(
                f"GeneratorLoss: lambda_l1 and adversarial_weight must be >= 0, got {lambda_l1}, {adversarial_weight}"
            )
        self.lambda_l1 = lambda_l1
        self.adversarial_weight = adversarial_weight

    def __call__(
        self,
        fake_scores: torch.Tensor | None,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> GeneratorLossTerms:
        l1 = l1_loss(pred, target, mask)
        if fake_scores is None:
            adversarial = torch.zeros((), dtype=l1.dtype, device=l1.device)
        else:
            adversarial = LSGANLoss.generator(fake_scores)
        total = self.adversarial_weight * adversarial + self.lambda_l1 * l1
        return GeneratorLossTerms(total, adversarial.detach(), l1.detach())


#: Bounds of a predicted log-scale: b in [1e-3, 7.4] normalised units (the target spans 2).
LOG_SCALE_RANGE = (-6.9, 2.0)


def laplace_nll(
    mean: torch.Tensor,
    log_scale: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
) -> torch.Tensor:
    """Laplace negative log-likelihood ``|y - mean| / b + log b`` (constant dropped), masked mean.

    At a fixed ``b = 1`` it is the L1 loss; learning ``b`` per voxel makes ``b`` an estimate of the
    expected absolute error there (the minimiser of the NLL in ``b`` is ``b = |y - mean|``), i.e. a
    calibrated uncertainty map. ``beta`` weights each voxel's NLL by ``b.detach() ** beta`` (the
    beta-NLL of Seitzer et al., 2022): with ``beta = 1`` the mean's gradient is exactly L1's (the image
    trains as before) while ``b`` still converges to the expected error; ``beta = 0`` is the plain NLL,
    which down-weights hard voxels in the mean's training. ``log_scale`` is clamped to
    :data:`LOG_SCALE_RANGE`.

    Example:
        >>> y = torch.tensor([[0.5, -0.5]])
        >>> laplace_nll(torch.zeros(1, 2), torch.zeros(1, 2), y, beta=0.0).item()  # L1 at b = 1
        0.5
    """
    if not (mean.shape == log_scale.shape == target.shape):
        raise ValueError(
            f"laplace_nll: mean {tuple(mean.shape)}, log_scale {tuple(log_scale.shape)} and target "
            f"{tuple(target.shape)} must have one shape"
        )
    log_b = log_scale.float().clamp(*LOG_SCALE_RANGE)
    nll = (target - mean).abs() * torch.exp(-log_b) + log_b
    if beta:
        nll = nll * torch.exp(beta * log_b.detach())
    if mask is None:
        return nll.mean()
    weights = mask.to(nll.dtype).expand_as(nll)
    return (nll * weights).sum() / weights.sum().clamp_min(torch.finfo(nll.dtype).tiny)


#: Offsets (rows, columns) of the MIND descriptor: the eight neighbours at two voxels, the scale of a
#: tissue boundary at the demo's 2 mm.
MIND_OFFSETS = ((-2, 0), (2, 0), (0, -2), (0, 2), (-2, -2), (-2, 2), (2, -2), (2, 2))
#: Standard deviation (voxels) of the Gaussian patch over which squared differences are summed.
MIND_SIGMA = 1.0


def mind_descriptor(image: torch.Tensor) -> torch.Tensor:
    """MIND (Heinrich et al., Medical Image Analysis 2012) of each 2D image of ``(B, 1, H, W)``.

    For each voxel and offset ``r``: ``exp(-D_r / V)``, where ``D_r`` is the Gaussian-weighted patch sum of
    ``(I(x) - I(x + r))**2`` and ``V`` the mean of ``D_r`` over the offsets, divided by its maximum over the
    offsets. It says where a voxel's neighbourhood changes, not by how much nor which way, so a T1w and a
    T2w of one head (contrasts inverted) share it where their boundaries agree, and it moves with them.
    MONAI has no MIND; its local NCC is the nearest and does not see past a window's mean. Computed in
    float32 (the exponent of a bf16 ratio is too coarse for the small differences it compares).

    Example:
        >>> image = torch.zeros(1, 1, 16, 16)
        >>> image[..., 8:] = 1.0
        >>> torch.allclose(mind_descriptor(image), mind_descriptor(1.0 - 3.0 * image))  # contrast-free
        True
    """
    image = image.float()
    radius = math.ceil(2 * MIND_SIGMA)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / MIND_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    distances = []
    for dy, dx in MIND_OFFSETS:
        squared = (image - torch.roll(image, shifts=(dy, dx), dims=(-2, -1))).square()
        squared = F.conv2d(squared, kernel.view(1, 1, -1, 1), padding=(radius, 0))
        distances.append(F.conv2d(squared, kernel.view(1, 1, 1, -1), padding=(0, radius)))
    distance = torch.cat(distances, dim=1)
    variance = distance.mean(dim=1, keepdim=True)
    # Flat regions (the background's floor) have no variance; a floor relative to the image's mean keeps
    # their descriptor finite and uniform (the usual clamp of MIND implementations).
    floor = variance.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-6) * 1e-3
    descriptor = torch.exp(-distance / variance.clamp_min(floor))
    return descriptor / descriptor.amax(dim=1, keepdim=True)


def structure_loss(
    synthetic: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean absolute difference of the MIND descriptors of ``(B, 1, H, W)`` images, inside ``mask``.

    A synthetic image must keep its input's boundaries whatever its intensities (the structure term of
    Yang et al., DLMIA 2018): a term that ties where anatomy lies to the input alone, not to a target.
    """
    return l1_loss(mind_descriptor(synthetic), mind_descriptor(source), mask)
