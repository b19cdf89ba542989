"""Model outputs -> response fields: mask PNGs, class fractions, COCO RLE, confidence, entropy.

Pure numpy functions (no torch, no Ray) so they are unit-tested on hand-made arrays and
reused by the active-learning capture, which ranks images by the same two numbers.

Definitions (all in [0, 1]):

* Semantic *confidence*: mean over pixels of the largest class probability.
* Semantic *entropy*: mean over pixels of ``-sum_c p_c log p_c`` divided by ``log C``
  (1 = uniform over the C classes). Both are taken on the model's output grid
  (``image_size`` x ``image_size``), so they do not depend on the upload's resolution.
* Instance *confidence*: mean detection score of the instances returned
  (``score >= score_threshold``); 0 when there are none.
* Instance *entropy* (an uncertainty in [0, 1]): mean over those instances of
  ``0.5 * mask_entropy + 0.5 * (1 - score)``, where ``mask_entropy`` is the mean binary
  entropy ``H2(p) = -(p log p + (1-p) log(1-p)) / log 2`` of the mask probabilities
  inside the instance's box and ``1 - score`` the detection's least-confidence term;
  1 (maximal uncertainty) when nothing is detected. The score term is ``1 - score``, not
  ``H2(score)``: below 0.5 the binary entropy *falls* as a detection gets less sure, and a
  model meeting a new style scores its detections low, so with ``H2`` the image-level value
  did not rise on shifted data (measured on the instance demo's model: mask term +0.21,
  ``H2`` total -0.01 or +0.01, ``1 - score`` total +0.11).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from train.uncertainty import instance_mask_entropies

_EPS = 1e-12


def _palette() -> list[int]:
    """Class 0 black, then well-separated colours (a viewable label PNG that still holds indices)."""
    base = [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
    ]
    rng = np.random.default_rng(0)
    extra = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(256 - len(base))]
    return [c for rgb in base + extra for c in rgb]


PALETTE = _palette()


# ----------------------------------------------------------------------------- uncertainty


def pixel_confidence_entropy(probs: np.ndarray) -> tuple[float, float]:
    """``probs`` [C, H, W] (softmax over C) -> (mean max-probability, mean normalised entropy)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] < 2:
        raise ValueError(f"probs must be [C, H, W] with C >= 2, got shape {p.shape}")
    confidence = float(p.max(axis=0).mean())
    entropy = -(p * np.log(np.clip(p, _EPS, 1.0))).sum(axis=0) / np.log(p.shape[0])
    return _unit(confidence), _unit(float(entropy.mean()))


def instance_confidence_entropy(
    scores: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    score_threshold: float = 0.05,
    image_size: tuple[int, int] | None = None,
) -> tuple[float, float]:
    """Per-image (confidence, entropy) of instance predictions; see the module docstring.

    ``scores`` [N], ``masks`` [N, h, w] (or [N, 1, h, w]) probabilities (float, or uint8 x 255),
    ``boxes`` [N, 4] xyxy in ``image_size`` coordinates (the mask grid's when None).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep, mask_entropy = instance_mask_entropies(scores, masks, boxes, score_threshold, image_size)
    if keep.size == 0:
        return 0.0, 1.0
    per_instance = 0.5 * np.asarray(mask_entropy) + 0.5 * (1.0 - scores[keep])
    return _unit(float(scores[keep].mean())), _unit(float(np.mean(per_instance)))


def mask_probabilities(masks: np.ndarray) -> np.ndarray:
    """[N, h, w] float probabilities from [N, 1, h, w] / [N, h, w] floats or uint8 (probability x 255)."""
    masks = np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.dtype == np.uint8:
        return masks.astype(np.float32) / 255.0
    return masks


def full_size_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One instance's [H, W] bool mask (probability > 0.5) from its probabilities on any grid.

    Masks are scaled one at a time and only around their support (bilinear, like
    torchvision's mask pasting), so a response never holds more than one full-size mask and
    a small instance in a large image costs little.
    """
    probs = mask_probabilities(mask[None])[0]
    height, width = int(size[0]), int(size[1])
    if probs.shape == (height, width):
        return probs > 0.5
    out = np.zeros((height, width), dtype=bool, order="F")  # the layout COCO RLE encodes from
    # bilinear weights are convex: a pixel can only pass 0.5 next to a grid cell that does
    inside = probs > 0.5
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return out
    h, w = probs.shape
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, h)  # one empty grid cell around the support
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, w)
    y0, y1 = round(r0 * height / h), round(r1 * height / h)
    x0, x1 = round(c0 * width / w), round(c1 * width / w)
    if y1 <= y0 or x1 <= x0:
        return out
    crop = np.clip(np.rint(probs[r0:r1, c0:c1] * 255), 0, 255).astype(np.uint8)
    scaled = Image.fromarray(crop, mode="L").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    out[y0:y1, x0:x1] = np.asarray(scaled) > 127
    return out


def _unit(x: float) -> float:
    return float(min(max(x, 0.0), 1.0))


# ----------------------------------------------------------------------------- masks


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of pixels of each class index 0..num_classes-1 in a [H, W] label mask."""
    mask = np.asarray(mask)
    counts = np.bincount(mask.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / max(mask.size, 1)


def encode_png(mask: np.ndarray) -> bytes:
    """[H, W] uint8 label mask -> palette PNG whose pixel values are the labels."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    if mask.size and int(mask.max()) > 255:
        raise ValueError("mask labels must fit in 8 bits (<= 255)")
    img = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
    img.putpalette(PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_png` (for clients and tests)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def instance_label_mask(masks: np.ndarray, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] uint8 map of instance indices (1-based, in response order, 0 = none); higher
    scores win overlaps. At most 255 instances are drawn. ``masks`` may be on a coarser grid."""
    out = np.zeros(shape, dtype=np.uint8)
    masks = np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    order = np.argsort(np.asarray(scores).reshape(-1), kind="stable")  # low first, high scores paint last
    for i in order:
        if i < 255:
            out[full_size_mask(masks[i], shape)] = i + 1
    return out


# ----------------------------------------------------------------------------- responses


def semantic_fields(
    mask: np.ndarray, probs: np.ndarray, class_names: Sequence[str], want_png_b64: bool = True
) -> dict[str, Any]:
    """Response fields of one semantic prediction: mask PNG, class fractions, confidence, entropy."""
    confidence, entropy = pixel_confidence_entropy(probs)
    fractions = class_fractions(mask, len(class_names))
    fields: dict[str, Any] = {
        "task": "semantic",
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "class_names": list(class_names),
        "class_fractions": {name: float(f) for name, f in zip(class_names, fractions)},
        "confidence": confidence,
        "entropy": entropy,
    }
    if want_png_b64:
        fields["mask_png_base64"] = b64(encode_png(mask))
    return fields


def instance_fields(
    prediction: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    image_size: tuple[int, int],
    score_threshold: float = 0.05,
    image_id: int = 0,
) -> dict[str, Any]:
    """Response fields of one instance prediction: COCO results (``bbox`` xywh, RLE
    ``segmentation``) per instance with ``score >= score_threshold``, confidence, entropy."""
    from dataplane.masks import encode_rle
    from train.metrics.instance import coco_results

    scores = np.asarray(prediction["scores"], dtype=np.float64).reshape(-1)
    keep = scores >= score_threshold
    boxes = np.asarray(prediction["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
    labels = np.asarray(prediction["labels"], dtype=np.int64).reshape(-1)[keep]
    masks = np.asarray(prediction["masks"])
    if masks.ndim == 4:
        masks = masks[:, 0]
    masks = masks[keep] if len(keep) else np.zeros((0, *image_size), dtype=np.float32)
    scores = scores[keep]
    confidence, entropy = instance_confidence_entropy(scores, masks, boxes, score_threshold, image_size)
    records = coco_results({image_id: {"boxes": boxes, "labels": labels, "scores": scores}}, iou_type="bbox")
    for r, m in zip(records, masks):  # one full-size mask at a time
        r["segmentation"] = encode_rle(full_size_mask(m, image_size))
    for r in records:
        c = r["category_id"]
        r["category_name"] = class_names[c] if 0 <= c < len(class_names) else str(c)
    h, w = image_size
    return {
        "task": "instance",
        "width": int(w),
        "height": int(h),
        "class_names": list(class_names),
        "instances": records,
        "num_instances": len(records),
        "confidence": confidence,
        "entropy": entropy,
    }
