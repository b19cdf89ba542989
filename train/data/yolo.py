"""YOLO-seg reader (the layout Ultralytics' COCO8-seg ships).

Layout::

    ROOT/data.yaml               names: [a, b] or {0: a, 1: b}
    ROOT/images/<split>/*.jpg
    ROOT/labels/<split>/*.txt    one line per instance: "cls x1 y1 x2 y2 ..." (coords in [0,1])

An image without a label file has no instances (YOLO convention). Labels are
converted to an in-memory COCO dict (YOLO class ``c`` -> category id ``c + 1``), so
:class:`YoloSegDataset` is a :class:`CocoInstanceDataset` and gives exactly the same
targets and ``.coco`` evaluation index as the converted JSON would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from segloop.errors import DatasetError
from train.data.coco import CocoInstanceDataset, Transform, validate_coco_dict

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_TOL = 1e-6  # float rounding slack on the [0, 1] coordinate range


def read_names(root: Path) -> dict[int, str]:
    """Class index -> name from ``ROOT/data.yaml`` (``names`` as a list or a dict)."""
    path = root / "data.yaml"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist (YOLO-seg layout needs a data.yaml with 'names')")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DatasetError(f"{path} is not valid YAML: {err}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list) and names:
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and names:
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: 'names' keys must be integer class ids, got {list(names)}") from None
    raise DatasetError(f"{path}: 'names' must be a non-empty list or {{id: name}} mapping")


def parse_label_file(path: Path, names: dict[int, str]) -> list[tuple[int, list[float]]]:
    """``[(class, [x1, y1, ...]), ...]`` from one label file, coordinates normalised."""
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        try:
            cls = int(parts[0])
            coords = [float(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(
                f"{where}: expected 'cls x1 y1 x2 y2 ...' with an integer class and numbers, got {line.strip()!r}"
            ) from None
        if cls not in names:
            raise DatasetError(f"{where}: unknown class {cls} (data.yaml names: {sorted(names)})")
        if len(coords) % 2:
            raise DatasetError(f"{where}: odd number of polygon coordinates ({len(coords)}); expected x y pairs")
        if len(coords) < 6:
            raise DatasetError(
                f"{where}: a polygon needs at least 3 points, got {len(coords) // 2} "
                f"(is this a detection-format 'cls cx cy w h' line?)"
            )
        bad = [v for v in coords if not (-_TOL <= v <= 1 + _TOL)]
        if bad:
            raise DatasetError(f"{where}: coordinate {bad[0]} outside [0, 1]; YOLO-seg coordinates are normalised")
        out.append((cls, [min(max(v, 0.0), 1.0) for v in coords]))
    return out


def image_dir_for(root: Path, split: str) -> Path:
    return root / "images" / split


def yolo_to_coco_dict(root: str | Path, split: str) -> dict[str, Any]:
    """COCO instances dict of a YOLO-seg split (file names relative to ``images/<split>``)."""
    root = Path(root)
    names = read_names(root)
    img_dir, lbl_dir = image_dir_for(root, split), root / "labels" / split
    if not img_dir.is_dir():
        raise DatasetError(f"image directory {img_dir} does not exist (YOLO-seg layout: ROOT/images/<split>/)")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DatasetError(f"image directory {img_dir} has no images ({', '.join(IMAGE_EXTS)})")
    images, anns = [], []
    for image_id, path in enumerate(files, start=1):
        try:
            with Image.open(path) as im:
                w, h = im.size
        except OSError as err:
            raise DatasetError(f"image {path} cannot be read: {err}") from None
        images.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        label = lbl_dir / f"{path.stem}.txt"
        if not label.is_file():
            continue
        for cls, coords in parse_label_file(label, names):
            poly = [v * (w if i % 2 == 0 else h) for i, v in enumerate(coords)]
            rle = mask_utils.frPyObjects([poly], h, w)[0]
            xs, ys = poly[0::2], poly[1::2]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "segmentation": [poly],
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": k + 1, "name": v, "supercategory": "none"} for k, v in sorted(names.items())]
    return {"images": images, "annotations": anns, "categories": cats}


def yolo_to_coco(root: str | Path, split: str, out_json: str | Path) -> Path:
    """Write a YOLO-seg split as COCO JSON; use it with ``img_dir=ROOT/images/<split>``."""
    data = yolo_to_coco_dict(root, split)
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    return out


def is_yolo_layout(root: str | Path) -> bool:
    root = Path(root)
    return (root / "data.yaml").is_file() and (root / "labels").is_dir()


class YoloSegDataset(CocoInstanceDataset):
    """YOLO-seg split with the same ``(image, target)`` items and attributes as COCO."""

    def __init__(self, root: str | Path, split: str = "train", transforms: Transform | None = None) -> None:
        self.root = Path(root)
        self.split = split
        img_dir = image_dir_for(self.root, split)
        data = validate_coco_dict(
            yolo_to_coco_dict(self.root, split), f"{self.root} (YOLO-seg, split {split})", img_dir
        )
        self._setup(data, None, img_dir, transforms)
