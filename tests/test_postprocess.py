"""Confidence, entropy, masks and COCO results of serve_app.postprocess (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from serve_app.postprocess import (
    class_fractions,
    decode_png,
    encode_png,
    instance_confidence_entropy,
    instance_fields,
    instance_label_mask,
    pixel_confidence_entropy,
    semantic_fields,
)
from train.uncertainty import binary_entropy


def test_pixel_confidence_entropy_extremes():
    certain = np.zeros((3, 4, 4))
    certain[1] = 1
    assert pixel_confidence_entropy(certain) == pytest.approx((1.0, 0.0), abs=1e-9)
    uniform = np.full((4, 2, 2), 0.25)
    assert pixel_confidence_entropy(uniform) == pytest.approx((0.25, 1.0))


def test_pixel_entropy_value():
    p = np.array([0.7, 0.2, 0.1])[:, None, None] * np.ones((3, 2, 5))
    conf, ent = pixel_confidence_entropy(p)
    expected = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)
    assert conf == pytest.approx(0.7) and ent == pytest.approx(expected)
    with pytest.raises(ValueError):
        pixel_confidence_entropy(np.ones((1, 2, 2)))


def test_binary_entropy():
    assert binary_entropy([0.0, 0.5, 1.0]) == pytest.approx([0.0, 1.0, 0.0], abs=1e-9)
    assert binary_entropy(0.1) == pytest.approx(binary_entropy(0.9))


def test_instance_confidence_entropy():
    masks = np.zeros((2, 10, 10))
    masks[0, 2:6, 2:6] = 1.0  # a sharp mask
    masks[1] = 0.5  # a maximally unsure mask
    boxes = np.array([[2, 2, 6, 6], [0, 0, 10, 10]], float)
    scores = np.array([1.0, 0.5])
    conf, ent = instance_confidence_entropy(scores, masks, boxes, 0.05)
    # instance 0: mask 0, 1 - score 0 -> 0; instance 1: mask 1, 1 - score 0.5 -> 0.75
    assert conf == pytest.approx(0.75) and ent == pytest.approx(0.375)
    # a less sure detection is always more uncertain (H2(score) fell below 0.5)
    low = [instance_confidence_entropy(np.array([s]), masks[:1], boxes[:1])[1] for s in (0.4, 0.2, 0.1)]
    assert low == sorted(low) and low[0] < low[-1]
    assert instance_confidence_entropy(scores, masks, boxes, 0.6) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert instance_confidence_entropy(np.zeros(0), np.zeros((0, 10, 10)), np.zeros((0, 4))) == (0.0, 1.0)


def test_class_fractions_and_png_roundtrip():
    mask = np.array([[0, 1, 1], [2, 2, 2]], np.uint8)
    assert class_fractions(mask, 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert np.array_equal(decode_png(encode_png(mask)), mask)
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2, 2), np.uint8))


def test_semantic_fields():
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1
    probs = np.full((2, 8, 8), 0.5)
    f = semantic_fields(mask, probs, ["bg", "fg"])
    assert (f["width"], f["height"]) == (6, 4)
    assert f["class_fractions"] == {"bg": 0.5, "fg": 0.5} and f["entropy"] == pytest.approx(1.0)
    assert "mask_png_base64" in f and "mask_png_base64" not in semantic_fields(mask, probs, ["bg", "fg"], False)


def test_instance_fields_coco_results():
    masks = np.zeros((3, 1, 20, 30), np.float32)
    masks[0, 0, 5:10, 5:15] = 0.9
    masks[1, 0, 0:4, 0:4] = 0.8
    pred = {
        "boxes": np.array([[5, 5, 15, 10], [0, 0, 4, 4], [1, 1, 2, 2]], np.float32),
        "labels": np.array([1, 2, 1]),
        "scores": np.array([0.9, 0.6, 0.01], np.float32),
        "masks": masks,
    }
    f = instance_fields(pred, ["background", "ball", "box"], (20, 30), score_threshold=0.05, image_id=7)
    assert f["num_instances"] == 2 and (f["width"], f["height"]) == (30, 20)
    first = f["instances"][0]
    assert first["image_id"] == 7 and first["category_id"] == 1 and first["category_name"] == "ball"
    assert first["bbox"] == pytest.approx([5, 5, 10, 5])
    decoded = mask_utils.decode(first["segmentation"])
    assert decoded.shape == (20, 30) and decoded.sum() == 50
    assert f["confidence"] == pytest.approx(0.75)
    labels = instance_label_mask(masks[:2], pred["scores"][:2], (20, 30))
    assert set(np.unique(labels)) == {0, 1, 2}


def test_instance_fields_no_detections():
    pred = {
        "boxes": np.zeros((0, 4)),
        "labels": np.zeros(0, int),
        "scores": np.zeros(0),
        "masks": np.zeros((0, 1, 8, 8)),
    }
    f = instance_fields(pred, ["background", "x"], (8, 8))
    assert f["instances"] == [] and f["confidence"] == 0.0 and f["entropy"] == 1.0


def test_instance_masks_on_a_coarser_grid_scale_to_the_image():
    """The predictor keeps uint8 masks on the model's grid; responses are still at the image size."""
    fine = np.zeros((1, 20, 30), np.float32)
    fine[0, 4:12, 6:18] = 0.9
    coarse = np.zeros((1, 10, 15), np.uint8)
    coarse[0, 2:6, 3:9] = round(0.9 * 255)
    base = {"boxes": np.array([[6, 4, 18, 12]], np.float32), "labels": np.array([1]), "scores": np.array([0.8])}
    a = instance_fields({**base, "masks": fine}, ["background", "ball"], (20, 30))
    b = instance_fields({**base, "masks": coarse}, ["background", "ball"], (20, 30))
    ma, mb = (mask_utils.decode(f["instances"][0]["segmentation"]) for f in (a, b))
    assert mb.shape == (20, 30) and np.abs(ma.astype(int) - mb).sum() <= 0.1 * ma.sum()
    assert b["entropy"] == pytest.approx(a["entropy"], abs=0.02)
    labels = instance_label_mask(coarse, base["scores"], (20, 30))
    assert labels.shape == (20, 30) and (labels == 1).sum() == mb.sum()
