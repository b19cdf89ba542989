"""Import: corrected annotations -> a new dataset version, all or nothing.

Reads a Label Studio JSON export, a COCO JSON, or a directory of trimap PNGs named
``<id>.png`` (``auto`` picks by content), validates *every* sample (capture exists and its
image matches its recorded sha256, mask size = image size, classes known, trimap values in
{1,2,3}, JSON well-formed), reports all problems at once naming each sample, and only then
writes a new dataset version = parent + the new samples (:func:`dataplane.versions.add_samples`,
manifest written last). Sample names are capture ids. Oxford layout: ``images/<id>.<ext>``,
``annotations/trimaps/<id>.png``, ``annotations/<split>.txt``; COCO layout:
``images/<split>/<id>.<ext>`` and a merged ``annotations/instances_<split>.json`` with new
image/annotation ids, categories matched by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from dataplane.annotation import coco, labelstudio, trimaps
from dataplane.annotation.formats import FORMATS, Instance, ParsedAnnotation, detect_format
from dataplane.annotation.images import CapturedImage, captured_image
from dataplane.annotation.records import get_capture, sample_names
from dataplane.masks import label_png
from dataplane.store import ObjectNotFound, ObjectStore, blob_key
from segloop.errors import ConfigError, DatasetError, StoreError

if TYPE_CHECKING:
    from dataplane.versions import Manifest

Source = Union[Path, labelstudio.TaskList]  # a file or directory, or tasks pulled from a server
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, eq=False)
class CheckedSample:
    """One sample that passed every check: its captured image and its annotation."""

    id: str
    image: CapturedImage
    trimap: Optional[np.ndarray] = None  # semantic
    instances: tuple[Instance, ...] = ()  # instance

    @property
    def file(self) -> str:
        return f"{self.id}.{self.image.ext}"


IMPORT_ATTEMPTS = 4  # parent 'latest': how often an import is redone onto a head that moved


def import_annotations(
    store: ObjectStore,
    dataset_name: str,
    parent_version: Union[str, Manifest, None],
    annotations_path: Union[str, os.PathLike, labelstudio.TaskList],
    fmt: str = "auto",
    split: Optional[str] = None,
    *,
    replace: bool = False,
    branch: bool = False,
    notes: Optional[Mapping[str, Any]] = None,
    workers: int = 8,
) -> Manifest:
    """Validate corrected annotations and create a new version of ``dataset_name`` (see module doc).

    ``split`` defaults to ``trainval`` (semantic) / ``train`` (instance). Samples already in
    the parent are refused unless ``replace`` (then their files are replaced in the child;
    the parent stays as it was). Returns the new :class:`dataplane.versions.Manifest`. Every
    problem is collected and raised together as one DatasetError naming each sample; in that
    case nothing is written to the store.

    Concurrent imports never lose one another's samples. With parent ``latest`` (or None)
    an import that finds the head moved is re-applied onto the new head by add_samples, and
    when both wrote the same file (COCO's merged ``instances_<split>.json``, a re-annotated
    sample) it is validated and merged again from the new head, up to IMPORT_ATTEMPTS times.
    An explicit parent that is not (or no longer) the head raises
    :class:`dataplane.versions.HeadMoved`, naming the head, and writes nothing — unless
    ``branch``: then the import is a side version off that parent, which ``latest`` never
    returns (to compare alternative annotations of the same samples).
    """
    from dataplane.versions import RebaseConflict

    path = annotations_path if isinstance(annotations_path, labelstudio.TaskList) else Path(annotations_path)
    follow = parent_version is None or parent_version == "latest"
    for attempt in range(IMPORT_ATTEMPTS):
        try:
            return _import_once(
                store, dataset_name, parent_version, path, _Options(fmt, split, replace, branch, notes, workers)
            )
        except RebaseConflict:
            if not follow or attempt == IMPORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class _Options:
    """The caller's choices of one import, kept across its attempts."""

    fmt: str
    split: Optional[str]
    replace: bool
    branch: bool
    notes: Optional[Mapping[str, Any]]
    workers: int


def _import_once(
    store: ObjectStore, dataset_name: str, parent_version: Union[str, Manifest, None], path: Source, opts: _Options
) -> Manifest:
    """One validate-and-add pass of :func:`import_annotations` onto the parent as it is now."""
    from dataplane.versions import add_samples

    fmt, split, replace, notes, workers = opts.fmt, opts.split, opts.replace, opts.notes, opts.workers
    parent, fmt, split = _resolve(store, dataset_name, parent_version, path, fmt, split)
    follow = parent_version is None or parent_version == "latest"
    task = parent.task
    problems: list[str] = []
    anns, skipped = _parse(path, fmt, problems)
    coco_parent = _parent_coco(store, parent, split) if task == "instance" else None
    known = {str(c["name"]): int(c["id"]) for c in coco_parent.get("categories", [])} if coco_parent else {}
    checker = SampleChecker(store, parent, known, frozenset(sample_names(parent)), replace)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(anns) or 1))) as pool:
        results = list(pool.map(checker.check_or_problem, anns))
    problems += [r for r in results if isinstance(r, str)]
    if problems:
        raise DatasetError(
            f"import of {path} into {parent.ref} refused: {len(problems)} problem(s), nothing was written:\n  "
            + "\n  ".join(problems)
        )
    good = [r for r in results if isinstance(r, CheckedSample)]
    if task == "semantic":
        new_files, names = _oxford_files(good, parent)
    else:
        new_files, names = _coco_files(good, coco_parent, known, split)
    info = {
        "import": {
            "from": path.name,
            "format": fmt,
            "split": split,
            "captures": [s.id for s in good],
            "skipped_unannotated": skipped,
            "store": store.describe(),
        }
    }
    return add_samples(
        store,
        dataset_name,
        parent,
        new_files,
        {split: names},
        notes={**info, **dict(notes or {})},
        rebase=follow,
        branch=opts.branch,
        workers=workers,
    )


def _resolve(
    store: ObjectStore,
    dataset_name: str,
    parent_version: Union[str, Manifest, None],
    path: Source,
    fmt: str,
    split: Optional[str],
) -> tuple[Manifest, str, str]:
    """``(parent, format, split)`` of an import, each checked (``auto`` format detected)."""
    from dataplane.versions import get_version

    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not one of auto, coco, labelstudio, trimaps")
    parent = (
        parent_version
        if hasattr(parent_version, "files")
        else get_version(store, dataset_name, parent_version or "latest")
    )
    task = parent.task
    split = split or ("trainval" if task == "semantic" else "train")
    if not SPLIT_NAME.fullmatch(split):
        raise ConfigError(f"invalid split name {split!r}")
    if isinstance(path, labelstudio.TaskList):
        if fmt not in ("auto", "labelstudio"):
            raise ConfigError(f"{path} holds Label Studio tasks, not {fmt}")
        fmt = "labelstudio"
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "trimaps" and task != "semantic":
        raise DatasetError(f"trimap PNGs only annotate semantic datasets; {parent.ref} is {task}")
    return parent, fmt, split


def _parse(path: Source, fmt: str, problems: list[str]) -> tuple[list[ParsedAnnotation], list[str]]:
    """``(annotations, ids of unannotated tasks)`` in ``path``; per-sample problems are collected."""
    skipped: list[str] = []
    if fmt == "trimaps":
        if not path.is_dir():
            raise DatasetError(f"trimap import needs a directory of <id>.png files, got {path}")
        anns = trimaps.parse_trimaps(path)
    elif isinstance(path, labelstudio.TaskList):
        anns, skipped = labelstudio.parse_tasks(path.tasks, path.source, problems)
    elif fmt == "labelstudio":
        anns, skipped = labelstudio.parse_labelstudio(path, problems)
    else:
        anns = coco.parse_coco(path, problems)
    seen: dict[str, str] = {}
    for a in anns:
        if a.capture_id in seen:
            problems.append(f"{a.where}: capture annotated twice (also {seen[a.capture_id]})")
        seen.setdefault(a.capture_id, a.where)
    if not anns and not problems:
        raise DatasetError(
            f"{path}: no annotated samples to import"
            + (f" ({len(skipped)} tasks without annotations)" if skipped else "")
        )
    return anns, skipped


@dataclass(frozen=True)
class SampleChecker:
    """Checks parsed annotations against their captures and the parent version."""

    store: ObjectStore
    parent: Manifest
    known: Mapping[str, int]  # instance categories of the parent, by name
    existing: frozenset[str]  # sample names already in the parent
    replace: bool

    def check_or_problem(self, ann: ParsedAnnotation) -> Union[CheckedSample, str]:
        """The checked sample, or its problem as a message that starts by naming the sample."""
        try:
            return self.check(ann)
        except DatasetError as err:
            msg = str(err)
            return msg if msg.startswith(ann.where) else f"{ann.where}: {msg}"

    def check(self, ann: ParsedAnnotation) -> CheckedSample:
        cid, task = ann.capture_id, self.parent.task
        rec = get_capture(self.store, cid)
        if rec.task not in (None, task):
            raise DatasetError(
                f"{ann.where}: capture is a {rec.task} prediction but {self.parent.ref} is a {task} dataset"
            )
        image = captured_image(self.store, rec, f"{ann.where}: captured image {rec.image_key}")
        w, h = image.width, image.height
        if ann.size is not None and ann.size != (w, h):
            raise DatasetError(
                f"{ann.where}: annotated image size {ann.size[0]}x{ann.size[1]} but the captured image is {w}x{h}"
            )
        if cid in self.existing and not self.replace:
            raise DatasetError(
                f"{ann.where}: already in {self.parent.ref}; pass replace=True (--replace) to re-annotate it"
            )
        if task == "semantic":
            return CheckedSample(cid, image, trimap=self._trimap(ann, h, w))
        return CheckedSample(cid, image, instances=tuple(self._instances(ann, h, w)))

    def _trimap(self, ann: ParsedAnnotation, h: int, w: int) -> np.ndarray:
        if ann.kind == "trimap":
            return trimaps.read_trimap(ann.payload, h, w, ann.where)
        if ann.kind == "regions":
            return labelstudio.regions_to_trimap(ann.payload, h, w, ann.where)
        return coco.coco_to_trimap(ann.payload, h, w, ann.where)

    def _instances(self, ann: ParsedAnnotation, h: int, w: int) -> list[Instance]:
        if ann.kind == "regions":
            return labelstudio.regions_to_instances(ann.payload, h, w, ann.where, self.known)
        return coco.coco_to_instances(ann.payload, h, w, ann.where, self.known)


# ----------------------------------------------------------------------------- the child version's files


def _oxford_files(samples: Sequence[CheckedSample], parent: Manifest) -> tuple[dict[str, bytes], list[str]]:
    """``images/<id>.<ext>`` and ``annotations/trimaps/<id>.png`` of each sample, and its name."""
    parent_files = parent.file_map
    new_files: dict[str, bytes] = {}
    names: list[str] = []
    for s in samples:
        for p in (f"images/{s.id}.jpg", f"images/{s.id}.jpeg", f"images/{s.id}.png"):
            if p in parent_files and p != f"images/{s.file}":
                raise DatasetError(
                    f"sample {s.id}: {parent.ref} has {p}; cannot replace it with a .{s.image.ext} image"
                )
        new_files[f"images/{s.file}"] = s.image.data
        new_files[f"annotations/trimaps/{s.id}.png"] = label_png(s.trimap)
        names.append(s.id)
    return new_files, names


def _coco_files(
    samples: Sequence[CheckedSample], parent_coco: Mapping[str, Any], known: Mapping[str, int], split: str
) -> tuple[dict[str, bytes], list[str]]:
    """``images/<split>/<id>.<ext>`` of each sample and the merged ``annotations/instances_<split>.json``."""
    new_files: dict[str, bytes] = {}
    names: list[str] = []
    for s in samples:
        new_files[f"images/{split}/{s.file}"] = s.image.data
        names.append(s.file)
    merged = coco.merge_samples(parent_coco, samples, known)
    new_files[f"annotations/instances_{split}.json"] = json.dumps(merged).encode("utf-8")
    return new_files, names


def _manifest_file(store: ObjectStore, manifest: Manifest, path: str) -> Optional[bytes]:
    """The bytes of one file of a version (None when it has no such file), checked against its sha256."""
    entry = manifest.file_map.get(path)
    if entry is None:
        return None
    try:
        data = store.get_bytes(blob_key(entry.sha256))
    except ObjectNotFound:
        raise StoreError(f"{manifest.ref}: file {path} is missing from {store.describe()}") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise StoreError(f"{manifest.ref}: file {path} is corrupt in {store.describe()} (sha256 mismatch)")
    return data


def _parent_coco(store: ObjectStore, parent: Manifest, split: str) -> dict[str, Any]:
    """The parent's ``instances_<split>.json``; a new split starts empty with the parent's categories."""
    path = f"annotations/instances_{split}.json"
    raw = _manifest_file(store, parent, path)
    if raw is None:
        others = sorted(p for p in parent.file_map if re.fullmatch(r"annotations/instances_[^/]+\.json", p))
        if not others:
            raise DatasetError(f"{parent.ref} has no annotations/instances_*.json; import needs a COCO-layout parent")
        base = json.loads(_manifest_file(store, parent, others[0]) or b"{}")
        return {"images": [], "annotations": [], "categories": base.get("categories", [])}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise DatasetError(f"{parent.ref}: {path} is not valid JSON: {err}") from None
