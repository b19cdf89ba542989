"""Joint image/target transforms (torchvision references style).

Every transform is ``t(image, target) -> (image, target)`` where ``image`` is a
[3,H,W] tensor and ``target`` is a semantic mask (int64 [H,W]), an instance dict
(``boxes``/``labels``/``masks``/``area``/``iscrowd``/...) or ``None`` (inference).
Masks are always resized with nearest so label values survive; semantic padding
uses the ignore index so padded pixels never count in the loss or metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms.v2 import InterpolationMode

from segloop.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
_PER_INSTANCE = ("boxes", "labels", "masks", "area", "iscrowd")

Target = torch.Tensor | dict[str, Any] | None


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of [H,W] or [N,H,W] masks (keeps the label set)."""
    if masks.ndim == 2:
        return F.resize(masks[None], list(hw), interpolation=InterpolationMode.NEAREST)[0]
    return F.resize(masks, list(hw), interpolation=InterpolationMode.NEAREST)


def _keep(target: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    return {k: (v[keep] if k in _PER_INSTANCE else v) for k, v in target.items()}


class Compose:
    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize to ``size`` (an int means a square ``size``x``size``, so batches stack)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _hw(size)

    def __call__(self, image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
        return resize(image, target, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


def resize(image: torch.Tensor, target: Target, hw: tuple[int, int]) -> tuple[torch.Tensor, Target]:
    """Image bilinear + antialias, masks nearest, boxes and areas scaled."""
    h0, w0 = image.shape[-2:]
    if (h0, w0) == tuple(hw):
        return image, target
    image = F.resize(image, list(hw), interpolation=InterpolationMode.BILINEAR, antialias=True)
    if isinstance(target, torch.Tensor):
        target = _resize_masks(target, hw)
    elif isinstance(target, dict):
        sy, sx = hw[0] / h0, hw[1] / w0
        target = dict(target)
        if "masks" in target:
            target["masks"] = _resize_masks(target["masks"], hw)
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
        if torch.rand(1).item() >= self.p:
            return image, target
        image = F.horizontal_flip(image)
        if isinstance(target, torch.Tensor):
            target = target.flip(-1)
        elif isinstance(target, dict):
            target = dict(target)
            w = image.shape[-1]
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
            if "boxes" in target:
                b = target["boxes"]
                target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomScaleCrop:
    """Rescale so the shorter side is ``s * crop side`` (``s`` uniform in [min, max]), then
    take a random ``size`` crop, padding image with 0 and semantic masks with 255 when
    the rescaled image is smaller. Instances left with no pixels are dropped."""

    def __init__(
        self,
        size: int | Sequence[int],
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not 0 < min_scale <= max_scale:
            raise ConfigError(f"RandomScaleCrop needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.size = _hw(size)
        self.min_scale, self.max_scale = min_scale, max_scale
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
        ch, cw = self.size
        h0, w0 = image.shape[-2:]
        s = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(1).item()
        factor = s * min(ch, cw) / min(h0, w0)
        hw = (max(1, round(h0 * factor)), max(1, round(w0 * factor)))
        image, target = resize(image, target, hw)
        image, target = self._pad(image, target)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - ch + 1, (1,)).item())
        left = int(torch.randint(0, w - cw + 1, (1,)).item())
        return crop(image, target, top, left, ch, cw)

    def _pad(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if not (ph or pw):
            return image, target
        padding = [0, 0, pw, ph]  # left, top, right, bottom: boxes need no shift
        image = F.pad(image, padding, fill=0)
        if isinstance(target, torch.Tensor):
            target = F.pad(target[None], padding, fill=self.ignore_index)[0]
        elif isinstance(target, dict) and "masks" in target:
            target = dict(target, masks=F.pad(target["masks"], padding, fill=0))
        return image, target

    def __repr__(self) -> str:
        return f"RandomScaleCrop(size={self.size}, scale=({self.min_scale}, {self.max_scale}))"


def crop(image: torch.Tensor, target: Target, top: int, left: int, h: int, w: int) -> tuple[torch.Tensor, Target]:
    """Crop image and target; instance boxes are shifted and clipped, empty instances dropped."""
    image = F.crop(image, top, left, h, w)
    if isinstance(target, torch.Tensor):
        target = F.crop(target[None], top, left, h, w)[0]
    elif isinstance(target, dict):
        target = dict(target)
        keep = None
        if "boxes" in target:
            b = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            target["boxes"] = b
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        if "masks" in target:
            m = F.crop(target["masks"], top, left, h, w)
            target["masks"] = m
            visible = (m.flatten(1) > 0).any(1)
            keep = visible if keep is None else keep & visible
            if "area" in target:
                target["area"] = m.flatten(1).sum(1).to(torch.float32)
        if keep is not None:
            target = _keep(target, keep)
    return image, target


class ToFloat:
    """uint8 [0,255] -> float32 [0,1] (what torchvision detection models expect)."""

    def __call__(self, image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
        return F.to_dtype(image, torch.float32, scale=True), target

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor, target: Target = None) -> tuple[torch.Tensor, Target]:
        if not image.is_floating_point():
            raise TypeError(f"Normalize expects a float image in [0,1] (apply ToFloat first), got {image.dtype}")
        return F.normalize(image, self.mean, self.std), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def train_transforms(task: str, size: int) -> Compose:
    """Training augmentation. Semantic: scale jitter + crop to ``size``, flip, normalise.
    Instance: flip only, float in [0,1] — Mask R-CNN resizes and normalises internally."""
    if task == "semantic":
        return Compose([RandomScaleCrop(size, 0.75, 1.5), RandomHorizontalFlip(0.5), ToFloat(), Normalize()])
    if task == "instance":
        return Compose([RandomHorizontalFlip(0.5), ToFloat()])
    raise ConfigError(f"task must be 'semantic' or 'instance', got {task!r}")


def eval_transforms(task: str, size: int) -> Compose:
    """Deterministic eval/inference transforms. Semantic: resize to ``size`` x ``size`` and
    normalise. Instance: float only, so predictions stay in the original coordinates the
    COCO ground truth uses (``size`` is unused; the model resizes internally)."""
    if task == "semantic":
        return Compose([Resize(size), ToFloat(), Normalize()])
    if task == "instance":
        return Compose([ToFloat()])
    raise ConfigError(f"task must be 'semantic' or 'instance', got {task!r}")
