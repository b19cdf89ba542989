"""Datasets: Oxford-IIIT Pet (semantic), COCO and YOLO-seg (instance), plus a generator.

``build_dataset`` is the one entry point training code needs; it picks the reader
from the task and, for instance segmentation, from what is on disk. The readers are
imported lazily so ``python -m train.data synth`` starts without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segloop.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from train.data.coco import CocoInstanceDataset
    from train.data.pets import IGNORE_INDEX, SEMANTIC_CLASSES, OxfordPetDataset
    from train.data.yolo import YoloSegDataset, yolo_to_coco

_LAZY = {
    "CocoInstanceDataset": "train.data.coco",
    "IGNORE_INDEX": "train.data.pets",
    "SEMANTIC_CLASSES": "train.data.pets",
    "OxfordPetDataset": "train.data.pets",
    "YoloSegDataset": "train.data.yolo",
    "yolo_to_coco": "train.data.yolo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "SEMANTIC_CLASSES",
    "CocoInstanceDataset",
    "OxfordPetDataset",
    "YoloSegDataset",
    "build_dataset",
    "collate_fn",
    "yolo_to_coco",
]

# Generic split names -> what each layout calls them (Oxford ships trainval/test, COCO train/val).
_PET_ALIASES = {"train": "trainval", "val": "test"}
_COCO_ALIASES = {"trainval": "train", "test": "val"}


def build_dataset(task: str, root: str | Path, split: str, transforms: Any = None, **opts: Any) -> Dataset:
    """The dataset of ``task`` ("semantic" | "instance") at ``root``.

    ``split`` may be the layout's own name or a generic one: for pets "train"/"val" mean
    trainval/test unless ``annotations/train.txt`` etc. exist; for instance data
    "trainval"/"test" mean train/val. Instance layout: COCO when
    ``annotations/instances_<split>.json`` exists, else YOLO-seg when ``data.yaml`` and
    ``labels/`` exist. ``opts`` go to the dataset (e.g. ``border="ignore"`` for pets).
    """
    from train.data.coco import CocoInstanceDataset
    from train.data.pets import OxfordPetDataset
    from train.data.yolo import YoloSegDataset, is_yolo_layout

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist")
    if task == "semantic":
        if not (root / "annotations" / f"{split}.txt").is_file():
            split = _PET_ALIASES.get(split, split)
        return OxfordPetDataset(root, split, transforms, **opts)
    if task == "instance":
        coco_split = split
        if not (root / "annotations" / f"instances_{split}.json").is_file():
            coco_split = _COCO_ALIASES.get(split, split)
        if (root / "annotations" / f"instances_{coco_split}.json").is_file() or opts.get("ann_file"):
            return CocoInstanceDataset(root, coco_split, transforms, **opts)
        if is_yolo_layout(root):
            yolo_split = split if (root / "images" / split).is_dir() else coco_split
            return YoloSegDataset(root, yolo_split, transforms, **opts)
        raise DatasetError(
            f"{root} has neither a COCO layout (annotations/instances_{coco_split}.json + images/{coco_split}/) "
            f"nor a YOLO-seg layout (data.yaml + images/{coco_split}/ + labels/{coco_split}/)"
        )
    raise ConfigError(f"task must be 'semantic' or 'instance', got {task!r}")


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[tuple[Any, ...], ...]:
    """Detection-style collate: images and targets stay lists (they differ in size / N)."""
    return tuple(zip(*batch))
