"""Instance-segmentation metrics: COCO mAP, PR / F1 curves, IoU confusion matrix, fitness.

Predictions are torchvision Mask R-CNN outputs keyed by COCO ``image_id``::

    {image_id: {"boxes": [N,4] xyxy, "labels": [N] contiguous 1..K, "scores": [N],
                "masks": [N,1,H,W] or [N,H,W] probabilities or 0/1}}

Targets follow the dataset contract (``boxes``, ``labels``, ``masks`` [M,H,W], optional
``iscrowd``). Tensors or numpy arrays are both accepted. Label 0 is background.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segloop.errors import ConfigError, DatasetError, ModelError
from train.data.coco import quiet_pycocotools
from train.metrics.semantic import _all_reduce_sum, _dist_ready

__all__ = [
    "CocoEvaluator",
    "InstanceConfusionMatrix",
    "coco_results",
    "concat_matches",
    "fitness",
    "match_detections",
    "pairwise_iou",
    "pr_curves",
]

IOU_TYPES = ("bbox", "segm")
MASK_THRESHOLD = 0.5


# --------------------------------------------------------------------------- helpers


def _np(x: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _binary_masks(masks: Any) -> np.ndarray:
    """[N,1,H,W] or [N,H,W] probabilities / 0-1 values -> bool [N,H,W] (prob > 0.5)."""
    m = _np(masks)
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ModelError(f"instance masks must be [N,1,H,W] or [N,H,W], got shape {m.shape}")
        m = m[:, 0]
    if m.ndim != 3:
        raise ModelError(f"instance masks must be [N,1,H,W] or [N,H,W], got shape {m.shape}")
    return m > MASK_THRESHOLD


def _cat_id(label: int, label_to_cat_id: Mapping[int, int] | None) -> int:
    if label_to_cat_id is None:
        return label
    try:
        return int(label_to_cat_id[label])
    except KeyError:
        raise ModelError(
            f"predicted label {label} has no COCO category id (known labels: {sorted(label_to_cat_id)}); "
            "does the model's num_classes match the dataset?"
        ) from None


def _check_iou_type(iou_type: str) -> str:
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"unknown IoU type {iou_type!r}, expected one of {IOU_TYPES}")
    return iou_type


# --------------------------------------------------------------------------- COCO results


def coco_results(
    predictions: Mapping[int, Mapping[str, Any]],
    label_to_cat_id: Mapping[int, int] | None = None,
    iou_type: str | None = None,
) -> list[dict]:
    """Convert model outputs to COCO result records (JSON-serialisable).

    Each detection becomes ``{"image_id", "category_id", "score", "bbox": [x, y, w, h],
    "segmentation": {"size": [H, W], "counts": str}}`` (COCO RLE of ``mask > 0.5``).
    ``label_to_cat_id`` maps contiguous labels back to COCO category ids (identity if None).

    ``iou_type`` selects the fields: ``"bbox"`` -> bbox only, ``"segm"`` -> segmentation only
    (what COCOeval wants: with a bbox present pycocotools would take the *box* area for
    segm area ranges), ``None`` -> bbox plus segmentation when masks exist (serving).
    """
    if iou_type is not None:
        _check_iou_type(iou_type)
    want_box = iou_type in (None, "bbox")
    want_seg = iou_type in (None, "segm")
    out: list[dict] = []
    for image_id, pred in predictions.items():
        image_id = int(image_id)
        scores = _np(pred["scores"], np.float64).reshape(-1)
        labels = _np(pred["labels"], np.int64).reshape(-1)
        n = len(scores)
        if n == 0:
            continue
        records = [
            {"image_id": image_id, "category_id": _cat_id(int(lab), label_to_cat_id), "score": float(s)}
            for lab, s in zip(labels, scores)
        ]
        if want_box:
            boxes = _np(pred["boxes"], np.float64).reshape(-1, 4)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            for r, b in zip(records, xywh.tolist()):
                r["bbox"] = b
        has_masks = pred.get("masks") is not None
        if want_seg and (has_masks or iou_type == "segm"):
            if not has_masks:
                raise ModelError(f"prediction for image {image_id} has no 'masks'; segm needs a mask model")
            masks = _binary_masks(pred["masks"])
            if len(masks) != n:
                raise ModelError(f"prediction for image {image_id}: {len(masks)} masks for {n} scores")
            for r, m in zip(records, masks):
                rle = mask_util.encode(np.asfortranarray(m[:, :, None], dtype=np.uint8))[0]
                rle["counts"] = rle["counts"].decode("utf-8")
                r["segmentation"] = rle
        out.extend(records)
    return out


class CocoEvaluator:
    """COCO mAP for bbox and/or segm, torchvision-references life cycle::

        ev = CocoEvaluator(dataset.coco, ("bbox", "segm"), dataset.label_to_cat_id)
        for images, targets in loader: ev.update({t["image_id"]: o for t, o in zip(targets, model(images))})
        ev.synchronize_between_processes()   # all ranks, before accumulate
        ev.accumulate(); ev.summarize(); metrics = ev.stats()

    Only images passed to ``update`` are scored (COCOeval ``params.imgIds``), so an
    evaluation on a subset is correct. Results are kept per image, so images repeated by a
    padded DistributedSampler are counted once.
    """

    def __init__(
        self,
        coco_gt: COCO,
        iou_types: Sequence[str] = ("bbox", "segm"),
        label_to_cat_id: Mapping[int, int] | None = None,
    ) -> None:
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        self.iou_types = tuple(_check_iou_type(t) for t in iou_types)
        self.coco_gt = coco_gt
        self.label_to_cat_id = None if label_to_cat_id is None else {int(k): int(v) for k, v in label_to_cat_id.items()}
        self.results: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        self.coco_eval: dict[str, COCOeval | None] = {}

    @property
    def img_ids(self) -> list[int]:
        return sorted(self.results[self.iou_types[0]]) if self.iou_types else []

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            img = self.coco_gt.imgs.get(image_id)
            if img is None:
                raise DatasetError(f"image_id {image_id} is not in the COCO ground truth")
            if "segm" in self.iou_types and pred.get("masks") is not None and len(pred["masks"]):
                hw = tuple(_binary_masks(pred["masks"]).shape[-2:])
                if hw != (img["height"], img["width"]):
                    raise ModelError(
                        f"masks for image {image_id} are {hw[0]}x{hw[1]} but the image is "
                        f"{img['height']}x{img['width']}; resize predictions to the original image size"
                    )
            for t in self.iou_types:
                self.results[t][image_id] = coco_results({image_id: pred}, self.label_to_cat_id, t)

    def synchronize_between_processes(self) -> None:
        """Gather every rank's results (all_gather_object); a no-op without torch.distributed."""
        if not _dist_ready():
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.results)
        merged: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        for part in gathered:
            for t in self.iou_types:
                for image_id, res in part[t].items():
                    merged[t].setdefault(image_id, res)
        self.results = merged

    def accumulate(self) -> None:
        """Run COCOeval evaluate + accumulate per IoU type (quietly)."""
        for t in self.iou_types:
            img_ids = sorted(self.results[t])
            if not img_ids:  # nothing to score (pycocotools would read *all* dt annotations)
                self.coco_eval[t] = None
                continue
            # loadRes mutates records (id, area, ...): hand it copies so accumulate is repeatable.
            dts = [dict(r) for i in img_ids for r in self.results[t][i]]
            with quiet_pycocotools():
                coco_dt = COCO.loadRes(self.coco_gt, dts) if dts else COCO()
                ev = COCOeval(self.coco_gt, coco_dt, iouType=t)
                ev.params.imgIds = img_ids
                ev.evaluate()
                ev.accumulate()
            self.coco_eval[t] = ev

    def summarize(self) -> dict[str, float]:
        """Print the standard 12-line COCO summary per IoU type; returns :meth:`stats`."""
        for t in self.iou_types:
            print(f"IoU metric: {t}")
            ev = self._eval(t)
            if ev is None:
                print("no image was evaluated")
            else:
                ev.summarize()
        return self.stats()

    def _eval(self, t: str) -> COCOeval | None:
        if t not in self.coco_eval:
            raise RuntimeError("CocoEvaluator: call accumulate() before summarize()/stats()")
        return self.coco_eval[t]

    def stats(self) -> dict[str, float]:
        """``<type>/mAP50-95``, ``<type>/mAP50``, ``<type>/mAP75`` and ``<type>/AP/<category>``.

        AP = mean of COCO's 101-point interpolated precision over the IoU thresholds, the
        categories with ground truth, area "all" and maxDets 100 (exactly COCOeval.stats[0:3]).
        No prediction -> 0.0; no ground truth (undefined) -> NaN.
        """
        out: dict[str, float] = {}
        for t in self.iou_types:
            ev = self._eval(t)
            if ev is None:
                nan = float("nan")
                out.update({f"{t}/mAP50-95": nan, f"{t}/mAP50": nan, f"{t}/mAP75": nan})
                out.update({f"{t}/AP/{c['name']}": nan for c in self.coco_gt.loadCats(self.coco_gt.getCatIds())})
                continue
            p = ev.params
            prec = ev.eval["precision"]  # [T, R, K, A, M]
            a = p.areaRngLbl.index("all")
            m = p.maxDets.index(p.maxDets[-1])
            prec = prec[..., a, m]  # [T, R, K]
            out[f"{t}/mAP50-95"] = _mean_valid(prec)
            out[f"{t}/mAP50"] = _mean_valid(prec[np.where(p.iouThrs == 0.5)[0]])
            out[f"{t}/mAP75"] = _mean_valid(prec[np.where(p.iouThrs == 0.75)[0]])
            for k, cat_id in enumerate(p.catIds):
                name = self.coco_gt.cats[cat_id]["name"]
                out[f"{t}/AP/{name}"] = _mean_valid(prec[:, :, k])
        return out


def _mean_valid(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(np.mean(x)) if x.size else float("nan")


def fitness(stats: Mapping[str, float], iou_type: str = "segm") -> float:
    """Model-selection score: fitness = 0.1 * mAP50 + 0.9 * mAP50-95 of ``iou_type``.

    Mostly the strict COCO mAP, with a little weight on the lenient one to break ties
    (ultralytics' weighting). NaN (no ground truth) counts as 0 so it never wins.
    """
    _check_iou_type(iou_type)
    try:
        m50, m = stats[f"{iou_type}/mAP50"], stats[f"{iou_type}/mAP50-95"]
    except KeyError:
        raise ConfigError(
            f"fitness needs {iou_type}/mAP50 and {iou_type}/mAP50-95 in the stats, got {sorted(stats)}"
        ) from None
    m50 = 0.0 if math.isnan(m50) else float(m50)
    m = 0.0 if math.isnan(m) else float(m)
    return 0.1 * m50 + 0.9 * m


# --------------------------------------------------------------------------- IoU + matching


def pairwise_iou(pred: Mapping[str, Any], target: Mapping[str, Any], iou_type: str = "segm") -> np.ndarray:
    """IoU [N, M] between N predictions and M targets, by mask (segm) or box (bbox).

    IoU = |A ∩ B| / |A ∪ B|; masks are binarised at 0.5, boxes are xyxy.
    """
    _check_iou_type(iou_type)
    if iou_type == "bbox":
        a = torch.as_tensor(_np(pred["boxes"], np.float64).reshape(-1, 4))
        b = torch.as_tensor(_np(target["boxes"], np.float64).reshape(-1, 4))
        from torchvision.ops import box_iou

        return box_iou(a, b).numpy()
    if pred.get("masks") is None or target.get("masks") is None:
        raise ValueError("segm IoU needs 'masks' in both prediction and target (use iou_type='bbox')")
    a, b = _binary_masks(pred["masks"]), _binary_masks(target["masks"])
    if a.shape[1:] != b.shape[1:] and len(a) and len(b):
        raise ValueError(f"prediction masks {a.shape[1:]} and target masks {b.shape[1:]} differ in size")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    dtype = torch.float32 if a[0].size < 2**24 else torch.float64  # exact integer counts
    ta = torch.from_numpy(a.reshape(len(a), -1)).to(dtype)
    tb = torch.from_numpy(b.reshape(len(b), -1)).to(dtype)
    inter = ta @ tb.T
    union = ta.sum(1)[:, None] + tb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).double().numpy()


def _crowd(target: Mapping[str, Any], m: int) -> np.ndarray:
    c = target.get("iscrowd")
    return np.zeros(m, bool) if c is None else _np(c).reshape(-1).astype(bool)


def match_detections(
    pred: Mapping[str, Any], target: Mapping[str, Any], iou_thr: float = 0.5, iou_type: str = "segm"
) -> dict[str, np.ndarray]:
    """Mark each prediction of one image true/false positive (COCO-style greedy matching).

    Predictions are visited by descending score; each takes the unmatched ground truth of
    the same class with the highest IoU >= ``iou_thr`` (true positive) or stays a false
    positive. Crowd ground truths are not counted and predictions they absorb are dropped.

    Returns ``tp`` bool [N'], ``conf`` [N'], ``pred_cls`` [N'], ``target_cls`` [M'] — concatenate
    over images with :func:`concat_matches` and feed to :func:`pr_curves`.
    """
    scores = _np(pred["scores"], np.float64).reshape(-1)
    labels = _np(pred["labels"], np.int64).reshape(-1)
    t_labels = _np(target["labels"], np.int64).reshape(-1)
    crowd = _crowd(target, len(t_labels))
    tp = np.zeros(len(scores), bool)
    keep = np.ones(len(scores), bool)
    if len(scores) and len(t_labels):
        iou = pairwise_iou(pred, target, iou_type)
        used = crowd.copy()  # crowd regions can't be matched as TPs
        for i in np.argsort(-scores, kind="stable"):
            ok = (t_labels == labels[i]) & (iou[i] >= iou_thr)
            cand = ok & ~used
            if cand.any():
                j = int(np.argmax(np.where(cand, iou[i], -1.0)))
                used[j], tp[i] = True, True
            elif (ok & crowd).any():
                keep[i] = False
    return {"tp": tp[keep], "conf": scores[keep], "pred_cls": labels[keep], "target_cls": t_labels[~crowd]}


def concat_matches(matches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-image :func:`match_detections` outputs (keyword args for pr_curves)."""
    matches = list(matches)
    empty = {
        "tp": np.zeros(0, bool),
        "conf": np.zeros(0),
        "pred_cls": np.zeros(0, np.int64),
        "target_cls": np.zeros(0, np.int64),
    }
    return {k: np.concatenate([v] + [np.asarray(m[k]) for m in matches]).astype(v.dtype) for k, v in empty.items()}


def _coco_ap(recall: np.ndarray, precision: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """COCO interpolated precision at ``rec_thrs``: envelope max_{r' >= r} p(r'), 0 beyond max recall."""
    env = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, rec_thrs, side="left")
    return np.where(idx < len(env), env[np.minimum(idx, len(env) - 1)], 0.0)


def pr_curves(
    tp: np.ndarray,
    conf: np.ndarray,
    pred_cls: np.ndarray,
    target_cls: np.ndarray,
    classes: Sequence[int] | None = None,
    num_points: int = 1000,
    eps: float = 1e-16,
) -> dict[str, Any]:
    """Precision-recall and P/R/F1-vs-confidence curves per class (ultralytics ap_per_class style).

    For a confidence threshold t and class c, over detections with conf >= t:
    P_c(t) = TP / (TP + FP) (1 when no detection survives), R_c(t) = TP / n_gt_c,
    F1_c(t) = 2 P R / (P + R). Curves are exact step functions on ``conf`` = linspace(0, 1).
    AP50_c = COCO 101-point interpolated AP of the PR curve (mean over recall r of
    max_{r' >= r} precision(r')); ``pr_precision`` is that envelope on the recall grid.
    ``classes`` defaults to the classes with ground truth; a class without detections has
    P = R = AP = 0. Means are over classes; ``best_conf`` maximises the mean F1.
    """
    tp, conf = np.asarray(tp, bool).reshape(-1), np.asarray(conf, np.float64).reshape(-1)
    pred_cls, target_cls = np.asarray(pred_cls, np.int64).reshape(-1), np.asarray(target_cls, np.int64).reshape(-1)
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    cls = np.unique(target_cls) if classes is None else np.asarray(classes, np.int64).reshape(-1)
    x = np.linspace(0.0, 1.0, num_points)
    k = len(cls)
    p_curve, r_curve, pr_prec = np.zeros((k, num_points)), np.zeros((k, num_points)), np.zeros((k, num_points))
    ap = np.zeros(k)
    n_gt = np.array([(target_cls == c).sum() for c in cls], np.int64)
    for ci, c in enumerate(cls):
        sel = pred_cls == c
        if n_gt[ci] == 0 or not sel.any():
            continue
        tpc = np.cumsum(tp[sel])
        fpc = np.cumsum(~tp[sel])
        recall = tpc / n_gt[ci]
        precision = tpc / (tpc + fpc)
        n_above = np.searchsorted(-conf[sel], -x, side="right")  # #detections with conf >= x
        last = np.maximum(n_above - 1, 0)
        r_curve[ci] = np.where(n_above > 0, recall[last], 0.0)
        p_curve[ci] = np.where(n_above > 0, precision[last], 1.0)
        ap[ci] = _coco_ap(recall, precision, np.linspace(0.0, 1.0, 101)).mean()
        pr_prec[ci] = _coco_ap(recall, precision, x)
    f1 = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    mean = (lambda a: a.mean(0)) if k else (lambda a: np.zeros(num_points))
    mean_f1 = mean(f1)
    best = int(np.argmax(mean_f1))
    return {
        "classes": cls,
        "n_gt": n_gt,
        "conf": x,
        "precision": p_curve,
        "recall": r_curve,
        "f1": f1,
        "mean_precision": mean(p_curve),
        "mean_recall": mean(r_curve),
        "mean_f1": mean_f1,
        "pr_recall": x,
        "pr_precision": pr_prec,
        "mean_pr_precision": mean(pr_prec),
        "ap50": ap,
        "map50": float(ap.mean()) if k else float("nan"),
        "best_conf": float(x[best]),
        "best_f1": float(mean_f1[best]),
        "best_precision": float(mean(p_curve)[best]),
        "best_recall": float(mean(r_curve)[best]),
    }


# --------------------------------------------------------------------------- confusion matrix


class InstanceConfusionMatrix:
    """IoU-matched detection confusion matrix with background (ultralytics style).

    ``matrix[t, p]`` (rows = ground truth, cols = prediction, like the semantic matrix) over
    ``num_classes`` = K + 1 indices where **0 is background**, matching the dataset labels.
    Per image, predictions with score >= ``conf`` are matched one-to-one to ground truths,
    class-agnostically, greedily by descending IoU (IoU >= ``iou_thr``):
    matched pair -> ``[gt_cls, pred_cls]`` (off-diagonal = wrong class);
    unmatched ground truth -> ``[gt_cls, 0]`` (missed); unmatched prediction -> ``[0, pred_cls]``
    (false positive). Crowd ground truths and predictions on them are ignored.
    """

    def __init__(self, num_classes: int, conf: float = 0.25, iou_thr: float = 0.45, iou_type: str = "segm") -> None:
        self.num_classes = int(num_classes)
        self.conf = conf
        self.iou_thr = iou_thr
        self.iou_type = _check_iou_type(iou_type)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(
        self,
        pred: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        target: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    ) -> None:
        """Add one image (dicts) or a batch (lists of dicts)."""
        if not isinstance(pred, Mapping):
            for p, t in zip(pred, target, strict=True):
                self.update(p, t)
            return
        scores = _np(pred["scores"], np.float64).reshape(-1)
        keep = scores >= self.conf
        p = {k: _np(pred[k])[keep] for k in ("boxes", "labels", "scores", "masks") if pred.get(k) is not None}
        p_cls = _np(p["labels"], np.int64).reshape(-1)
        t_cls = _np(target["labels"], np.int64).reshape(-1)
        for name, c in (("prediction", p_cls), ("target", t_cls)):
            if c.size and (c.min() < 0 or c.max() >= self.num_classes):
                bad = c.min() if c.min() < 0 else c.max()
                raise ValueError(f"{name} label {bad} out of range 0..{self.num_classes - 1}")
        crowd = _crowd(target, len(t_cls))
        if len(p_cls) and len(t_cls):
            iou = pairwise_iou(p, target, self.iou_type)
        else:
            iou = np.zeros((len(p_cls), len(t_cls)))
        p_used = np.zeros(len(p_cls), bool)
        t_used = crowd.copy()
        pi, ti = np.nonzero(iou >= self.iou_thr)
        counts = np.zeros((self.num_classes, self.num_classes), np.int64)
        for j in np.argsort(-iou[pi, ti], kind="stable"):
            i, g = pi[j], ti[j]
            if p_used[i] or t_used[g]:
                continue
            p_used[i] = t_used[g] = True
            counts[t_cls[g], p_cls[i]] += 1
        on_crowd = (iou[:, crowd] >= self.iou_thr).any(1) if crowd.any() else np.zeros(len(p_cls), bool)
        for g in np.nonzero(~t_used)[0]:
            counts[t_cls[g], 0] += 1
        for i in np.nonzero(~p_used & ~on_crowd)[0]:
            counts[0, p_cls[i]] += 1
        self.matrix += torch.from_numpy(counts).to(self.matrix.device)

    def compute(self) -> torch.Tensor:
        """The int64 [K+1, K+1] matrix (rows = ground truth, cols = prediction, 0 = background)."""
        return self.matrix.clone()

    def reset(self) -> None:
        self.matrix.zero_()

    def merge(self, other: InstanceConfusionMatrix) -> InstanceConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def reduce_from_all_processes(self) -> InstanceConfusionMatrix:
        """Sum over torch.distributed ranks; no-op when not initialised."""
        if _dist_ready():
            self.matrix = _all_reduce_sum(self.matrix)
        return self
