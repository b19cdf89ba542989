"""COCO instances JSON: pre-annotations out, corrected annotations in, and the merge of
imported samples into a COCO-layout dataset's ``annotations/instances_<split>.json``.

Masks are RLE annotations (exact, no polygon loss). Semantic classes are categories
``pet`` (1) and ``border`` (2), each one RLE annotation per image; on import, a semantic
COCO file without ``border`` annotations gets its band derived like painted polygons.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from dataplane.annotation.formats import Instance, ParsedAnnotation, read_json
from dataplane.annotation.trimaps import TRIMAP_VALUES, trimap_from_pet_mask
from dataplane.capture import find_capture_id
from dataplane.masks import bbox_area, decode_segmentation, encode_rle
from segloop.errors import DatasetError

if TYPE_CHECKING:
    from dataplane.annotation.exporter import ExportItem
    from dataplane.annotation.importer import CheckedSample

SEMANTIC_CATEGORIES = (
    {"id": 1, "name": "pet", "supercategory": "pets"},
    {"id": 2, "name": "border", "supercategory": "pets"},
)


@dataclass(frozen=True)
class CocoImage:
    """The annotations of one COCO image, with the file's category names by id."""

    annotations: tuple[dict[str, Any], ...]
    categories: Mapping[Any, str]


def annotation(
    ann_id: int, image_id: int, category_id: int, mask: np.ndarray, iscrowd: int = 0, **extra: Any
) -> dict[str, Any]:
    """A COCO annotation of a binary mask (RLE, area, bbox); ``extra`` keys go last (e.g. score)."""
    bbox, area = bbox_area(mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": encode_rle(mask),
        "area": area,
        "bbox": bbox,
        "iscrowd": iscrowd,
        **extra,
    }


# ----------------------------------------------------------------------------- export


def export_categories(task: str, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The categories of an export: pet/border, or the instance classes (no background)."""
    if task == "semantic":
        return [dict(c) for c in SEMANTIC_CATEGORIES]
    return [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]


def write_preannotations(path: Path, items: Sequence[ExportItem], task: str, categories: list[dict[str, Any]]) -> None:
    """The predictions of the exported items as one COCO JSON (images numbered from 1)."""
    coco: dict[str, Any] = {
        "info": {"description": "segloop pre-annotations (model predictions)"},
        "images": [],
        "annotations": [],
        "categories": categories,
    }
    for n, item in enumerate(items, 1):
        rec, w, h = item.rec, item.image.width, item.image.height
        coco["images"].append({"id": n, "file_name": item.file, "width": w, "height": h, "capture_id": rec.id})
        if task == "semantic":
            layers = _semantic_layers(item.trimap, categories, rec.confidence)
        else:
            layers = _instance_layers(item, [c["name"] for c in categories])
        for category_id, mask, score in layers:
            coco["annotations"].append(annotation(len(coco["annotations"]) + 1, n, category_id, mask, score=score))
    path.write_text(json.dumps(coco))


def _semantic_layers(
    trimap: np.ndarray, categories: Sequence[Mapping[str, Any]], score: Optional[float]
) -> Iterator[tuple[int, np.ndarray, Optional[float]]]:
    for cat in categories:
        m = trimap == TRIMAP_VALUES[cat["name"]]
        if m.any():
            yield cat["id"], m, score


def _instance_layers(item: ExportItem, names: list[str]) -> Iterator[tuple[int, np.ndarray, Any]]:
    for inst in item.instances:
        if inst.name not in names or not inst.mask.any():
            continue
        yield names.index(inst.name) + 1, inst.mask, inst.score


# ----------------------------------------------------------------------------- import


def parse_coco(path: Path, problems: list[str]) -> list[ParsedAnnotation]:
    """One annotation per COCO image; images without a capture id are added to ``problems``."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: COCO JSON must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: COCO JSON needs a list {key!r}")
    cats = _category_names(path, data["categories"])
    by_image: dict[Any, list[dict]] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DatasetError(f"{path}: annotations[{i}] needs an 'image_id'")
        by_image.setdefault(a["image_id"], []).append(a)
    anns = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise DatasetError(f"{path}: images[{i}] needs an 'id'")
        cid = img.get("capture_id") if isinstance(img.get("capture_id"), str) else None
        cid = cid or find_capture_id(str(img.get("file_name", "")))
        if not cid:
            problems.append(f"{path} images[{i}] ({img.get('file_name')}): no capture id in file_name or capture_id")
            continue
        size = (img.get("width"), img.get("height"))
        size = (int(size[0]), int(size[1])) if all(isinstance(v, int) for v in size) else None
        payload = CocoImage(tuple(by_image.get(img["id"], [])), cats)
        anns.append(ParsedAnnotation(cid, f"sample {cid} ({path} image id {img['id']})", "coco", payload, size))
    unknown = set(by_image) - {img.get("id") for img in data["images"] if isinstance(img, dict)}
    if unknown:
        problems.append(f"{path}: annotations reference unknown image ids {sorted(unknown, key=str)[:10]}")
    return anns


def _category_names(path: Path, categories: list) -> dict[Any, str]:
    cats = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: categories[{i}] needs an 'id' and a 'name'")
        cats[c["id"]] = c["name"]
    return cats


def coco_to_trimap(image: CocoImage, h: int, w: int, where: str) -> np.ndarray:
    """Semantic COCO annotations -> trimap; without ``border`` ones the band is derived."""
    layers = []
    for a in image.annotations:
        name = image.categories.get(a.get("category_id"))
        if name not in TRIMAP_VALUES:
            raise DatasetError(
                f"{where}: annotation {a.get('id')} has unknown class {name or a.get('category_id')!r} (known: pet, border, background)"
            )
        layers.append((name, decode_segmentation(a.get("segmentation"), h, w, f"{where}: annotation {a.get('id')}")))
    if not any(name == "border" for name, _ in layers):  # derive the band around the pet, as for polygons
        pet = np.zeros((h, w), bool)
        for name, m in layers:
            pet = (pet | m) if name == "pet" else (pet & ~m)
        return trimap_from_pet_mask(pet)
    trimap = np.full((h, w), 2, np.uint8)
    for name, m in layers:
        trimap[m] = TRIMAP_VALUES[name]
    return trimap


def coco_to_instances(image: CocoImage, h: int, w: int, where: str, known: Mapping[str, int]) -> list[Instance]:
    """Instance COCO annotations, each category matched by name to the dataset's."""
    out = []
    for a in image.annotations:
        name = image.categories.get(a.get("category_id"))
        if name not in known:
            raise DatasetError(
                f"{where}: annotation {a.get('id')} has unknown class {name or a.get('category_id')!r} (known: {', '.join(known)})"
            )
        m = decode_segmentation(a.get("segmentation"), h, w, f"{where}: annotation {a.get('id')}")
        out.append(Instance(name, m, int(a.get("iscrowd", 0) or 0)))
    return out


def merge_samples(coco: Mapping[str, Any], samples: Sequence[CheckedSample], known: Mapping[str, int]) -> dict:
    """``coco`` with ``samples`` added under new image/annotation ids (re-annotated images replaced)."""
    ids = {s.id for s in samples}
    images = [im for im in coco.get("images", []) if Path(str(im.get("file_name", ""))).stem not in ids]
    dropped_ids = {im["id"] for im in coco.get("images", [])} - {im["id"] for im in images}
    anns = [a for a in coco.get("annotations", []) if a.get("image_id") not in dropped_ids]
    next_img = max([int(im["id"]) for im in coco.get("images", [])] + [0]) + 1
    next_ann = max([int(a["id"]) for a in coco.get("annotations", [])] + [0]) + 1
    for s in samples:
        images.append(
            {"id": next_img, "file_name": s.file, "width": s.image.width, "height": s.image.height, "capture_id": s.id}
        )
        for inst in s.instances:
            if not inst.mask.any():
                continue
            anns.append(annotation(next_ann, next_img, known[inst.category], inst.mask, inst.iscrowd))
            next_ann += 1
        next_img += 1
    return dict(coco, images=images, annotations=anns)
