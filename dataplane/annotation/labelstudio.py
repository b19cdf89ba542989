"""Label Studio tasks: pre-annotations out, an annotator's export back in.

Semantic pre-annotations are polygons (brush RLE is Label Studio's own bit-packed
format): outer contours of the predicted pet as ``pet`` regions and holes as
``background`` regions, largest first. The contour follows the middle of the predicted
border band; on import, regions are painted in order and the border band is derived
again with the Oxford/synth rule (``dataplane.trimap.pet_trimap``), unless ``border``
regions are drawn explicitly. Points are percentages of the image size, as Label Studio
stores them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from dataplane.annotation.formats import Instance, ParsedAnnotation, read_json
from dataplane.annotation.trimaps import trimap_from_pet_mask
from dataplane.capture import find_capture_id
from dataplane.masks import mask_polygons, rasterize_polygon
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
    """The Label Studio labelling config matching the exported tasks."""
    rows = "\n".join(
        f'    <Label value="{_xml(lab)}" background="{COLOURS[i % len(COLOURS)]}"/>' for i, lab in enumerate(labels)
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <PolygonLabels name="label" toName="image" strokeWidth="2" pointSize="small" opacity="0.4">\n'
        f"{rows}\n"
        "  </PolygonLabels>\n"
        "</View>\n"
    )


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def write_tasks(
    path: Path, items: Sequence[ExportItem], task: str, labels: Sequence[str], image_url_prefix: str
) -> None:
    """One Label Studio task per item, the prediction as its ``predictions[0]``."""
    tasks = []
    for n, item in enumerate(items, 1):
        rec, w, h = item.rec, item.image.width, item.image.height
        if task == "semantic":
            results = semantic_regions(item.trimap, w, h)
        else:
            results = instance_regions(item.instances, labels, w, h)
        data = {
            "image": f"{image_url_prefix}{item.file}",
            "capture_id": rec.id,
            "entropy": rec.entropy,
            "confidence": rec.confidence,
            "model_version": rec.model_version,
        }
        prediction = {"model_version": str(rec.model_version), "score": rec.confidence, "result": results}
        tasks.append({"id": n, "data": data, "predictions": [prediction]})
    path.write_text(json.dumps(tasks, indent=1))


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
    out = {
        "id": f"r{n}",
        "from_name": "label",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "points": [[round(float(x) / w * 100, 4), round(float(y) / h * 100, 4)] for x, y in points],
            "polygonlabels": [label],
            "closed": True,
        },
    }
    if score is not None:
        out["score"] = score
    return out


# ----------------------------------------------------------------------------- import


def parse_labelstudio(path: Path, problems: list[str]) -> tuple[list[ParsedAnnotation], list[str]]:
    """``(annotations, ids of tasks nobody annotated)`` of a Label Studio JSON export.

    The last non-cancelled annotation of a task counts; tasks that cannot be matched to a
    capture are added to ``problems``.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a Label Studio export is a JSON list of tasks, got {type(data).__name__}")
    anns, skipped = [], []
    for i, t in enumerate(data):
        where = f"{path} task[{i}]"
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
        where = f"sample {cid} ({path} task[{i}])"
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
    """Polygon regions painted in order (pet adds, background cuts) -> trimap (see module doc)."""
    pet = np.zeros((h, w), bool)
    border = np.zeros((h, w), bool)
    for k, label, mask in _polygons(result, h, w, where):
        if label == "pet":
            pet |= mask
        elif label == "background":
            pet &= ~mask
        elif label == "border":
            border |= mask
        else:
            raise DatasetError(f"{where}: result[{k}] has unknown class {label!r} (known: pet, background, border)")
    trimap = trimap_from_pet_mask(pet)
    trimap[border] = 3
    return trimap


def regions_to_instances(result: list, h: int, w: int, where: str, known: Mapping[str, int]) -> list[Instance]:
    """One instance per polygon region; its label must be a category of the dataset."""
    out = []
    for k, label, mask in _polygons(result, h, w, where):
        if label not in known:
            raise DatasetError(f"{where}: result[{k}] has unknown class {label!r} (known: {', '.join(known)})")
        out.append(Instance(label, mask, 0))
    return out


def _polygons(result: list, h: int, w: int, where: str) -> Iterator[tuple[int, str, np.ndarray]]:
    """``(index, label, mask)`` of each polygon region; other region kinds are refused."""
    for k, reg in enumerate(result):
        if not isinstance(reg, dict):
            raise DatasetError(f"{where}: result[{k}] is not a region object")
        rtype = str(reg.get("type", ""))
        if rtype != "polygonlabels":
            if rtype.endswith("labels"):
                raise DatasetError(f"{where}: result[{k}] is a {rtype} region; only polygonlabels can be imported")
            continue  # choices, textarea, ratings: not regions
        label, mask = _polygon_mask(reg, h, w, f"{where}: result[{k}]")
        yield k, label, mask


def _polygon_mask(reg: dict, h: int, w: int, where: str) -> tuple[str, np.ndarray]:
    ow, oh = reg.get("original_width"), reg.get("original_height")
    if isinstance(ow, (int, float)) and isinstance(oh, (int, float)) and (int(ow), int(oh)) != (w, h):
        raise DatasetError(f"{where}: drawn on a {int(ow)}x{int(oh)} image but the captured image is {w}x{h}")
    value = reg.get("value")
    labels = value.get("polygonlabels") if isinstance(value, dict) else None
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise DatasetError(f"{where}: a polygon needs exactly one label in value.polygonlabels")
    pts = value.get("points")
    if not isinstance(pts, list) or len(pts) < 3 or not all(_is_point(p) for p in pts):
        raise DatasetError(f"{where}: value.points must be at least 3 [x, y] pairs (percent of the image size)")
    arr = np.asarray(pts, dtype=np.float64)
    if arr.min() < -1 or arr.max() > 101:
        raise DatasetError(
            f"{where}: polygon points must be percentages in [0, 100], got range {arr.min():.1f}..{arr.max():.1f}"
        )
    arr = np.clip(arr, 0, 100) / 100.0 * np.array([w, h])
    return labels[0], rasterize_polygon(arr.reshape(-1).tolist(), h, w)


def _is_point(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
