"""Semantic segmentation losses: cross-entropy with an ignore index, soft Dice, and their sum.

Cross-entropy gives well-behaved per-pixel gradients; soft Dice counters class imbalance
(a thin "border" class next to a large background) by scoring overlap per class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segloop.errors import ConfigError

__all__ = ["SegmentationLoss", "cross_entropy", "soft_dice_loss"]

IGNORE_INDEX = 255


def _check_shapes(logits: Tensor, target: Tensor) -> None:
    same_pixels = logits.dim() == 4 and target.dim() == 3 and logits.shape[0] == target.shape[0]
    if not same_pixels or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"expected logits [B,C,H,W] and target [B,H,W] of the same B,H,W, "
            f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )


def _check_labels(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Reject labels outside ``[0, num_classes)`` that are not ``ignore_index`` (a dataset bug)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = torch.unique(target[bad])[:5].tolist()
        raise ValueError(
            f"target holds label(s) {values} outside [0, {num_classes}) that are not ignore_index={ignore_index}"
        )


def _as_weight(weight: Tensor | Sequence[float] | None, logits: Tensor) -> Tensor | None:
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=logits.dtype, device=logits.device)
    if weight.shape != (logits.shape[1],):
        raise ValueError(
            f"class weight must have {logits.shape[1]} entries (one per class), got shape {tuple(weight.shape)}"
        )
    return weight


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    weight: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Pixel-wise cross-entropy, mean over non-ignored pixels.

    Same as ``F.cross_entropy`` except that a batch with every pixel ignored gives 0
    (with a graph) instead of NaN, so one empty crop cannot poison a run.
    """
    _check_shapes(logits, target)
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=_as_weight(weight, logits), ignore_index=ignore_index)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1.0,
    eps: float = 1e-7,
) -> Tensor:
    r"""Multi-class soft Dice loss over softmax probabilities.

    With :math:`p_{c,i}` the softmax probability of class :math:`c` at pixel :math:`i`,
    :math:`g_{c,i}` the one-hot target and :math:`V` the non-ignored pixels of the whole batch:

    .. math::
        D_c = \frac{2 \sum_{i \in V} p_{c,i} g_{c,i} + s}{\sum_{i \in V} p_{c,i} + \sum_{i \in V} g_{c,i} + s + \epsilon},
        \qquad L = 1 - \frac{1}{|P|} \sum_{c \in P} D_c

    where :math:`P` is the set of classes present in the (non-ignored) target and :math:`s` is
    ``smooth``. Ignored pixels are left out of numerator and denominator; classes absent from
    the target are skipped (their Dice would only reward predicting nothing), although their
    probability mass still lowers the Dice of the present classes. Sums run over the batch,
    not per image, so small objects in one image do not dominate. Returns 0 when no pixel is valid.
    """
    _check_shapes(logits, target)
    c = logits.shape[1]
    if num_classes is not None and num_classes != c:
        raise ValueError(f"num_classes={num_classes} but logits have {c} channels")
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0

    probs = logits.float().softmax(dim=1)
    mask = valid.unsqueeze(1).to(probs.dtype)  # [B,1,H,W]
    labels = torch.where(valid, target, torch.zeros_like(target))
    one_hot = F.one_hot(labels, c).permute(0, 3, 1, 2).to(probs.dtype) * mask
    probs = probs * mask

    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + smooth) / (cardinality + smooth + eps)
    present = one_hot.sum(dims) > 0
    return 1.0 - dice[present].mean()


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + dice_weight * soft Dice``.

    ``forward`` returns the total; ``self.components`` then holds the detached parts under
    the metric names the trainer logs (``loss/ce``, ``loss/dice``, ``loss/total``).
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        class_weight: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        for label, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"loss {label} must be a finite number >= 0, got {value!r}")
        if ce_weight == 0 and dice_weight == 0:
            raise ConfigError("loss ce_weight and dice_weight are both 0; at least one must be > 0")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ConfigError(f"loss ignore_index must be an integer, got {ignore_index!r}")
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ignore_index = ignore_index
        self.class_weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
        self.components: dict[str, Tensor] = {}

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, dice_weight={self.dice_weight}, ignore_index={self.ignore_index}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_shapes(logits, target)
        _check_labels(target, logits.shape[1], self.ignore_index)
        ce = cross_entropy(logits, target, ignore_index=self.ignore_index, weight=self.class_weight)
        dice = soft_dice_loss(logits, target, ignore_index=self.ignore_index)
        total = self.ce_weight * ce + self.dice_weight * dice
        self.components = {"loss/ce": ce.detach(), "loss/dice": dice.detach(), "loss/total": total.detach()}
        return total
