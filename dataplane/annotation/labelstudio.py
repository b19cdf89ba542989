"""Label Studio tasks: pre-annotations out, an annotator's work back in.

Two region kinds, both read back: polygons (``PolygonLabels "label"``, points in percent
of the image size, as Label Studio stores them) and brush masks (``BrushLabels "brush"``,
Label Studio's bit-packed RLE, :func:`dataplane.masks.brush_rle_encode`). The export file
writes polygons (small, readable): outer contours of the predicted pet as ``pet`` regions
and holes as ``background`` regions, largest first, along the middle of the predicted
border band. A push to a Label Studio server writes brush masks, which are exact: a
trimap as its ``pet`` and ``border`` pixels, an instance as its mask.

On import, regions are painted in order (``pet`` adds, ``background`` cuts). When no
``border`` region is drawn the border band is derived with the Oxford/synth rule
(``dataplane.trimap.pet_trimap``); when one is, the drawn band is the border.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from dataplane.annotation.formats import Instance, ParsedAnnotation, read_json
from dataplane.annotation.trimaps import trimap_from_pet_mask
from dataplane.capture import find_capture_id
from dataplane.masks import brush_rle_decode, brush_rle_encode, mask_polygons, rasterize_polygon
from dataplane.trimap import band_radius, dilate
from segloop.errors import DatasetError

if TYPE_CHECKING:
    from dataplane.annotation.exporter import ExportItem, PredictedInstance

SEMANTIC_LABELS = ("pet", "background", "border")
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


# ----------------------------------------------------------------------------- export


def export_labels(task: str, class_names: Sequence[str]) -> list[str]:
    """The PolygonLabels of an export: pet/background/border, or the instance classes (no background)."""
    if task == "semantic":
        return list(SEMANTIC_LABELS)
    return [n for i, n in enumerate(class_names) if i > 0]


def label_studio_config(labels: Sequence[str]) -> str:
    """The labelling config of exported and pushed tasks: polygons (``label``) and brush (``brush``)."""
    rows = "\n".join(
        f'    <Label value="{_xml(lab)}" background="{COLOURS[i % len(COLOURS)]}"/>' for i, lab in enumerate(labels)
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <PolygonLabels name="label" toName="image" strokeWidth="2" pointSize="small" opacity="0.4">\n'
        f"{rows}\n"
        "  </PolygonLabels>\n"
        '  <BrushLabels name="brush" toName="image">\n'
        f"{rows}\n"
        "  </BrushLabels>\n"
        "</View>\n"
    )


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def write_tasks(
    path: Path, items: Sequence[ExportItem], task: str, labels: Sequence[str], image_url_prefix: str
) -> None:
    """One Label Studio task per item, the prediction (polygons, scored by confidence) as its ``predictions[0]``."""
    tasks = [
        dict(task_json(item, task, labels, f"{image_url_prefix}{item.file}", item.rec.confidence), id=n)
        for n, item in enumerate(items, 1)
    ]
    path.write_text(json.dumps(tasks, indent=1))


def task_json(
    item: ExportItem,
    task: str,
    labels: Sequence[str],
    image_url: str,
    score: Optional[float],
    brush: bool = False,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """A Label Studio task for one capture: its image, what identifies it, and the model's prediction."""
    rec = item.rec
    data = {
        "image": image_url,
        "capture_id": rec.id,
        "entropy": rec.entropy,
        "confidence": rec.confidence,
        "model_version": rec.model_version,
        **dict(extra or {}),
    }
    prediction = {
        "model_version": str(rec.model_version),
        "score": score,
        "result": prediction_regions(item, task, labels, brush),
    }
    return {"data": data, "predictions": [prediction]}


def prediction_regions(item: ExportItem, task: str, labels: Sequence[str], brush: bool = False) -> list[dict[str, Any]]:
    """The model's prediction of one item as Label Studio regions: polygons, or exact brush masks."""
    w, h = item.image.width, item.image.height
    if brush:
        if task == "semantic":
            return semantic_brush_regions(item.trimap, w, h)
        return instance_brush_regions(item.instances, labels, w, h)
    if task == "semantic":
        return semantic_regions(item.trimap, w, h)
    return instance_regions(item.instances, labels, w, h)


def semantic_brush_regions(trimap: Optional[np.ndarray], w: int, h: int) -> list[dict[str, Any]]:
    """A trimap as a ``pet`` and a ``border`` brush mask (background is what is left): exact."""
    if trimap is None:
        return []
    masks = (("pet", trimap == 1), ("border", trimap == 3))
    return [brush_region(m, label, w, h, k, None) for k, (label, m) in enumerate(masks) if m.any()]


def instance_brush_regions(
    instances: Sequence[PredictedInstance], labels: Sequence[str], w: int, h: int
) -> list[dict[str, Any]]:
    """One brush mask per predicted instance of a known class, with its score."""
    keep = [i for i in instances if i.name in labels and i.mask.any()]
    return [brush_region(i.mask, str(i.name), w, h, k, i.score) for k, i in enumerate(keep)]


def brush_region(mask: np.ndarray, label: str, w: int, h: int, n: int, score: Optional[float]) -> dict[str, Any]:
    """A ``brushlabels`` region holding ``mask`` as Label Studio brush RLE."""
    value = {"format": "rle", "rle": brush_rle_encode(mask), "brushlabels": [label]}
    return _region("brush", "brushlabels", f"b{n}", w, h, value, score)


def semantic_regions(trimap: np.ndarray, w: int, h: int) -> list[dict[str, Any]]:
    """Polygons along the middle of the predicted border band: outlines ``pet``, holes ``background``."""
    r = band_radius(h, w)
    pet = trimap == 1
    outline = dilate(pet, r) & (trimap != 2) if pet.any() else (trimap == 3)
    results: list[dict[str, Any]] = []
    for pts, area in mask_polygons(outline):
        results.append(region(pts, "pet" if area > 0 else "background", w, h, len(results), None))
    return results


def instance_regions(
    instances: Sequence[PredictedInstance], labels: Sequence[str], w: int, h: int
) -> list[dict[str, Any]]:
    """The largest outer contour of each predicted instance of a known class."""
    results: list[dict[str, Any]] = []
    for inst in instances:
        if inst.name not in labels or not inst.mask.any():
            continue
        polys = [pa for pa in mask_polygons(inst.mask) if pa[1] > 0]
        if polys:
            results.append(region(polys[0][0], inst.name, w, h, len(results), inst.score))
    return results


def region(points: np.ndarray, label: str, w: int, h: int, n: int, score: Optional[float]) -> dict[str, Any]:
    """A ``polygonlabels`` region; ``points`` in pixels, written as percentages."""
    value = {
        "points": [[round(float(x) / w * 100, 4), round(float(y) / h * 100, 4)] for x, y in points],
        "polygonlabels": [label],
        "closed": True,
    }
    return _region("label", "polygonlabels", f"r{n}", w, h, value, score)


def _region(
    from_name: str, rtype: str, rid: str, w: int, h: int, value: dict[str, Any], score: Optional[float]
) -> dict[str, Any]:
    """What every region of the exported config shares: its control, the image and its size."""
    out = {
        "id": rid,
        "from_name": from_name,
        "to_name": "image",
        "type": rtype,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
    }
    if score is not None:
        out["score"] = float(score)
    return out


# ----------------------------------------------------------------------------- import


@dataclass(frozen=True)
class TaskList:
    """Label Studio tasks read from a server, named by where they came from: an import source."""

    tasks: list[dict[str, Any]]
    source: str

    @property
    def name(self) -> str:
        return self.source

    def __str__(self) -> str:
        return self.source


def parse_labelstudio(path: Path, problems: list[str]) -> tuple[list[ParsedAnnotation], list[str]]:
    """``(annotations, ids of tasks nobody annotated)`` of a Label Studio JSON export file."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a Label Studio export is a JSON list of tasks, got {type(data).__name__}")
    return parse_tasks(data, str(path), problems)


def parse_tasks(tasks: Sequence[Any], source: str, problems: list[str]) -> tuple[list[ParsedAnnotation], list[str]]:
    """``(annotations, ids of tasks without a finished annotation)`` of Label Studio tasks.

    The last annotation that was not cancelled (skipped) counts; tasks that cannot be
    matched to a capture are added to ``problems``. Each annotation is named by its capture
    and its task (the task id when it has one) in every later problem.
    """
    anns, skipped = [], []
    for i, t in enumerate(tasks):
        where = (
            f"{source} task {t['id']}"
            if isinstance(t, dict) and isinstance(t.get("id"), int)
            else f"{source} task[{i}]"
        )
        if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
            problems.append(f"{where}: not a Label Studio task (needs a 'data' object)")
            continue
        d = t["data"]
        cid = d.get("capture_id") if isinstance(d.get("capture_id"), str) else None
        cid = cid or find_capture_id(str(d.get("image", "")))
        if not cid:
            problems.append(
                f"{where}: cannot tell which capture it is (no data.capture_id, no capture id in data.image)"
            )
            continue
        where = f"sample {cid} ({where})"
        done = [a for a in t.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            skipped.append(cid)
            continue
        result = done[-1].get("result")
        if not isinstance(result, list):
            problems.append(f"{where}: annotation 'result' must be a list of regions")
            continue
        anns.append(ParsedAnnotation(cid, where, "regions", result))
    return anns, skipped


def regions_to_trimap(result: list, h: int, w: int, where: str) -> np.ndarray:
    """Regions painted in order (pet adds, background cuts) -> trimap (see module doc)."""
    pet = np.zeros((h, w), bool)
    border = np.zeros((h, w), bool)
    drew_border = False
    for k, label, mask in _region_masks(result, h, w, where):
        if label == "pet":
            pet |= mask
        elif label == "background":
            pet &= ~mask
        elif label == "border":
            border |= mask
            drew_border = True
        else:
            raise DatasetError(f"{where}: result[{k}] has unknown class {label!r} (known: pet, background, border)")
    if not pet.any():
        raise DatasetError(
            f"{where}: no pet painted (an Oxford trimap needs the pet; skip the task in Label Studio "
            "if the image shows none)"
        )
    if not drew_border:
        return trimap_from_pet_mask(pet)
    trimap = np.where(pet, 1, 2).astype(np.uint8)
    trimap[border] = 3
    return trimap


def regions_to_instances(result: list, h: int, w: int, where: str, known: Mapping[str, int]) -> list[Instance]:
    """One instance per polygon or brush region; its label must be a category of the dataset."""
    out = []
    for k, label, mask in _region_masks(result, h, w, where):
        if label not in known:
            raise DatasetError(f"{where}: result[{k}] has unknown class {label!r} (known: {', '.join(known)})")
        out.append(Instance(label, mask, 0))
    return out


def _region_masks(result: list, h: int, w: int, where: str) -> Iterator[tuple[int, str, np.ndarray]]:
    """``(index, label, mask)`` of each polygon or brush region; other region kinds are refused."""
    for k, reg in enumerate(result):
        if not isinstance(reg, dict):
            raise DatasetError(f"{where}: result[{k}] is not a region object")
        rtype = str(reg.get("type", ""))
        if rtype == "polygonlabels":
            yield k, *_polygon_mask(reg, h, w, f"{where}: result[{k}]")
        elif rtype == "brushlabels":
            yield k, *_brush_mask(reg, h, w, f"{where}: result[{k}]")
        elif rtype.endswith("labels"):
            raise DatasetError(
                f"{where}: result[{k}] is a {rtype} region; only polygonlabels and brushlabels can be imported"
            )
        # choices, textarea, ratings: not regions


def _check_size(reg: dict, h: int, w: int, where: str) -> None:
    ow, oh = reg.get("original_width"), reg.get("original_height")
    if isinstance(ow, (int, float)) and isinstance(oh, (int, float)) and (int(ow), int(oh)) != (w, h):
        raise DatasetError(f"{where}: drawn on a {int(ow)}x{int(oh)} image but the captured image is {w}x{h}")


def _one_label(value: Any, key: str, where: str) -> str:
    labels = value.get(key) if isinstance(value, dict) else None
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise DatasetError(f"{where}: a region needs exactly one label in value.{key}")
    return labels[0]


def _brush_mask(reg: dict, h: int, w: int, where: str) -> tuple[str, np.ndarray]:
    _check_size(reg, h, w, where)
    value = reg.get("value")
    label = _one_label(value, "brushlabels", where)
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise DatasetError(f"{where}: a brushlabels region needs value.rle (Label Studio's brush RLE)")
    return label, brush_rle_decode(value["rle"], h, w, where)


def _polygon_mask(reg: dict, h: int, w: int, where: str) -> tuple[str, np.ndarray]:
    _check_size(reg, h, w, where)
    value = reg.get("value")
    label = _one_label(value, "polygonlabels", where)
    pts = value.get("points")
    if not isinstance(pts, list) or len(pts) < 3 or not all(_is_point(p) for p in pts):
        raise DatasetError(f"{where}: value.points must be at least 3 [x, y] pairs (percent of the image size)")
    arr = np.asarray(pts, dtype=np.float64)
    if arr.min() < -1 or arr.max() > 101:
        raise DatasetError(
            f"{where}: polygon points must be percentages in [0, 100], got range {arr.min():.1f}..{arr.max():.1f}"
        )
    arr = np.clip(arr, 0, 100) / 100.0 * np.array([w, h])
    return label, rasterize_polygon(arr.reshape(-1).tolist(), h, w)


def _is_point(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
