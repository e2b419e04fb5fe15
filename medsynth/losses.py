"""Training losses: least-squares adversarial terms (Mao et al., LSGAN) and masked L1.

Convention (Mao et al., eq. 2 with a=0, b=c=1), every square averaged over the critic's score map:

* critic:    ``0.5 * mean((D(x, y) - 1)**2) + 0.5 * mean(D(x, G(x))**2)``
* generator: ``0.5 * mean((D(x, G(x)) - 1)**2)``

The generator's 0.5 makes its adversarial term half of pix2pix's (which drops the factor); with the
usual ``lambda_l1 = 100`` the L1 term dominates either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
