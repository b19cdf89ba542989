"""Per-image uncertainty statistics and the image embedding, for capture and selection.

Pure numpy/torch functions shared by the Serve replica (what a capture records), the queue's
re-scoring with the champion and ``bench/label_efficiency.py``, so all three rank images by
the same numbers. They go into capture metadata, never into the HTTP response.

Semantic (``probs`` [C, h, w], softmax over C; every value in [0, 1], higher = less sure):

* ``entropy``: mean normalised pixel entropy ``-sum_c p_c log p_c / log C`` (the response's).
  Background is most of the pixels of a pet photo, so it mostly measures background texture.
* ``class_balanced_entropy``: the mean entropy of each predicted class's pixels, averaged
  over the classes present: a thin border band weighs as much as the background.
* ``top_entropy``: mean entropy of the 10 % most uncertain pixels (where the model is lost).
* ``margin``: ``1 - mean(p_top1 - p_top2)``: 1 when the two best classes tie everywhere.

Instance (Mask R-CNN detections with ``score >= score_threshold``):

* ``entropy``: the response's, mean over instances of ``0.5 H2(mask) + 0.5 (1 - score)``
  (``serve_app.postprocess`` says why not ``H2(score)``); 1 when nothing is detected.
* ``score_uncertainty`` / ``mask_entropy``: the two terms apart, averaged over instances;
* ``max_instance_entropy``: the most uncertain instance (one doubtful object in a sure image);
* ``class_balanced_entropy``: the per-class mean of instance entropies, averaged over classes;
* ``margin``: ``1 - mean |2 score - 1|``, the score's distance from a coin flip.

Embedding: the global average of the backbone's deepest feature map, L2-normalised, stored
as float16 (semantic LR-ASPP: 960 values; Mask R-CNN FPN: 256).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_EPS = 1e-12
TOP_QUANTILE = 0.9


def _unit(x: float) -> float:
    return float(min(1.0, max(0.0, x))) if np.isfinite(x) else 0.0


def pixel_entropy(probs: np.ndarray) -> np.ndarray:
    """[h, w] normalised entropy of [C, h, w] probabilities (C >= 2)."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3 or p.shape[0] < 2:
        raise ValueError(f"probs must be [C, H, W] with C >= 2, got shape {p.shape}")
    return -(p * np.log(np.clip(p, _EPS, 1.0))).sum(axis=0) / np.float32(np.log(p.shape[0]))


def binary_entropy(p: Any) -> np.ndarray:
    """Binary entropy in bits (so 1 at p = 0.5, 0 at p in {0, 1}), elementwise."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


def semantic_uncertainty(probs: np.ndarray) -> dict[str, float]:
    """The semantic statistics of the module docstring, from one image's probabilities."""
    p = np.asarray(probs, dtype=np.float32)
    ent = pixel_entropy(p)
    pred = p.argmax(axis=0)
    per_class = [float(ent[pred == c].mean()) for c in np.unique(pred)]
    flat = ent.reshape(-1)
    k = max(1, int(round(flat.size * (1 - TOP_QUANTILE))))
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    two = np.partition(p, p.shape[0] - 2, axis=0)[-2:]  # the two largest per pixel, unordered
    margin = np.abs(two[1] - two[0]).mean()
    return {
        "entropy": _unit(float(flat.mean())),
        "class_balanced_entropy": _unit(float(np.mean(per_class))),
        "top_entropy": _unit(float(top.mean())),
        "margin": _unit(1.0 - float(margin)),
    }


def instance_uncertainty(scores: np.ndarray, mask_entropies: Sequence[float], labels: np.ndarray) -> dict[str, float]:
    """The instance statistics of the module docstring.

    ``scores``/``labels`` [N] of the kept detections, ``mask_entropies`` [N] the mean binary
    entropy of each mask inside its box (:func:`instance_mask_entropies`).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return {k: 1.0 for k in ("entropy", "score_uncertainty", "mask_entropy", "max_instance_entropy")} | {
            "class_balanced_entropy": 1.0,
            "margin": 1.0,
        }
    u_score = 1.0 - scores
    h_mask = np.asarray(mask_entropies, dtype=np.float64).reshape(-1)
    per_instance = 0.5 * h_mask + 0.5 * u_score
    labels = np.asarray(labels).reshape(-1)
    per_class = [float(per_instance[labels == c].mean()) for c in np.unique(labels)]
    return {
        "entropy": _unit(float(per_instance.mean())),
        "score_uncertainty": _unit(float(u_score.mean())),
        "mask_entropy": _unit(float(h_mask.mean())),
        "max_instance_entropy": _unit(float(per_instance.max())),
        "class_balanced_entropy": _unit(float(np.mean(per_class))),
        "margin": _unit(1.0 - float(np.abs(2 * scores - 1).mean())),
    }


def mask_entropy_in_box(mask: np.ndarray, box: Sequence[float]) -> float:
    """Mean binary entropy (bits) of one instance's mask probabilities [h, w] inside its xyxy box
    (box in the mask grid's coordinates; at least one pixel)."""
    h, w = mask.shape[-2:]
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, r0 = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.floor(y0), 0, h - 1))
    c1, r1 = int(np.clip(np.ceil(x1), c0 + 1, w)), int(np.clip(np.ceil(y1), r0 + 1, h))
    return float(binary_entropy(mask[r0:r1, c0:c1]).mean())


def instance_mask_entropies(
    scores: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    score_threshold: float = 0.05,
    image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """``(indices kept, mean binary mask entropy inside each kept box)``.

    ``scores`` [N], ``masks`` [N, h, w] (or [N, 1, h, w]) probabilities (float, or uint8 x 255),
    ``boxes`` [N, 4] xyxy in ``image_size`` coordinates (the mask grid's when None).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    masks = np.asarray(masks)
    masks = masks[:, 0] if masks.ndim == 4 else masks
    masks = masks.astype(np.float32) / 255.0 if masks.dtype == np.uint8 else masks
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep = np.flatnonzero(scores >= score_threshold)
    if keep.size == 0:
        return keep, []
    h, w = masks.shape[-2:]
    if image_size is not None and tuple(image_size) != (h, w):
        boxes = boxes * np.array([w / image_size[1], h / image_size[0]] * 2)
    return keep, [mask_entropy_in_box(masks[i], boxes[i]) for i in keep]


def pooled_embedding(features: Any) -> np.ndarray:
    """[B, D] float16 L2-normalised global average of the deepest feature map.

    ``features``: what a torchvision backbone returns (a dict of [B, C, h, w] maps in depth
    order, e.g. LR-ASPP's ``low``/``high`` or an FPN's levels) or one tensor.
    """
    import torch

    if isinstance(features, Mapping):
        features = list(features.values())[-1]
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        raise ValueError("backbone features must be a [B, C, H, W] tensor or a dict of them")
    v = features.detach().float().mean(dim=(2, 3))
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return v.cpu().numpy().astype(np.float16)
