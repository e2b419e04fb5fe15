"""LSGAN and L1 losses on tensors with known values."""

from __future__ import annotations

import pytest
import torch

from medsynth.losses import GeneratorLoss, LSGANLoss, l1_loss, structure_loss


def test_lsgan_critic_value():
    real = torch.tensor([[1.0, 0.0], [3.0, 1.0]])  # (D-1)^2: 0, 1, 4, 0 -> mean 1.25
    fake = torch.tensor([[0.0, 2.0], [1.0, 1.0]])  # D^2: 0, 4, 1, 1 -> mean 1.5
    assert LSGANLoss.critic(real, fake).item() == pytest.approx(0.5 * (1.25 + 1.5))


def test_lsgan_optimum_is_zero():
    assert LSGANLoss.critic(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 0.0
    assert LSGANLoss.generator(torch.ones(2, 1, 3, 3)).item() == 0.0


def test_lsgan_generator_value_and_gradient():
    fake = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)  # (D-1)^2: 1, 1, 4 -> mean 2
    loss = LSGANLoss.generator(fake)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(fake.grad, (fake.detach() - 1) / 3)  # d/dD 0.5*mean((D-1)^2)


def test_l1_unmasked():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert l1_loss(pred, torch.zeros(2, 2)).item() == pytest.approx(2.5)


def test_l1_masked_mean_is_over_the_mask_and_broadcasts_over_channels():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[[1.0, 5.0], [9.0, 9.0]], [[3.0, 7.0], [9.0, 9.0]]]])
    mask = torch.tensor([[[[True, True], [False, False]]]])  # (1, 1, 2, 2): top row only
    assert l1_loss(pred, target, mask).item() == pytest.approx((1 + 5 + 3 + 7) / 4)


def test_l1_float_mask_weights_and_empty_mask():
    pred = torch.zeros(1, 1, 2)
    target = torch.tensor([[[2.0, 4.0]]])
    assert l1_loss(pred, target, torch.tensor([[[0.5, 0.0]]])).item() == pytest.approx(2.0)
    pred.requires_grad_(True)
    empty = l1_loss(pred, target, torch.zeros(1, 1, 2, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros(1, 1, 2))  # no NaN gradient from a background-only batch


def test_l1_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        l1_loss(torch.zeros(1, 1, 4), torch.zeros(1, 2, 4))


def test_generator_loss_combines_terms():
    fake_scores = torch.tensor([0.0, 0.0])  # adversarial 0.5
    pred, target = torch.zeros(1, 1, 4), torch.full((1, 1, 4), 0.2)  # L1 0.2
    terms = GeneratorLoss()(fake_scores, pred, target)
    assert terms.adversarial.item() == pytest.approx(0.5)
    assert terms.l1.item() == pytest.approx(0.2)
    assert terms.total.item() == pytest.approx(0.5 + 100 * 0.2)
    masked = GeneratorLoss(lambda_l1=10.0)(fake_scores, pred, target, torch.tensor([[[1, 0, 0, 0]]]))
    assert masked.total.item() == pytest.approx(0.5 + 10 * 0.2)


def test_generator_loss_backpropagates_to_prediction():
    pred = torch.zeros(1, 1, 4, requires_grad=True)
    terms = GeneratorLoss(lambda_l1=100.0)(torch.ones(3), pred, torch.ones(1, 1, 4))
    terms.total.backward()
    torch.testing.assert_close(pred.grad, torch.full((1, 1, 4), -25.0))  # 100 * d|p-1|/dp / 4
    assert not terms.l1.requires_grad and not terms.adversarial.requires_grad
    with pytest.raises(ValueError, match="lambda_l1"):
        GeneratorLoss(lambda_l1=-1.0)


def test_generator_loss_weights_the_adversarial_term_and_runs_without_a_critic() -> None:
    pred, target = torch.zeros(1, 1, 4), torch.full((1, 1, 4), 0.5)
    half = GeneratorLoss(lambda_l1=2.0, adversarial_weight=0.5)(torch.zeros(3), pred, target)
    assert half.adversarial.item() == pytest.approx(0.5) and half.total.item() == pytest.approx(0.25 + 1.0)
    alone = GeneratorLoss(lambda_l1=2.0)(None, pred, target)
    assert alone.adversarial.item() == 0.0 and alone.total.item() == pytest.approx(1.0)


def test_the_structure_loss_ignores_contrast_and_sees_a_shift():
    """MIND: an image and its inverted, rescaled copy share their structure; a copy moved by a voxel does not."""
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    image = torch.exp(-((rows - 14) ** 2 + (cols - 18) ** 2) / 18.0)[None, None]
    assert float(structure_loss(1.0 - 2.0 * image, image)) < 1e-5
    assert float(structure_loss(image.roll(1, dims=2), image)) > 0.01
