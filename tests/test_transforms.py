"""Joint image/target transforms keep images, masks and boxes consistent."""

from __future__ import annotations

import pytest
import torch

from segloop.errors import ConfigError
from train.transforms import (
    IMAGENET_MEAN,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomScaleCrop,
    Resize,
    ToFloat,
    eval_transforms,
    train_transforms,
)


def _semantic(h: int = 40, w: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.int64)
    mask[5:20, 4:30] = 1
    mask[22:35, 30:50] = 2
    mask[0:3, 0:3] = 255
    return image, mask


def _instances(h: int = 40, w: int = 56) -> tuple[torch.Tensor, dict]:
    """Three rectangles with boxes exactly at their pixel extents (xyxy, exclusive max)."""
    rects = [(2, 3, 12, 20), (30, 10, 50, 30), (20, 25, 28, 38)]  # x1, y1, x2, y2
    masks = torch.zeros(len(rects), h, w, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = 1
    target = {
        "boxes": torch.tensor(rects, dtype=torch.float32),
        "labels": torch.tensor([1, 2, 3]),
        "masks": masks,
        "image_id": 4,
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.tensor([0, 0, 1]),
    }
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8), target


def _mask_box(m: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_flip_semantic_and_instances():
    image, mask = _semantic()
    out_image, out_mask = RandomHorizontalFlip(p=1.0)(image, mask)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_mask, mask.flip(-1))
    assert RandomHorizontalFlip(p=0.0)(image, mask)[1] is mask

    image, target = _instances()
    _, out = RandomHorizontalFlip(p=1.0)(image, target)
    for k in range(3):
        assert torch.equal(out["masks"][k], target["masks"][k].flip(-1))
        assert out["boxes"][k].tolist() == _mask_box(out["masks"][k])
    assert torch.equal(out["labels"], target["labels"]) and out["image_id"] == 4


def test_resize_keeps_label_set_and_scales_boxes():
    image, mask = _semantic()
    out_image, out_mask = Resize((23, 37))(image, mask)
    assert out_image.shape == (3, 23, 37) and out_image.dtype == torch.uint8
    assert out_mask.dtype == torch.int64 and set(out_mask.unique().tolist()) <= {0, 1, 2, 255}
    assert {1, 2} <= set(out_mask.unique().tolist())
    assert Resize(32)(image, mask)[1].shape == (32, 32)

    image, target = _instances()
    _, out = Resize((80, 112))(image, target)  # exactly 2x
    assert out["masks"].shape == (3, 80, 112)
    assert torch.equal(out["boxes"], target["boxes"] * 2)
    assert torch.allclose(out["area"], target["area"] * 4)
    for k in range(3):
        assert out["boxes"][k].tolist() == _mask_box(out["masks"][k])


def test_scale_crop_pads_semantic_with_255_and_image_with_0():
    image, mask = _semantic(64, 64)
    image = image.clamp(min=1)
    out_image, out_mask = RandomScaleCrop(64, min_scale=0.5, max_scale=0.5)(image, mask)
    assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
    assert (out_mask[32:, :] == 255).all() and (out_mask[:, 32:] == 255).all()
    assert (out_image[:, 32:, :] == 0).all() and (out_image[:, :32, :32] > 0).all()
    assert set(out_mask[:32, :32].unique().tolist()) <= {0, 1, 2, 255}


def test_scale_crop_instances_stay_consistent():
    torch.manual_seed(0)
    crop = RandomScaleCrop((24, 24), min_scale=1.5, max_scale=2.5)
    dropped = False
    for _ in range(30):
        image, target = _instances()
        out_image, out = crop(image, target)
        n = len(out["labels"])
        assert out_image.shape == (3, 24, 24)
        assert out["masks"].shape == (n, 24, 24) and out["boxes"].shape == (n, 4)
        assert len(out["area"]) == len(out["iscrowd"]) == n
        dropped |= n < 3
        for k in range(n):
            assert out["masks"][k].any(), "instances with no pixels must be dropped"
            x1, y1, x2, y2 = _mask_box(out["masks"][k])
            bx1, by1, bx2, by2 = out["boxes"][k].tolist()
            assert bx1 <= x1 + 1 and by1 <= y1 + 1 and bx2 >= x2 - 1 and by2 >= y2 - 1
            assert 0 <= bx1 < bx2 <= 24 and 0 <= by1 < by2 <= 24
            assert out["area"][k] == out["masks"][k].sum()
    assert dropped


def test_scale_crop_pads_instance_masks_with_zero():
    image, target = _instances(20, 20)
    target = {k: (v[:1] if k in ("boxes", "labels", "masks", "area", "iscrowd") else v) for k, v in target.items()}
    _, out = RandomScaleCrop(40, min_scale=0.5, max_scale=0.5)(image, target)
    assert out["masks"].shape == (1, 40, 40) and out["masks"][:, 20:, :].sum() == 0
    assert out["boxes"][0].tolist() == _mask_box(out["masks"][0])


def test_to_float_and_normalize():
    image, mask = _semantic()
    f, m = ToFloat()(image, mask)
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1 and m is mask
    assert torch.allclose(f * 255, image.float())
    n, _ = Normalize()(torch.full((3, 4, 4), 0.5), None)
    assert n[0, 0, 0].item() == pytest.approx((0.5 - IMAGENET_MEAN[0]) / 0.229)
    with pytest.raises(TypeError, match="ToFloat"):
        Normalize()(image, mask)


def test_factories():
    image, mask = _semantic(50, 70)
    for t in (train_transforms("semantic", 32), eval_transforms("semantic", 32)):
        x, y = t(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32)
    x, y = eval_transforms("semantic", 32)(image, None)  # inference: no target
    assert x.shape == (3, 32, 32) and y is None

    image, target = _instances()
    x, y = train_transforms("instance", 32)(image, target)
    assert x.dtype == torch.float32 and x.shape == image.shape and y["masks"].shape[-2:] == image.shape[-2:]
    x, y = eval_transforms("instance", 32)(image, target)
    assert torch.equal(y["boxes"], target["boxes"])  # eval keeps original coordinates for COCO eval
    with pytest.raises(ConfigError):
        train_transforms("depth", 32)
    assert isinstance(eval_transforms("semantic", 32), Compose)


def test_empty_instance_target():
    image = torch.zeros(3, 30, 30, dtype=torch.uint8)
    target = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 30, 30, dtype=torch.uint8),
        "area": torch.zeros(0),
        "iscrowd": torch.zeros(0, dtype=torch.int64),
        "image_id": 1,
    }
    for t in (RandomHorizontalFlip(1.0), Resize(20), RandomScaleCrop(16, 1.0, 2.0)):
        _, out = t(image, target)
        assert out["boxes"].shape == (0, 4) and out["masks"].shape[0] == 0
