"""A stand-in annotator for demos and tests: writes the ground truth of captured synthetic
images (found by image sha256 in a generated dataset root) as corrected annotations, in
the formats a real annotator would hand back (trimap PNGs, or COCO JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from dataplane.annotation.records import CaptureRecord
from dataplane.masks import label_png, read_label_png
from dataplane.store import ObjectStore
from segloop.errors import DatasetError

Truth = Union[Mapping[str, Any], Callable[[CaptureRecord], Any]]


class DatasetTruth:
    """Callable(record) -> the ground truth of the dataset file with the capture's image sha256."""

    def __init__(self, trimaps: Mapping[str, Path], instances: Mapping[str, list[dict[str, Any]]]):
        self.trimaps = dict(trimaps)  # image sha256 -> trimap PNG
        self.instances = dict(instances)  # image sha256 -> [{"category", "segmentation", "iscrowd"}]

    def __len__(self) -> int:
        return len(self.trimaps.keys() | self.instances.keys())

    def __call__(self, rec: CaptureRecord) -> Any:
        sha = str(rec.meta.get("image_sha256"))
        if sha in self.instances:  # a COCO file wins over a Pets one with the same bytes
            return self.instances[sha]
        path = self.trimaps.get(sha)
        if path is None:
            return None
        return read_label_png(path.read_bytes(), str(path)).astype(np.uint8)


def truth_from_dataset(root: Union[str, os.PathLike]) -> Callable[[CaptureRecord], Any]:
    """Ground truth of captures whose image bytes are files of a generated (or any) dataset root.

    Matches a capture to a file by the sha256 its metadata records. Pets layout: returns the
    trimap ``annotations/trimaps/<name>.png`` as an array; COCO layout: the image's
    annotations as ``[{"category": name, "segmentation": ..., "iscrowd": 0|1}]``. None when no
    file matches.
    """
    root = Path(root)
    truth = DatasetTruth(_pets_index(root), _coco_index(root))
    if not len(truth):
        raise DatasetError(f"{root} has no images/ with annotations to take ground truth from")
    return truth


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pets_index(root: Path) -> dict[str, Path]:
    tri_dir = root / "annotations" / "trimaps"
    if not tri_dir.is_dir():
        return {}
    return {_sha256(p): tri_dir / f"{p.stem}.png" for p in sorted((root / "images").glob("*")) if p.is_file()}


def _coco_index(root: Path) -> dict[str, list[dict[str, Any]]]:
    index = {}
    for ann_file in sorted((root / "annotations").glob("instances_*.json")):
        split = ann_file.stem[len("instances_") :]
        data = json.loads(ann_file.read_text())
        cats = {c["id"]: c["name"] for c in data["categories"]}
        by_img: dict[int, list] = {}
        for a in data["annotations"]:
            by_img.setdefault(a["image_id"], []).append(
                {"category": cats[a["category_id"]], "segmentation": a["segmentation"], "iscrowd": a.get("iscrowd", 0)}
            )
        for im in data["images"]:
            p = root / "images" / split / im["file_name"]
            if p.is_file():
                index[_sha256(p)] = by_img.get(im["id"], [])
    return index


def simulate_annotation(
    store: ObjectStore,
    records: Iterable[CaptureRecord],
    truth: Truth,
    out_dir: Union[str, os.PathLike],
    *,
    skip_missing: bool = False,
) -> Path:
    """A stand-in annotator: writes the true annotation of each record, returns what to import.

    ``truth``: capture id -> value, or a callable(record) -> value (e.g. :func:`truth_from_dataset`);
    a semantic value is a trimap array (1/2/3), written as ``out_dir/trimaps/<id>.png``;
    an instance value is a list of ``{"category", "segmentation", "iscrowd"}``, written to
    ``out_dir/annotations.coco.json``. Returns the path to pass to :func:`import_annotations`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trimaps, coco_items = [], []
    for rec in records:
        value = truth(rec) if callable(truth) else truth.get(rec.id)
        if value is None:
            if skip_missing:
                continue
            raise DatasetError(f"no ground truth for capture {rec.id} ({rec.image_key})")
        if isinstance(value, np.ndarray):
            trimaps.append((rec, value))
        else:
            coco_items.append((rec, list(value)))
    if trimaps and coco_items:
        raise DatasetError("ground truth mixes trimaps and instances; simulate one task at a time")
    if trimaps:
        (out / "trimaps").mkdir(exist_ok=True)
        for rec, value in trimaps:
            (out / "trimaps" / f"{rec.id}.png").write_bytes(label_png(np.asarray(value)))
        return out / "trimaps"
    path = out / "annotations.coco.json"
    path.write_text(json.dumps(_coco_json(coco_items)))
    return path


def _coco_json(items: list[tuple[CaptureRecord, list[dict[str, Any]]]]) -> dict[str, Any]:
    """The true instances as a COCO JSON whose images name their capture ids."""
    names = sorted({inst["category"] for _, insts in items for inst in insts})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for n, i in cat_ids.items()],
    }
    for n, (rec, insts) in enumerate(items, 1):
        coco["images"].append({"id": n, "file_name": f"{rec.id}.jpg", "capture_id": rec.id})
        for inst in insts:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": n,
                    "category_id": cat_ids[inst["category"]],
                    "segmentation": inst["segmentation"],
                    "iscrowd": int(inst.get("iscrowd", 0)),
                }
            )
    return coco


def truth_regions(value: Any, height: int, width: int, labels: Sequence[str], what: str) -> list[dict[str, Any]]:
    """A ground-truth value (a trimap, or instances with COCO segmentations) as exact brush regions."""
    from dataplane.annotation.labelstudio import brush_region, semantic_brush_regions
    from dataplane.masks import decode_segmentation

    if isinstance(value, np.ndarray):
        return semantic_brush_regions(value, width, height)
    out = []
    for k, inst in enumerate(value):
        if inst["category"] not in labels:
            raise DatasetError(f"{what}: instance {k} has class {inst['category']!r}, not in the project's labels")
        mask = decode_segmentation(inst["segmentation"], height, width, f"{what}: instance {k}")
        out.append(brush_region(mask, inst["category"], width, height, k, None))
    return out


def annotate_in_label_studio(ls: Any, project_id: int, store: ObjectStore, truth: Truth) -> int:
    """A stand-in annotator working in Label Studio: submits the ground truth of every task
    without an annotation, through the API, as brush masks. Returns how many it submitted."""
    from dataplane.annotation.images import captured_image
    from dataplane.annotation.ls_project import project_tasks
    from dataplane.annotation.records import get_capture

    project = ls.projects.get(id=project_id)
    labels = _config_labels(project.label_config)
    done = 0
    for task in project_tasks(ls, project_id):
        if task.get("annotations"):
            continue
        rec = get_capture(store, str(task["data"]["capture_id"]))
        value = truth(rec) if callable(truth) else truth.get(rec.id)
        if value is None:
            raise DatasetError(f"no ground truth for capture {rec.id} (Label Studio task {task['id']})")
        image = captured_image(store, rec, f"capture {rec.id}")
        regions = truth_regions(value, image.height, image.width, labels, f"task {task['id']}")
        ls.annotations.create(id=task["id"], result=regions, was_cancelled=False, lead_time=1.0)
        done += 1
    return done


def _config_labels(label_config: str) -> list[str]:
    import xml.etree.ElementTree as ET

    return [el.get("value", "") for el in ET.fromstring(label_config).iter("Label")]
