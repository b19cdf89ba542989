"""COCO instance-segmentation reader.

Layout: ``ROOT/annotations/instances_<split>.json`` + ``ROOT/images/<split>/<file_name>``.
The JSON is validated up front (every user mistake becomes a :class:`DatasetError`
naming the file), then handed to pycocotools so evaluation sees exactly the same
ground truth as training. COCO category ids are arbitrary (COCO itself has gaps),
while detection heads want labels 1..K with 0 = background, so both maps are kept.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from segloop.errors import DatasetError
from train.data.pets import load_rgb

Transform = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANN_KEYS = ("id", "image_id", "category_id", "segmentation")


def read_json(path: Path) -> Any:
    """Parse a JSON file, reporting syntax errors with their line/column."""
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"annotation file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno} (char {err.pos})"
        ) from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"annotation file {path} is not UTF-8 text: {err}") from None


def category_maps(categories: list[dict]) -> tuple[dict[int, int], dict[int, int]]:
    """``(cat_id_to_label, label_to_cat_id)``: sorted category ids -> labels 1..K."""
    ids = sorted(int(c["id"]) for c in categories)
    cat_id_to_label = {cid: i + 1 for i, cid in enumerate(ids)}
    return cat_id_to_label, {v: k for k, v in cat_id_to_label.items()}


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict:
    """One RLE for a polygon list, an uncompressed RLE or a compressed RLE (as ``COCO.annToRLE``)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Binary uint8 mask [H,W] of a COCO segmentation."""
    return mask_utils.decode(segmentation_to_rle(segm, height, width))


def empty_rle(height: int, width: int) -> dict:
    """Compressed (JSON-safe) RLE of an all-zero mask."""
    rle = mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _check_segmentation(segm: Any, where: str, height: int, width: int) -> None:
    if isinstance(segm, list):
        for poly in segm:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
                raise DatasetError(
                    f"{where}: polygon segmentation must be a list of [x1, y1, x2, y2, ...] number lists"
                )
            if len(poly) % 2:
                raise DatasetError(f"{where}: polygon has an odd number of coordinates ({len(poly)})")
        # Polygons of < 3 points have no area, and pycocotools would read a 4-number one
        # as a box; drop them so training and evaluation both see an empty region.
        segm[:] = [p for p in segm if len(p) >= 6]
    elif isinstance(segm, dict):
        counts, size = segm.get("counts"), segm.get("size")
        if counts is None or size is None:
            raise DatasetError(f"{where}: RLE segmentation needs 'counts' and 'size' keys")
        if not isinstance(counts, (list, str)):
            raise DatasetError(f"{where}: RLE 'counts' must be a list of ints or a compressed string")
        if list(size) != [height, width]:
            raise DatasetError(f"{where}: RLE size {list(size)} does not match image size [{height}, {width}]")
        if isinstance(counts, list) and sum(counts) != height * width:
            raise DatasetError(f"{where}: RLE counts sum to {sum(counts)}, expected height*width = {height * width}")
    else:
        raise DatasetError(f"{where}: segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}")


def validate_coco_dict(data: Any, source: str, img_dir: Path | None) -> dict:
    """Check a COCO instances dict and fill in ``bbox``/``area``/``iscrowd`` where missing.

    Returns the (mutated) dict. ``img_dir`` None skips the image-file existence check.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{source}: missing top-level key {key!r} (COCO instances format)")
        if not isinstance(data[key], list):
            raise DatasetError(f"{source}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise DatasetError(f"{source}: 'categories' is empty; at least one category is required")
    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{source}: categories[{i}] must have 'id' and 'name'")
        if c["id"] in cat_ids:
            raise DatasetError(f"{source}: duplicate category id {c['id']}")
        cat_ids.add(c["id"])
    images = {}
    for i, img in enumerate(data["images"]):
        missing = [k for k in _IMAGE_KEYS if not isinstance(img, dict) or k not in img]
        if missing:
            raise DatasetError(f"{source}: images[{i}] is missing key(s) {missing}")
        if img["id"] in images:
            raise DatasetError(f"{source}: duplicate image id {img['id']}")
        if img_dir is not None and not (img_dir / img["file_name"]).is_file():
            raise DatasetError(
                f"{source}: images[{i}] (id {img['id']}) references {img['file_name']}, "
                f"but {img_dir / img['file_name']} does not exist"
            )
        images[img["id"]] = img
    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in _ANN_KEYS if not isinstance(ann, dict) or k not in ann]
        where = f"{source}: annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        if missing:
            raise DatasetError(f"{where} is missing key(s) {missing}")
        if ann["id"] in ann_ids:
            raise DatasetError(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if ann["category_id"] not in cat_ids:
            raise DatasetError(f"{where} has unknown category id {ann['category_id']} (known: {sorted(cat_ids)})")
        img = images.get(ann["image_id"])
        if img is None:
            raise DatasetError(f"{where} references unknown image id {ann['image_id']}")
        h, w = int(img["height"]), int(img["width"])
        _check_segmentation(ann["segmentation"], where, h, w)
        if not ann["segmentation"]:
            ann["segmentation"] = empty_rle(h, w)
        ann.setdefault("iscrowd", 0)
        if "bbox" not in ann or "area" not in ann:
            rle = segmentation_to_rle(ann["segmentation"], h, w)
            if "bbox" not in ann:
                ann["bbox"] = mask_utils.toBbox(rle).tolist()
            if "area" not in ann:
                ann["area"] = float(mask_utils.area(rle))
        elif not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise DatasetError(f"{where}: 'bbox' must be [x, y, width, height]")
    return data


@contextlib.contextmanager
def quiet_pycocotools() -> Iterator[None]:
    """Drop pycocotools' progress prints ("creating index...", "DONE (t=0.01s)").

    Redirecting stdout is not enough in a Ray Train worker: Ray patches ``builtins.print`` to
    log every print, redirected or not. So the builtin is swapped too, for this block only;
    prints to an explicit file other than stdout still go through.
    """
    patched = builtins.print

    def drop(*args: Any, file: Any = None, **kwargs: Any) -> None:
        if file is not None and file is not sys.stdout:
            patched(*args, file=file, **kwargs)

    builtins.print = drop
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = patched


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO index over an in-memory dict (without its chatter on stdout)."""
    coco = COCO()
    coco.dataset = data
    with quiet_pycocotools():
        coco.createIndex()
    return coco


class CocoInstanceDataset(Dataset):
    """COCO instances as ``(uint8 image [3,H,W], target dict)`` for Mask R-CNN.

    Images without annotations are kept (with empty targets) so evaluation covers the
    whole split; training code may drop them. Boxes with no width or height are
    dropped from targets (as in torchvision's references) but remain in ``.coco``.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Transform | None = None,
        *,
        ann_file: str | Path | None = None,
        img_dir: str | Path | None = None,
    ) -> None:
        if root is None and (ann_file is None or img_dir is None):
            raise DatasetError("CocoInstanceDataset needs root (+ split) or both ann_file and img_dir")
        self.root = Path(root) if root is not None else None
        self.split = split
        ann_path = Path(ann_file) if ann_file is not None else self.root / "annotations" / f"instances_{split}.json"
        image_dir = Path(img_dir) if img_dir is not None else self.root / "images" / split
        if not image_dir.is_dir():
            raise DatasetError(f"image directory {image_dir} does not exist (expected ROOT/images/<split>/)")
        data = validate_coco_dict(read_json(ann_path), str(ann_path), image_dir)
        self._setup(data, ann_path, image_dir, transforms)

    def _setup(self, data: dict, ann_file: Path | None, img_dir: Path, transforms: Transform | None) -> None:
        self.ann_file = ann_file
        self.img_dir = img_dir
        self.transforms = transforms
        self.coco = coco_from_dict(data)
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.cat_id_to_label, self.label_to_cat_id = category_maps(cats)
        self.class_names = ("background", *(str(c["name"]) for c in cats))
        self.num_classes = len(self.class_names)
        self.ids = sorted(self.coco.imgs)
        self.names = [self.coco.imgs[i]["file_name"] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def source(self) -> str:
        return str(self.ann_file) if self.ann_file is not None else str(self.img_dir)

    def load_target(self, index: int) -> dict[str, Any]:
        """Target dict of image ``index`` in its original resolution (no transforms)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = self.coco.imgToAnns.get(image_id, [])
        boxes, labels, masks, areas, crowd = [], [], [], [], []
        for ann in anns:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + bw, float(w)), min(y + bh, float(h))
            if x2 <= x1 or y2 <= y1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_id_to_label[ann["category_id"]])
            masks.append(decode_segmentation(ann["segmentation"], h, w))
            areas.append(float(ann["area"]))
            crowd.append(int(ann.get("iscrowd", 0)))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "image_id": int(image_id),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.coco.imgs[self.ids[index]]
        path = self.img_dir / info["file_name"]
        image = load_rgb(path)
        if tuple(image.shape[-2:]) != (int(info["height"]), int(info["width"])):
            raise DatasetError(
                f"{self.source}: image {path} is {image.shape[2]}x{image.shape[1]} but the annotation "
                f"says {info['width']}x{info['height']} (width x height)"
            )
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, n={len(self)}, classes={self.class_names[1:]})"
