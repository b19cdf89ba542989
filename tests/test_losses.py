"""Tests of the segmentation losses on small hand-made logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segloop.errors import ConfigError
from train.losses import SegmentationLoss, cross_entropy, soft_dice_loss

C = 3


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, 16, 16, generator=g)
    target = torch.randint(0, C, (2, 16, 16), generator=g)
    target[:, :3] = 255  # an ignored band
    return logits, target


def _confident(target: torch.Tensor, shift: int = 0, scale: float = 50.0) -> torch.Tensor:
    """Logits that put (almost) all mass on class ``(target + shift) % C``."""
    labels = (target.clamp(max=C - 1) + shift) % C
    return F.one_hot(labels, C).permute(0, 3, 1, 2).float() * scale


def test_cross_entropy_matches_torch_with_ignore_and_weight() -> None:
    logits, target = _batch()
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    weight = [1.0, 2.0, 0.5]
    torch.testing.assert_close(
        cross_entropy(logits, target, weight=weight),
        F.cross_entropy(logits, target, weight=torch.tensor(weight), ignore_index=255),
    )


def test_all_ignored_gives_zero_not_nan() -> None:
    logits = torch.randn(1, C, 8, 8, requires_grad=True)
    target = torch.full((1, 8, 8), 255)
    for loss in (cross_entropy(logits, target), soft_dice_loss(logits, target), SegmentationLoss()(logits, target)):
        assert loss.item() == 0.0
        loss.backward()


def test_dice_perfect_is_zero_and_wrong_is_one() -> None:
    target = torch.randint(0, C, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    assert soft_dice_loss(_confident(target), target).item() == pytest.approx(0.0, abs=1e-4)
    assert soft_dice_loss(_confident(target, shift=1), target).item() == pytest.approx(1.0, abs=1e-2)
    # uniform prediction sits in between
    assert 0.2 < soft_dice_loss(torch.zeros(2, C, 32, 32), target).item() < 0.8


def test_dice_formula_on_a_tiny_case() -> None:
    # one image, 2 classes, 4 pixels; class 1 absent from the target is skipped
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 1e-12], [0.25, 0.75]])).T.reshape(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    p0 = torch.tensor([0.75, 0.5, 1.0, 0.25])
    dice0 = (2 * p0.sum() + 1) / (p0.sum() + 4 + 1 + 1e-7)
    torch.testing.assert_close(soft_dice_loss(logits, target), 1 - dice0)


def test_ignored_pixels_do_not_change_the_loss() -> None:
    logits, target = _batch()
    other = logits.clone()
    ignored = (target == 255).unsqueeze(1).expand_as(other)
    other[ignored] = torch.randn(int(ignored.sum())) * 10
    loss = SegmentationLoss(ce_weight=1.0, dice_weight=1.0)
    for fn in (cross_entropy, soft_dice_loss, loss):
        torch.testing.assert_close(fn(logits, target), fn(other, target))
    # and their gradient is exactly zero
    logits.requires_grad_(True)
    soft_dice_loss(logits, target).backward()
    assert logits.grad[ignored].abs().max() == 0


def test_dice_gradient_on_true_class_logit_is_negative() -> None:
    logits, target = _batch(seed=2)
    logits.requires_grad_(True)
    soft_dice_loss(logits, target).backward()
    valid = target != 255
    labels = torch.where(valid, target, 0)
    grad_true = logits.grad.gather(1, labels.unsqueeze(1)).squeeze(1)[valid]
    assert (grad_true < 0).all()
    # and a small step along -grad lowers the loss
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert soft_dice_loss(stepped, target) < soft_dice_loss(logits.detach(), target)


def test_combined_loss_is_the_weighted_sum_and_reports_components() -> None:
    logits, target = _batch()
    loss_fn = SegmentationLoss(ce_weight=0.7, dice_weight=0.3)
    logits.requires_grad_(True)
    total = loss_fn(logits, target)
    ce, dice = cross_entropy(logits, target), soft_dice_loss(logits, target)
    torch.testing.assert_close(total, 0.7 * ce + 0.3 * dice)
    assert set(loss_fn.components) == {"loss/ce", "loss/dice", "loss/total"}
    torch.testing.assert_close(loss_fn.components["loss/ce"], ce.detach())
    torch.testing.assert_close(loss_fn.components["loss/dice"], dice.detach())
    assert not loss_fn.components["loss/total"].requires_grad
    total.backward()
    assert logits.grad is not None
    torch.testing.assert_close(SegmentationLoss(1.0, 0.0)(logits, target), ce)
    torch.testing.assert_close(SegmentationLoss(0.0, 2.0)(logits, target), 2 * dice)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ce_weight": -1.0}, "ce_weight"),
        ({"dice_weight": float("nan")}, "dice_weight"),
        ({"ce_weight": 0.0, "dice_weight": 0.0}, "both 0"),
        ({"ce_weight": "1"}, "ce_weight"),
    ],
)
def test_invalid_weights_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SegmentationLoss(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_bad_shapes_and_labels_are_value_errors() -> None:
    logits, target = _batch()
    with pytest.raises(ValueError, match="logits"):
        SegmentationLoss()(logits, target[:, :8])
    with pytest.raises(ValueError, match=r"label\(s\) \[7\]"):
        SegmentationLoss()(logits, torch.full_like(target, 7))
    with pytest.raises(ValueError, match="num_classes=4"):
        soft_dice_loss(logits, target, num_classes=4)
