"""Metrics: hand-computed semantic matrices, COCO mAP vs pycocotools, curves, plots."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segloop.errors import DatasetError, ModelError
from train.metrics import (
    CocoEvaluator,
    ConfusionMatrix,
    InstanceConfusionMatrix,
    coco_results,
    concat_matches,
    confusion_matrix,
    dice_per_class,
    fitness,
    iou_per_class,
    match_detections,
    mean_dice,
    mean_iou,
    pixel_accuracy,
    plot_confusion_matrix,
    plot_metric_confidence,
    plot_pr_curve,
    plot_training_curves,
    pr_curves,
    semantic_metrics,
)

# --------------------------------------------------------------------------- semantic

# target / pred with one ignore pixel; class 3 appears in neither.
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])
CM = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_confusion_matrix_by_hand_with_ignore():
    cm = confusion_matrix(PRED, TARGET, num_classes=4)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, CM)
    # logits are arg-maxed over dim 1
    logits = torch.nn.functional.one_hot(PRED, 4).permute(2, 0, 1)[None].float()
    assert torch.equal(confusion_matrix(logits, TARGET[None], 4), CM)


def test_derived_metrics_by_hand_and_nan_for_empty_class():
    assert pixel_accuracy(CM) == pytest.approx(3 / 5)
    iou = iou_per_class(CM)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])  # absent from target and pred -> excluded, not 0
    assert mean_iou(CM) == pytest.approx(1 / 3)
    dice = dice_per_class(CM)
    assert dice[:3].tolist() == pytest.approx([0.5, 0.8, 0.0])
    assert math.isnan(dice[3])
    assert mean_dice(CM) == pytest.approx(1.3 / 3)
    m = semantic_metrics(CM, ["bg", "pet", "border", "unused"])
    assert m["pixel_acc"] == pytest.approx(0.6) and m["miou"] == pytest.approx(1 / 3)
    assert m["iou/pet"] == pytest.approx(2 / 3) and m["dice/pet"] == pytest.approx(0.8)
    assert math.isnan(m["iou/unused"]) and math.isnan(m["dice/unused"])
    per_class = {f"{k}/{c}" for k in ("iou", "dice") for c in ("bg", "pet", "border", "unused")}
    assert set(m) == {"pixel_acc", "miou", "mdice"} | per_class
    empty = torch.zeros(3, 3, dtype=torch.int64)
    assert math.isnan(pixel_accuracy(empty)) and math.isnan(mean_iou(empty))


def test_perfect_and_fully_wrong_predictions():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 16), generator=g)
    perfect = semantic_metrics(confusion_matrix(target, target, 3))
    assert perfect["pixel_acc"] == 1.0 and perfect["miou"] == 1.0 and perfect["mdice"] == 1.0
    wrong = semantic_metrics(confusion_matrix((target + 1) % 3, target, 3))
    assert wrong["pixel_acc"] == 0.0 and wrong["miou"] == 0.0 and wrong["mdice"] == 0.0


def test_bad_target_label_is_a_dataset_error():
    with pytest.raises(DatasetError, match="label 7"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 3)


def test_merge_of_partial_matrices_equals_whole():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, :2] = 255
    pred = torch.randint(0, 3, (4, 8, 8), generator=g)
    whole = ConfusionMatrix(3, ("background", "pet", "border"))
    whole.update(pred, target)
    a, b = ConfusionMatrix(3, ("background", "pet", "border")), ConfusionMatrix(3, ("background", "pet", "border"))
    a.update(pred[:1], target[:1])
    a.update(pred[1:2], target[1:2])
    b.update(pred[2:], target[2:])
    merged = a.merge(b).reduce_from_all_processes()  # no process group: reduce is a no-op
    assert torch.equal(merged.mat, whole.mat)
    assert merged.compute() == whole.compute()
    assert int(whole.mat.sum()) == 4 * 64 - 16
    whole.reset()
    assert int(whole.mat.sum()) == 0


# --------------------------------------------------------------------------- COCO fixture

H = W = 64
CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
LABEL_TO_CAT = {1: 3, 2: 7, 3: 11}
GT_POLYS = {  # image_id -> [(cat_id, polygon)]
    1: [(3, [10, 10, 30, 10, 30, 30, 10, 30]), (7, [35, 35, 60, 35, 60, 55, 35, 55])],
    2: [(11, [5, 50, 30, 50, 17, 30]), (3, [40, 5, 60, 5, 60, 25, 40, 25])],
    5: [(7, [8, 8, 40, 8, 40, 40, 8, 40]), (11, [45, 40, 60, 40, 60, 60, 45, 60])],
}


def gt_dict() -> dict:
    images, anns = [], []
    for img_id, objs in GT_POLYS.items():
        images.append({"id": img_id, "height": H, "width": W, "file_name": f"{img_id}.png"})
        for cat, poly in objs:
            rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "segmentation": [poly],
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATS)}


def make_coco() -> COCO:
    coco = COCO()
    coco.dataset = gt_dict()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_mask(coco: COCO, img_id: int, cat: int) -> np.ndarray:
    (ann,) = [a for a in coco.imgToAnns[img_id] if a["category_id"] == cat]
    return coco.annToMask(ann).astype(bool)


def box_of(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def det(mask: np.ndarray, label: int, score: float) -> tuple:
    return mask, label, score


def to_pred(dets: list[tuple]) -> dict:
    """Mask R-CNN-like output: masks [N,1,H,W] float probabilities."""
    if not dets:
        return {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, H, W),
        }
    masks = np.stack([d[0] for d in dets]).astype(np.float32) * 0.9  # "probabilities" > 0.5
    return {
        "boxes": torch.tensor([box_of(d[0]) for d in dets]),
        "labels": torch.tensor([d[1] for d in dets]),
        "scores": torch.tensor([d[2] for d in dets]),
        "masks": torch.from_numpy(masks)[:, None],
    }


def mixed_predictions(coco: COCO) -> dict[int, dict]:
    """Some correct, some shifted, one wrong class, one false positive, one miss."""
    m = lambda i, c: gt_mask(coco, i, c)  # noqa: E731
    shift = lambda a, dx, dy=0: np.roll(np.roll(a, dy, 0), dx, 1)  # noqa: E731
    return {
        1: to_pred([det(m(1, 3), 1, 0.9), det(shift(m(1, 7), 3), 2, 0.8), det(shift(m(1, 3), 0, 30), 3, 0.3)]),
        2: to_pred([det(m(2, 11), 1, 0.7), det(shift(m(2, 3), -6, 2), 1, 0.6)]),
        5: to_pred([det(m(5, 7), 2, 0.95), det(shift(m(5, 7), 9, 9), 2, 0.5)]),
    }


def perfect_predictions(coco: COCO) -> dict[int, dict]:
    cat_to_label = {v: k for k, v in LABEL_TO_CAT.items()}
    return {
        img: to_pred([det(gt_mask(coco, img, c), cat_to_label[c], 0.9 - 0.1 * k) for k, (c, _) in enumerate(objs)])
        for img, objs in GT_POLYS.items()
    }


def direct_cocoeval(preds: dict[int, dict], iou_type: str, cat_ids: list[int] | None = None) -> np.ndarray:
    """pycocotools on hand-built results (bytes RLE, xywh boxes), independent of coco_results."""
    res = []
    for img, p in preds.items():
        for box, lab, s, mk in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), p["masks"]):
            r = {"image_id": img, "category_id": LABEL_TO_CAT[lab], "score": s}
            if iou_type == "bbox":
                r["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                r["segmentation"] = mask_util.encode(np.asfortranarray(mk[0].numpy() > 0.5, dtype=np.uint8))
            res.append(r)
    gt = make_coco()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(res), iouType=iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def evaluate(preds: dict[int, dict], iou_types=("bbox", "segm")) -> CocoEvaluator:
    ev = CocoEvaluator(make_coco(), iou_types, LABEL_TO_CAT)
    ev.update({k: preds[k] for k in list(preds)[:2]})  # two updates like two batches
    ev.update({k: preds[k] for k in list(preds)[2:]})
    ev.synchronize_between_processes()  # no process group: no-op
    ev.accumulate()
    return ev


# --------------------------------------------------------------------------- COCO mAP


def test_coco_results_conversion():
    coco = make_coco()
    pred = mixed_predictions(coco)[1]
    res = coco_results({1: pred}, LABEL_TO_CAT)
    assert [r["category_id"] for r in res] == [3, 7, 11]
    assert res[0]["bbox"] == [10.0, 10.0, 20.0, 20.0]  # xyxy [10,10,30,30] -> xywh
    assert isinstance(res[0]["segmentation"]["counts"], str)
    json.dumps(res)  # serving returns it as JSON
    back = mask_util.decode(res[0]["segmentation"]).astype(bool)
    assert np.array_equal(back, gt_mask(coco, 1, 3))
    # [N,H,W] masks are accepted too; bbox/segm-only variants for COCOeval
    flat = dict(pred, masks=pred["masks"][:, 0])
    assert coco_results({1: flat}, LABEL_TO_CAT, "segm")[0]["segmentation"] == res[0]["segmentation"]
    assert "segmentation" not in coco_results({1: pred}, LABEL_TO_CAT, "bbox")[0]
    assert "bbox" not in coco_results({1: pred}, LABEL_TO_CAT, "segm")[0]
    with pytest.raises(ModelError, match="label 3"):
        coco_results({1: pred}, {1: 3, 2: 7})


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_evaluator_matches_pycocotools_exactly(iou_type):
    coco = make_coco()
    preds = mixed_predictions(coco)
    stats = evaluate(preds).stats()
    ref = direct_cocoeval(preds, iou_type)
    assert stats[f"{iou_type}/mAP50-95"] == ref[0]
    assert stats[f"{iou_type}/mAP50"] == ref[1]
    assert stats[f"{iou_type}/mAP75"] == ref[2]
    assert 0.0 < ref[0] < ref[1] < 1.0  # the fixture is neither trivial nor hopeless
    for cat in CATS:
        ref_cat = direct_cocoeval(preds, iou_type, [cat["id"]])[0]
        assert stats[f"{iou_type}/AP/{cat['name']}"] == pytest.approx(ref_cat, abs=1e-12)
    assert stats[f"{iou_type}/AP/bird"] == 0.0  # only a wrong-class and a false-positive "bird"


def test_coco_evaluator_perfect_and_empty_predictions(capsys):
    coco = make_coco()
    ev = evaluate(perfect_predictions(coco))
    s = ev.summarize()
    assert "IoU metric: segm" in capsys.readouterr().out
    for t in ("bbox", "segm"):
        assert s[f"{t}/mAP50-95"] == 1.0 and s[f"{t}/mAP50"] == 1.0 and s[f"{t}/mAP75"] == 1.0
        assert all(s[f"{t}/AP/{c['name']}"] == 1.0 for c in CATS)
    assert fitness(s) == pytest.approx(1.0)

    empty = evaluate({img: to_pred([]) for img in GT_POLYS}).stats()
    assert empty["segm/mAP50-95"] == 0.0 and empty["bbox/mAP50"] == 0.0 and empty["segm/AP/cat"] == 0.0
    assert fitness(empty) == 0.0

    nothing = CocoEvaluator(make_coco(), "segm", LABEL_TO_CAT)
    nothing.accumulate()  # no image seen: undefined, not a crash
    assert math.isnan(nothing.stats()["segm/mAP50-95"])


def test_coco_evaluator_scores_only_updated_images_and_checks_inputs():
    coco = make_coco()
    preds = perfect_predictions(coco)
    ev = CocoEvaluator(make_coco(), ("segm",), LABEL_TO_CAT)
    ev.update({1: preds[1]})
    ev.accumulate()
    s = ev.stats()
    # pycocotools divides by tp + fp + eps: a single TP scores 1 - 2e-16
    assert s["segm/mAP50-95"] == pytest.approx(1.0) and math.isnan(s["segm/AP/bird"])  # no bird in image 1
    with pytest.raises(DatasetError, match="image_id 99"):
        ev.update({99: preds[1]})
    small = dict(preds[1], masks=preds[1]["masks"][:, :, :32, :32])
    with pytest.raises(ModelError, match="32x32"):
        ev.update({1: small})


def test_fitness_formula():
    stats = {"segm/mAP50": 0.8, "segm/mAP50-95": 0.5, "bbox/mAP50": 0.6, "bbox/mAP50-95": 0.4}
    assert fitness(stats) == pytest.approx(0.1 * 0.8 + 0.9 * 0.5)
    assert fitness(stats, "bbox") == pytest.approx(0.1 * 0.6 + 0.9 * 0.4)
    assert fitness({"segm/mAP50": float("nan"), "segm/mAP50-95": float("nan")}) == 0.0


# --------------------------------------------------------------------------- curves


def test_match_detections_greedy_by_score_per_class():
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2])}
    pred = {
        "boxes": torch.tensor([[0.0, 0, 10, 9], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
        "labels": torch.tensor([1, 1, 1, 2]),
        "scores": torch.tensor([0.9, 0.5, 0.8, 0.7]),
    }
    m = match_detections(pred, gt, iou_type="bbox")
    # the higher-scored box takes the GT even with lower IoU; the exact box is a duplicate;
    # right place wrong class and nowhere-near are false positives
    assert m["tp"].tolist() == [True, False, False, False]
    assert m["target_cls"].tolist() == [1, 2]
    crowd = dict(gt, iscrowd=torch.tensor([0, 1]))
    mc = match_detections(dict(pred, labels=torch.tensor([1, 1, 2, 2])), crowd, iou_type="bbox")
    assert mc["tp"].tolist() == [True, False, False] and mc["target_cls"].tolist() == [1]  # on-crowd pred dropped


def test_pr_curves_hand_case():
    # one class, 4 GT; by score: TP TP TP FP FP
    curves = pr_curves(
        tp=np.array([True, False, True, False, True]),
        conf=np.array([0.9, 0.3, 0.8, 0.2, 0.7]),
        pred_cls=np.ones(5, int),
        target_cls=np.ones(4, int),
    )
    conf, r, p, f1 = curves["conf"], curves["recall"][0], curves["precision"][0], curves["f1"][0]
    assert conf.shape == (1000,) and conf[0] == 0.0 and conf[-1] == 1.0
    assert np.all(np.diff(r) <= 0)  # recall can only drop as the threshold rises
    assert r[0] == 0.75 and p[0] == pytest.approx(3 / 5) and r[-1] == 0.0 and p[-1] == 1.0
    best = curves["best_conf"]
    assert 0.3 < best <= 0.7 and curves["best_f1"] == pytest.approx(6 / 7, abs=1e-9)  # P=1, R=3/4
    assert f1[np.searchsorted(conf, 0.5)] == pytest.approx(6 / 7, abs=1e-9)
    assert curves["best_precision"] == 1.0 and curves["best_recall"] == 0.75
    # COCO 101-point AP: precision 1 up to recall 0.75, 0 beyond -> 76/101
    assert curves["ap50"][0] == pytest.approx(76 / 101) and curves["map50"] == pytest.approx(76 / 101)
    # a class with GT but no detection scores 0; perfect detections score 1
    two = pr_curves(np.array([True]), np.array([0.9]), np.array([1]), np.array([1, 2]))
    assert two["ap50"].tolist() == [1.0, 0.0] and two["map50"] == 0.5


def test_pr_curves_ap50_agrees_with_coco_map50():
    coco = make_coco()
    preds = mixed_predictions(coco)
    targets = {
        img: {
            "labels": torch.tensor([{3: 1, 7: 2, 11: 3}[c] for c, _ in objs]),
            "masks": torch.from_numpy(np.stack([gt_mask(coco, img, c) for c, _ in objs]).astype(np.uint8)),
        }
        for img, objs in GT_POLYS.items()
    }
    curves = pr_curves(**concat_matches(match_detections(preds[i], targets[i]) for i in GT_POLYS))
    assert curves["classes"].tolist() == [1, 2, 3]
    assert curves["map50"] == pytest.approx(direct_cocoeval(preds, "segm")[1], abs=1e-9)
    for key in ("precision", "recall", "f1", "pr_precision"):
        assert curves[key].shape == (3, 1000)
    assert np.all(np.diff(curves["mean_recall"]) <= 0)


# --------------------------------------------------------------------------- instance confusion matrix


def _box_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_instance_confusion_matrix_hand_case(iou_type):
    a, b, c, empty = (0, 0, 20, 20), (30, 30, 50, 50), (0, 40, 20, 60), (40, 0, 60, 20)
    target = {
        "boxes": torch.tensor([a, b, c], dtype=torch.float32),
        "labels": torch.tensor([1, 2, 1]),
        "masks": torch.from_numpy(np.stack([_box_mask(*a), _box_mask(*b), _box_mask(*c)])),
    }
    boxes = [a, b, empty, c]
    pred = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor([1, 1, 2, 1]),  # TP cat, dog predicted as cat, FP dog, cat below conf
        "scores": torch.tensor([0.9, 0.8, 0.6, 0.1]),
        "masks": torch.from_numpy(np.stack([_box_mask(*x) for x in boxes]).astype(np.float32))[:, None],
    }
    cm = InstanceConfusionMatrix(num_classes=3, iou_type=iou_type)  # 0 = background
    cm.update(pred, target)
    expected = torch.tensor(
        [
            [0, 0, 1],  # background row: the false-positive dog
            [1, 1, 0],  # cat: missed (c, its prediction is below conf) -> background; a matched
            [0, 1, 0],  # dog predicted as cat
        ]
    )
    assert torch.equal(cm.compute(), expected)
    other = InstanceConfusionMatrix(3, iou_type=iou_type)
    other.update([pred], [target])
    assert torch.equal(cm.merge(other).reduce_from_all_processes().compute(), 2 * expected)
    # no GT: every prediction is a false positive; no prediction: every GT is missed
    fresh = InstanceConfusionMatrix(3, iou_type=iou_type)
    fresh.update(
        pred,
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, H, W, dtype=torch.uint8),
        },
    )
    fresh.update({k: v[:0] for k, v in pred.items()}, target)
    assert torch.equal(fresh.compute(), torch.tensor([[0, 2, 1], [2, 0, 0], [1, 0, 0]]))


# --------------------------------------------------------------------------- plots


def _is_png(path) -> bool:
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.load()
        return im.format == "PNG" and im.size[0] > 50


def test_plots_write_png(tmp_path):
    curves = pr_curves(
        np.array([True, False, True, True]), np.array([0.9, 0.8, 0.6, 0.4]), np.array([1, 1, 2, 2]), np.array([1, 1, 2])
    )
    names = ("background", "cat", "dog")
    paths = [
        plot_confusion_matrix(CM, ["bg", "pet", "border", "unused"], tmp_path / "cm.png"),
        plot_confusion_matrix(
            torch.tensor([[0, 1, 2], [3, 4, 0], [0, 0, 9]]), names, tmp_path / "sub" / "cm_raw.png", normalize=False
        ),
        plot_pr_curve(curves, names, tmp_path / "pr.png"),
        *(plot_metric_confidence(curves, k, names, tmp_path / f"{k}.png") for k in ("precision", "recall", "f1")),
        plot_training_curves(
            [
                {"epoch": 0, "train/loss": 1.0, "val/miou": float("nan")},
                {"epoch": 1, "train/loss": 0.5, "val/miou": 0.4},
            ],
            ["train/loss", "val/miou", "missing"],
            tmp_path / "train.png",
        ),
    ]
    assert all(_is_png(p) for p in paths)
    with pytest.raises(ValueError, match="key"):
        plot_metric_confidence(curves, "map", names, tmp_path / "x.png")


# --------------------------------------------------------------------------- distributed (gloo, 2 ranks)


def _dist_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(3)
        target, pred = torch.randint(0, 3, (4, 8, 8), generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
        cm = ConfusionMatrix(3)
        cm.update(pred[rank::2], target[rank::2])
        cm.reduce_from_all_processes()
        coco = make_coco()
        preds = mixed_predictions(coco)
        ev = CocoEvaluator(coco, ("bbox", "segm"), LABEL_TO_CAT)
        mine = [1, 2] if rank == 0 else [2, 5]  # image 2 on both ranks, like a padded sampler
        ev.update({i: preds[i] for i in mine})
        ev.synchronize_between_processes()
        ev.accumulate()
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"cm": cm.mat.tolist(), "stats": ev.stats()}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_reduce_and_gather(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "out.json"
    mp.spawn(_dist_worker, args=(2, f"file://{tmp_path / 'rdv'}", str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    g = torch.Generator().manual_seed(3)
    target, pred = torch.randint(0, 3, (4, 8, 8), generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
    assert got["cm"] == confusion_matrix(pred, target, 3).tolist()
    assert got["stats"] == evaluate(mixed_predictions(make_coco())).stats()


def test_class_indices_is_argmax_with_first_max_ties():
    from train.metrics.semantic import class_indices

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 17, 9, generator=g)
    assert torch.equal(class_indices(logits), logits.argmax(1))
    assert torch.equal(class_indices(logits[0]), logits[0].argmax(0))
    tied = torch.zeros(1, 3, 2, 2)
    tied[0, 1:, 0, 0] = 1.0  # classes 1 and 2 tie: the first maximum wins, as with argmax
    assert class_indices(tied)[0, 0, 0].item() == 1 and class_indices(tied)[0, 1, 1].item() == 0
