"""Export: a batch of captures chosen by a selection strategy (:mod:`.selection`), with the
model's predictions as pre-annotations so annotators correct rather than draw::

    DIR/images/<id>.<ext>               the captured image (EXIF orientation applied, as served)
    DIR/label_studio_tasks.json         Label Studio tasks; predictions as ``polygonlabels``
    DIR/label_studio_config.xml         the matching labelling config (PolygonLabels "label" on "image")
    DIR/coco_preannotations.json        COCO instances; the predicted masks as RLE annotations
    DIR/trimaps/<id>.png                semantic only: predicted Oxford trimaps (1 pet, 2 bg, 3 border)
    DIR/export.json                     what was exported (ids, store keys, entropies) and, per
                                        pick, its scores and why it was picked

:func:`export` reads top to bottom: select, load every capture (a bad one is left out and
reported, not fatal), write each format, then the index.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from dataplane.annotation import coco, labelstudio, trimaps
from dataplane.annotation.images import CapturedImage, captured_image
from dataplane.annotation.records import CaptureRecord, iso, list_captures, sample_names
from dataplane.annotation.selection import NEEDS_EMBEDDINGS, Rescorer, Selection, SelectionSpec, select_captures
from dataplane.masks import decode_segmentation, read_label_png
from dataplane.store import EXPORTS_PREFIX, ObjectNotFound, ObjectStore
from segloop.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from dataplane.versions import Manifest

EXPORT_FORMAT = 1


@dataclass
class ExportResult:
    out_dir: Path
    task: str
    records: list[CaptureRecord]
    label_studio: Path
    coco: Path
    trimaps: Optional[Path]
    problems: list[str]


@dataclass(frozen=True, eq=False)
class PredictedInstance:
    """One predicted instance of a capture: its class name (None if unknown), score and mask."""

    name: Optional[str]
    score: Any
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class ExportItem:
    """One capture ready to write: its image and its prediction (a trimap, or instances)."""

    rec: CaptureRecord
    image: CapturedImage
    trimap: Optional[np.ndarray] = None
    instances: tuple[PredictedInstance, ...] = ()

    @property
    def file(self) -> str:
        return f"{self.rec.id}.{self.image.ext}"


def export(
    store: ObjectStore,
    out_dir: Union[str, os.PathLike],
    top: int = 50,
    task: Optional[str] = None,
    *,
    since: Any = None,
    until: Any = None,
    model_version: Optional[str] = None,
    exclude: Optional[Manifest] = None,
    records: Optional[Sequence[CaptureRecord]] = None,
    image_url_prefix: str = "images/",
    selection: Optional[SelectionSpec] = None,
    rescore: Optional[Rescorer] = None,
) -> ExportResult:
    """Write a batch of captures with pre-annotations for annotators (see module doc).

    ``selection`` chooses the batch (:mod:`.selection`: strategy, budget, seed; ``rescore``
    re-scores with the current model first and embeds ``exclude``'s images as what is already
    labelled); without it, the ``top`` most uncertain by the
    recorded entropy. ``records`` overrides both. All selected captures must share one task (pass
    ``task`` to pick one when traffic mixes them). Captures that cannot be exported (image
    missing or modified, unreadable mask) are left out and listed in ``problems``.
    ``image_url_prefix`` prefixes ``data.image`` in the Label Studio tasks (e.g. a URL your
    Label Studio can fetch, or ``/data/local-files/?d=...``).
    """
    chosen: Optional[Selection] = None
    if records is None and selection is not None:
        chosen = select_batch(store, selection, task, since, until, model_version, exclude=exclude, rescore=rescore)
        records = chosen.records
    if records is None:
        if not isinstance(top, int) or top < 1:
            raise ConfigError(f"--top must be a positive integer, got {top!r}")
        records = list_captures(store, since, until, model_version, task=task, exclude=exclude, limit=top)
    records = list(records)
    if not records:
        raise DatasetError(
            f"no captures to export from {store.describe()} (filters: task={task}, model_version={model_version})"
        )
    task, class_names = common_task(records)
    out = _prepare_export_dir(Path(out_dir))
    (out / "images").mkdir()
    trimap_dir = out / "trimaps" if task == "semantic" else None
    if trimap_dir is not None:
        trimap_dir.mkdir()

    items, problems = load_items(store, records, task, class_names)
    problems = (chosen.problems if chosen is not None else []) + problems
    for item in items:
        (out / "images" / item.file).write_bytes(item.image.data)
        if trimap_dir is not None:
            trimaps.write_trimap(trimap_dir, item.rec.id, item.trimap)
    ls_path, coco_path = out / "label_studio_tasks.json", out / "coco_preannotations.json"
    labels = labelstudio.export_labels(task, class_names)
    labelstudio.write_tasks(ls_path, items, task, labels, image_url_prefix)
    coco.write_preannotations(coco_path, items, task, coco.export_categories(task, class_names))
    (out / "label_studio_config.xml").write_text(labelstudio.label_studio_config(labels))
    _write_index(out / "export.json", store, task, class_names, items, problems, chosen)
    return ExportResult(out, task, [item.rec for item in items], ls_path, coco_path, trimap_dir, problems)


def select_batch(
    store: ObjectStore,
    spec: SelectionSpec,
    task: Optional[str] = None,
    since: Any = None,
    until: Any = None,
    model_version: Optional[str] = None,
    *,
    exclude: Optional[Manifest] = None,
    rescore: Optional[Rescorer] = None,
    skip: frozenset[str] = frozenset(),
) -> Selection:
    """The batch ``spec`` chooses from the captures matching the filters, leaving out ``skip``
    (e.g. already in a Label Studio project). What is labelled: the captures already in
    ``exclude`` and, when re-scoring for kcenter/badge, every image of that dataset version."""
    pool = [r for r in list_captures(store, since, until, model_version, task=task) if r.id not in skip]
    done = sample_names(exclude) if exclude is not None else set()
    candidates = [r for r in pool if r.id not in done]
    if not candidates:
        raise DatasetError(
            f"no captures to select from in {store.describe()} (all {len(pool)} already annotated"
            + (f"; {len(skip)} already sent to annotators" if skip else "")
            + ")"
        )
    labelled = [r for r in pool if r.id in done]
    embed = rescore is not None and exclude is not None and spec.strategy in NEEDS_EMBEDDINGS
    return select_captures(candidates, spec, labelled, rescore, rescore.dataset(exclude) if embed else None)


def common_task(records: Sequence[CaptureRecord]) -> tuple[str, list[str]]:
    """The one task and class list all records share (DatasetError when they differ)."""
    tasks = sorted({str(r.task) for r in records})
    if len(tasks) > 1:
        raise DatasetError(f"captures mix tasks {tasks}; pass task= (--task) to export one of them")
    task = tasks[0]
    if task not in ("semantic", "instance"):
        raise DatasetError(f"captures have unknown task {task!r}")
    class_names = records[0].class_names
    for r in records:
        if r.class_names != class_names:
            raise DatasetError(
                f"captures disagree on class names ({class_names} vs {r.class_names} in {r.id}); "
                "filter by --model-version"
            )
    return task, class_names


def _prepare_export_dir(out: Path) -> Path:
    """Create ``out``; a non-empty one is refused (it may hold an annotator's edited trimaps,
    and stale files from an older export would be imported with the new ones)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"export directory {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise DatasetError(f"export directory {out} is not empty; export into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_items(
    store: ObjectStore, records: Sequence[CaptureRecord], task: str, class_names: list[str]
) -> tuple[list[ExportItem], list[str]]:
    """``(items, problems)``: every record that loads, in order; the errors of the others."""
    items, problems = [], []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for fut in [pool.submit(_load_item, store, r, task, class_names) for r in records]:
            try:
                items.append(fut.result())
            except DatasetError as err:
                problems.append(str(err))
    if not items:
        raise DatasetError(f"none of the {len(records)} selected captures can be exported:\n  " + "\n  ".join(problems))
    return items, problems


def _load_item(store: ObjectStore, rec: CaptureRecord, task: str, class_names: list[str]) -> ExportItem:
    image = captured_image(store, rec, f"capture {rec.id}: image {rec.image_key}")
    w, h = image.width, image.height
    if (rec.width, rec.height) not in ((w, h), (None, None)):
        raise DatasetError(f"capture {rec.id}: image is {w}x{h} but the prediction was {rec.width}x{rec.height}")
    if task == "semantic":
        labels = _predicted_labels(store, rec, h, w)
        return ExportItem(rec, image, trimap=trimaps.predicted_trimap(labels, class_names, h, w, f"capture {rec.id}"))
    pre = rec.meta.get("preannotation") or {}
    instances = []
    for k, inst in enumerate(pre.get("instances") or []):
        mask = decode_segmentation(inst.get("segmentation"), h, w, f"capture {rec.id}: instance {k}")
        instances.append(PredictedInstance(_class_name(inst, class_names), inst.get("score"), mask))
    return ExportItem(rec, image, instances=tuple(instances))


def _class_name(inst: dict[str, Any], class_names: list[str]) -> Optional[str]:
    cid = inst.get("category_id")
    return inst.get("category_name") or (
        class_names[cid] if isinstance(cid, int) and 0 < cid < len(class_names) else None
    )


def _predicted_labels(store: ObjectStore, rec: CaptureRecord, h: int, w: int) -> Optional[np.ndarray]:
    """The predicted class-index mask of a semantic capture; None when it recorded none."""
    pre = rec.meta.get("preannotation") or {}
    if pre.get("kind") != "mask_png" or not pre.get("key"):
        return None
    try:
        labels = read_label_png(store.get_bytes(pre["key"]), f"capture {rec.id}: predicted mask {pre['key']}")
    except ObjectNotFound:
        raise DatasetError(f"capture {rec.id}: predicted mask {pre['key']} is missing") from None
    if labels.shape != (h, w):
        raise DatasetError(f"capture {rec.id}: predicted mask is {labels.shape[1]}x{labels.shape[0]}, image is {w}x{h}")
    return labels


def _why(chosen: Optional[Selection], capture_id: str) -> dict[str, Any]:
    """``{"selection": {rank, uncertainty, reason, ...}}`` of one exported capture, if it was selected."""
    if chosen is None:
        return {}
    for rec, pick in zip(chosen.records, chosen.picks):
        if rec.id == capture_id:
            return {"selection": pick.as_dict()}
    return {}


def _write_index(
    path: Path,
    store: ObjectStore,
    task: str,
    class_names: list[str],
    items: Sequence[ExportItem],
    problems: list[str],
    chosen: Optional[Selection] = None,
) -> None:
    index = {
        "format": EXPORT_FORMAT,
        "store": store.describe(),
        "task": task,
        "class_names": class_names,
        "created": iso(_dt.datetime.now(_dt.UTC)),
        "problems": problems,
        "selection": chosen.index() if chosen is not None else {"strategy": "top", "score": "entropy"},
        "captures": [dict(item.rec.summary(), file=item.file, **_why(chosen, item.rec.id)) for item in items],
    }
    path.write_text(json.dumps(index, indent=1))
    record_export(store, index)


def record_export(store: ObjectStore, index: dict[str, Any], kind: str = "") -> None:
    """Keep what went to annotators in the store: retention never deletes those captures."""
    stamp = index["created"].replace(":", "")
    store.put_json(f"{EXPORTS_PREFIX}{stamp}-{kind + '-' if kind else ''}{uuid.uuid4().hex[:8]}.json", index)
