"""Dataset versions: immutable, content-addressed manifests in an ObjectStore.

This replaces DVC. A *version* of dataset ``name`` is a JSON manifest stored at
``datasets/<name>/<version>.json`` that lists every file of the dataset as
``{path, size, sha256}``; the file contents live once per content in
``blobs/sha256/<aa>/<sha256>`` (see :mod:`dataplane.store`), so versions that share
files share blobs and an existing blob is never uploaded again.

The version id is the first 16 hex characters of ``digest``, the sha256 of the
canonical JSON of the manifest body: every field except ``version``, ``digest``
and ``created``. Leaving the timestamp out makes snapshots reproducible: creating
the same content again (same name, parent, files, splits, classes, notes, source)
yields the same version, and the existing manifest is returned untouched.

Guarantees:

* immutability - a manifest key is written once; writing different content to an
  existing key is refused, writing the same content again is a no-op;
* no half versions - blobs are uploaded first and the manifest last, so a create
  that fails part way leaves no manifest (only unreferenced blobs);
* integrity - manifests are checked against their digest when read, blobs against
  their sha256 and size when materialised or verified; every mismatch names the file;
* a linear lineage - each dataset has a *head*, and a new version becomes the head only
  if its parent still is the head (compare-and-set), so two writers that start from the
  same head can never both "win" and leave one of them out of ``latest``.

Lineage: ``datasets/<name>/lineage/<parent>.json`` (``root.json`` for the first version)
records the one version that continues ``<parent>``. It is created with
:meth:`ObjectStore.put_if_absent` (atomic create-only: ``os.link`` locally, ``If-None-Match:
*`` on S3), after the manifest and never rewritten, so the records form a chain and the
head is the end of the chain. ``lineage/HEAD.json`` is a hint written after each advance
(a plain write that may lag behind; readers follow the records on from it). Only
create-only writes are needed (AWS S3 and MinIO make them atomic; moto, the tests' server,
honours them too), not an ETag compare-and-swap of a mutable HEAD object. A writer that loses the race either rebases (parent
``'latest'``: :func:`add_samples` re-applies its files onto the new head) or gets a
:class:`HeadMoved` error naming the head; a version that lost stays in the store as an
unreferenced manifest that ``latest`` never returns. Stores written before lineage
records existed have none: their head is the newest version by ``created`` time.

Command line: ``segloop versions [--store URL] list|show|diff|materialize|create|verify``
(also ``python -m dataplane.versions``; store from ``--store``, else ``SEGLOOP_STORE``, else
``./.segloop/store``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from dataplane.store import ObjectNotFound, ObjectStore, blob_key, check_key, head_key, lineage_key, manifest_key
from segloop.errors import ConfigError, DatasetError, StoreError

log = logging.getLogger(__name__)

FORMAT = 1
VERSION_LEN = 16
MARKER = ".segloop-version.json"
TASKS = ("semantic", "instance")
DEFAULT_SEMANTIC_CLASSES = ("background", "pet", "border")
MAX_REBASES = 8  # add_samples onto 'latest': how many times it re-applies onto a moved head

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

FileSource = Union[bytes, bytearray, memoryview, os.PathLike]


class HeadMoved(DatasetError):
    """The parent a version was built on is not (or no longer) the head of its dataset.

    ``head`` is the head when the error was raised (None: the dataset has no versions).
    """

    def __init__(self, message: str, head: Optional[Manifest] = None) -> None:
        super().__init__(message)
        self.head = head


class RebaseConflict(HeadMoved):
    """Re-applying a change onto the new head would overwrite a file the head changed too."""


# --------------------------------------------------------------------------- manifest


class FileEntry(BaseModel):
    """One file of a dataset version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        # A manifest path must never point outside the directory it is materialised into.
        try:
            check_key(v)
        except StoreError as err:
            raise ValueError(str(err)) from None
        if v == MARKER:
            raise ValueError(f"{MARKER} is reserved")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 0:
            raise ValueError("size must be >= 0")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("expected 64 lowercase hex characters")
        return v


class Manifest(BaseModel):
    """A dataset version. Build with :meth:`build`; never edit (the digest would break)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT
    name: str
    version: str
    digest: str
    parent: Optional[str] = None
    created: str
    task: Literal["semantic", "instance"]
    classes: list[str]
    splits: dict[str, list[str]]
    files: list[FileEntry]
    source: dict[str, Any] = {}
    notes: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("expected letters, digits, '.', '_' or '-' (at most 128 chars)")
        return v

    @model_validator(mode="after")
    def _unique_sorted_files(self) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            dup = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(f"duplicate file paths: {', '.join(dup[:5])}")
        if paths != sorted(paths):
            raise ValueError("files must be sorted by path")
        return self

    @classmethod
    def build(cls, **fields: Any) -> Manifest:
        """Fill in ``format``/``created``, sort files, compute ``digest`` and ``version``."""
        fields.setdefault("format", FORMAT)
        fields.setdefault("created", _now())
        fields["files"] = sorted(
            (f.model_dump() if isinstance(f, FileEntry) else f for f in fields.get("files", [])),
            key=lambda f: str(f.get("path", "")) if isinstance(f, Mapping) else "",
        )
        fields.pop("version", None)
        fields.pop("digest", None)
        try:
            probe = cls.model_validate({**fields, "version": "", "digest": ""})
            digest = compute_digest(probe)
            return cls.model_validate({**probe.to_dict(), "version": digest[:VERSION_LEN], "digest": digest})
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(root)"
            raise DatasetError(f"invalid manifest for dataset {fields.get('name')!r}: {loc}: {first['msg']}") from None

    def body(self) -> dict[str, Any]:
        """The hashed part of the manifest (everything but version, digest, created)."""
        d = self.to_dict()
        for k in ("version", "digest", "created"):
            d.pop(k, None)
        return d

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "parent": self.parent,
            "created": self.created,
            "task": self.task,
            "classes": list(self.classes),
            "splits": {k: list(v) for k, v in self.splits.items()},
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "source": dict(self.source),
            "notes": dict(self.notes),
        }

    @property
    def key(self) -> str:
        return manifest_key(self.name, self.version)

    @property
    def file_map(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def ref(self) -> str:
        """``name@version``, how logs and errors name a version."""
        return f"{self.name}@{self.version}"


def compute_digest(manifest: Manifest | Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest body."""
    body = (
        manifest.body()
        if isinstance(manifest, Manifest)
        else {k: v for k, v in manifest.items() if k not in ("version", "digest", "created")}
    )
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_manifest(data: Any, where: str) -> Manifest:
    """Validate stored JSON as a Manifest and check it against its own digest."""
    try:
        m = Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise StoreError(f"manifest {where} is malformed: {loc}: {first['msg']}") from None
    actual = compute_digest(m)
    if actual != m.digest or m.version != m.digest[:VERSION_LEN]:
        raise StoreError(
            f"manifest {where} has been modified: its content hashes to {actual} "
            f"but it records digest {m.digest} (version {m.version})"
        )
    return m


def _load_manifest(store: ObjectStore, key: str) -> Manifest:
    m = _parse_manifest(store.get_json(key), f"{key!r} in {store.describe()}")
    if m.key != key:
        raise StoreError(f"manifest {key!r} in {store.describe()} describes {m.ref}; it is stored under the wrong key")
    return m


def write_manifest(store: ObjectStore, manifest: Manifest) -> Manifest:
    """Store ``manifest`` once. Same content again is a no-op; different content is refused.

    Returns the stored manifest (the existing one when it was already there).
    """
    _parse_manifest(manifest.to_dict(), manifest.ref)  # refuse hand-edited manifests
    key = manifest.key
    if store.put_json_if_absent(key, manifest.to_dict()):  # create-only: never replaces a manifest
        return manifest
    existing_raw = store.get_json(key)
    same_body = (
        isinstance(existing_raw, dict)
        and compute_digest(existing_raw) == manifest.digest
        and {k: v for k, v in existing_raw.items() if k != "created"}
        == {k: v for k, v in manifest.to_dict().items() if k != "created"}
    )
    if not same_body:
        raise StoreError(
            f"refusing to overwrite manifest {key!r} in {store.describe()}: it already exists "
            f"with different content (versions are immutable)"
        )
    return _load_manifest(store, key)


# --------------------------------------------------------------------------- validation helpers


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DatasetError(
            f"invalid dataset name {name!r}: expected letters, digits, '.', '_' or '-' "
            "(at most 128 chars, starting with a letter or digit)"
        )
    return name


def _check_task(task: Any) -> str:
    if task not in TASKS:
        raise DatasetError(f"invalid task {task!r}: expected one of {', '.join(TASKS)}")
    return task


def _check_relpath(path: Any, what: str = "dataset path") -> str:
    try:
        check_key(path)
    except StoreError as err:
        raise DatasetError(f"invalid {what} {path!r}: {str(err).split(': ', 1)[-1]}") from None
    if path == MARKER:
        raise DatasetError(f"invalid {what} {path!r}: reserved for the materialisation marker")
    return path


def _check_notes(notes: Any, what: str = "notes") -> dict[str, Any]:
    if notes is None:
        return {}
    if not isinstance(notes, Mapping):
        raise DatasetError(f"{what} must be a mapping of strings to JSON values, got {type(notes).__name__}")
    try:
        return json.loads(json.dumps(dict(notes), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{what} must be JSON-serialisable: {err}") from None


def _check_classes(classes: Any) -> list[str]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
        raise DatasetError(f"classes must be a non-empty list of names, got {classes!r}")
    out = [c for c in classes]
    if not all(isinstance(c, str) and c for c in out):
        raise DatasetError(f"classes must be non-empty strings, got {classes!r}")
    if len(set(out)) != len(out):
        raise DatasetError(f"classes must be unique, got {classes!r}")
    return out


def _check_splits(splits: Any) -> dict[str, list[str]]:
    if splits is None:
        return {}
    if not isinstance(splits, Mapping):
        raise DatasetError(f"splits must map split names to lists of sample names, got {type(splits).__name__}")
    out: dict[str, list[str]] = {}
    for split, names in splits.items():
        if not isinstance(split, str) or not _NAME.match(split):
            raise DatasetError(f"invalid split name {split!r}: expected letters, digits, '.', '_' or '-'")
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise DatasetError(f"split {split!r} must be a list of sample names, got {names!r}")
        names = list(names)
        for n in names:
            if not isinstance(n, str) or not n or any(ch.isspace() for ch in n):
                raise DatasetError(f"split {split!r}: invalid sample name {n!r} (non-empty, no whitespace)")
        out[split] = names
    return out


# --------------------------------------------------------------------------- scanning a dataset dir


def scan_dir(root: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as sorted ``(relpath, path)`` (marker excluded)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist or is not a directory")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise DatasetError(f"file name {p} is not valid UTF-8") from None
            if p.is_symlink() and not p.exists():
                raise DatasetError(f"{p} is a broken symbolic link")
            if not p.is_file():
                continue  # sockets, fifos, ...
            _check_relpath(rel, f"file name under {root}")
            out.append((rel, p))
    return sorted(out)


def derive_splits(root: str | os.PathLike[str], task: str) -> dict[str, list[str]]:
    """Split lists as the dataset files define them.

    semantic (Oxford-Pet): ``annotations/<split>.txt`` (first token per line; ``list.txt`` skipped);
    instance (COCO): ``annotations/instances_<split>.json`` image ``file_name``s, else
    ``images/<split>/`` file stems (YOLO layout).
    """
    root = Path(root)
    ann = root / "annotations"
    splits: dict[str, list[str]] = {}
    if task == "semantic":
        for p in sorted(ann.glob("*.txt")):
            if p.stem == "list":
                continue
            splits[p.stem] = _read_split_names(p.read_bytes(), str(p))
    else:
        for p in sorted(ann.glob("instances_*.json")):
            data = _read_json_file(p)
            images = data.get("images") if isinstance(data, dict) else None
            if not isinstance(images, list):
                raise DatasetError(f"{p} is not a COCO annotation file: missing an 'images' list")
            try:
                splits[p.stem[len("instances_") :]] = [str(img["file_name"]) for img in images]
            except (KeyError, TypeError):
                raise DatasetError(f"{p}: every entry of 'images' needs a 'file_name'") from None
        if not splits and (root / "images").is_dir():
            for d in sorted(x for x in (root / "images").iterdir() if x.is_dir()):
                splits[d.name] = sorted(f.stem for f in d.iterdir() if f.is_file())
    return splits


def derive_classes(root: str | os.PathLike[str], task: str) -> list[str]:
    """Class names when the caller gives none: the Pet trimap classes, or COCO categories."""
    if task == "semantic":
        return list(DEFAULT_SEMANTIC_CLASSES)
    for p in sorted((Path(root) / "annotations").glob("instances_*.json")):
        data = _read_json_file(p)
        cats = data.get("categories") if isinstance(data, dict) else None
        if isinstance(cats, list) and cats:
            try:
                return ["background"] + [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
            except (KeyError, TypeError):
                raise DatasetError(f"{p}: every category needs an 'id' and a 'name'") from None
    raise DatasetError(f"cannot derive class names for {root}: no annotations/instances_*.json; pass classes")


def _read_split_names(data: bytes, where: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"split list {where} is not UTF-8 text") from None
    return [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _read_json_file(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"cannot read annotation file {p}: {err}") from None


# --------------------------------------------------------------------------- blobs


class _BlobUploader:
    """Uploads blobs once: skips blobs the store has, and identical files within a batch."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._locks: dict[str, threading.Lock] = {}
        self._done: set[str] = set()
        self._guard = threading.Lock()

    def __call__(self, item: tuple[str, Callable[[], bytes]]) -> FileEntry:
        rel, load = item
        data = load()
        sha = hashlib.sha256(data).hexdigest()
        with self._guard:
            lock = self._locks.setdefault(sha, threading.Lock())
        with lock:  # concurrent workers holding the same content wait for one upload
            if sha not in self._done:
                key = blob_key(sha)
                if not self.store.exists(key):  # content-addressed: never re-uploaded
                    self.store.put_bytes(key, data)
                self._done.add(sha)
        return FileEntry(path=rel, size=len(data), sha256=sha)


def _file_loader(path: Path, rel: str) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise DatasetError(f"cannot read dataset file {rel} ({path}): {err.strerror or err}") from None

    return load


def _run_all(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool; the first error cancels the rest and is raised."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures: list[Future] = [pool.submit(fn, x) for x in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for p in pending:
                    p.cancel()
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


def _upload_files(store: ObjectStore, items: list[tuple[str, Callable[[], bytes]]], workers: int) -> list[FileEntry]:
    return _run_all(_BlobUploader(store), items, workers)


def _fetch_blob(store: ObjectStore, manifest: Manifest, entry: FileEntry, verify: bool = True) -> bytes:
    """The bytes of one file of ``manifest``, checked against its size (and sha256 when verify)."""
    key = blob_key(entry.sha256)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        raise StoreError(f"{manifest.ref}: file {entry.path} is missing from {store.describe()} (blob {key})") from None
    actual = hashlib.sha256(data).hexdigest() if verify or len(data) != entry.size else entry.sha256
    if len(data) != entry.size or actual != entry.sha256:
        raise StoreError(
            f"{manifest.ref}: file {entry.path} is corrupt in {store.describe()}: expected sha256 "
            f"{entry.sha256} ({entry.size} bytes), got sha256 {actual} ({len(data)} bytes) (blob {key})"
        )
    return data


# --------------------------------------------------------------------------- lineage


def _read_claim(store: ObjectStore, name: str, parent: Optional[str]) -> Optional[str]:
    """The version recorded as continuing ``parent`` (None: the first version), or None."""
    key = lineage_key(name, parent)
    try:
        record = store.get_json(key)
    except ObjectNotFound:
        return None
    child = record.get("child") if isinstance(record, dict) else None
    if not isinstance(child, str) or len(child) != VERSION_LEN or not _HEX.match(child):
        raise StoreError(f'lineage record {key!r} in {store.describe()} is malformed: expected {{"child": <version>}}')
    return child


def _claim(store: ObjectStore, name: str, parent: Optional[str], child: str) -> str:
    """Record ``child`` as the continuation of ``parent`` unless one is already recorded.

    Returns the recorded child: ``child`` when this call won (or an identical version
    was recorded by another writer), else the version that got there first.
    """
    record = {"parent": parent, "child": child, "created": _now()}
    if store.put_json_if_absent(lineage_key(name, parent), record):
        return child
    winner = _read_claim(store, name, parent)
    if winner is None:  # created, then deleted by hand before we could read it
        raise StoreError(f"lineage record {lineage_key(name, parent)!r} in {store.describe()} vanished")
    return winner


def _read_hint(store: ObjectStore, name: str) -> Optional[str]:
    """The head hint's version id, or None when there is no (usable) hint."""
    try:
        record = store.get_json(head_key(name))
    except ObjectNotFound:
        return None
    vid = record.get("version") if isinstance(record, dict) else None
    return vid if isinstance(vid, str) and len(vid) == VERSION_LEN and _HEX.match(vid) else None


def _write_hint(store: ObjectStore, name: str, version: str) -> None:
    """Point the hint at a new head. Best effort: a stale hint only costs readers a step."""
    try:
        store.put_json(head_key(name), {"version": version})
    except StoreError as err:
        log.warning("dataset %s: head hint not updated (%s); readers follow the lineage records", name, err)


def _walk(store: ObjectStore, name: str, start: str) -> Manifest:
    """The end of the lineage chain that passes through version ``start``."""
    vid, seen = start, {start}
    while (nxt := _read_claim(store, name, vid)) is not None:
        if nxt in seen:
            raise StoreError(f"the lineage of dataset {name!r} in {store.describe()} loops at version {nxt}")
        seen.add(nxt)
        vid = nxt
    try:
        return _load_manifest(store, manifest_key(name, vid))
    except ObjectNotFound:
        raise StoreError(
            f"the lineage of dataset {name!r} in {store.describe()} names version {vid}, whose manifest is missing"
        ) from None


def head_version(store: ObjectStore, name: str) -> Optional[Manifest]:
    """The head of dataset ``name``, or None when it has no versions.

    Starts at the head hint (else the first version's record) and follows the lineage
    records to the end. A store written before lineage records existed has neither: then
    the newest version by ``created`` time is the start, the rule ``latest`` used to have.
    """
    _check_name(name)
    start = _read_hint(store, name) or _read_claim(store, name, None)
    if start is None:
        versions = list_versions(store, name)
        if not versions:
            return None
        start = versions[-1].version
    return _walk(store, name, start)


def _commit(store: ObjectStore, manifest: Manifest, parent: Optional[Manifest], *, branch: bool) -> Manifest:
    """Write ``manifest`` and make it the head: compare-and-set on the head being ``parent``.

    Raises HeadMoved when ``parent`` is not the head (unless ``branch``: a side version is
    written and the head stays) or another writer advanced it first.
    """
    name, pv = manifest.name, parent.version if parent else None
    head = head_version(store, name)
    if head is not None and head.version == manifest.version:
        return head  # an idempotent re-run: the very same version is the head already
    if (head.version if head else None) != pv:
        return _commit_off_head(store, manifest, parent, head, branch)
    written = write_manifest(store, manifest)  # the manifest first: a record never names a missing one
    winner = _claim(store, name, pv, written.version)
    if winner == written.version:
        _write_hint(store, name, written.version)
        return written
    if branch:
        return _branched(written, f"{name}@{winner}")
    head = head_version(store, name)
    raise HeadMoved(
        f"lost the race to extend dataset {name!r} from {_ref(name, pv)}: {name}@{winner} was added first "
        f"and the head is now {_ref(name, head and head.version)}; {written.ref} was not added to the lineage. "
        "Build on parent 'latest' to rebase onto the head",
        head,
    )


def _commit_off_head(
    store: ObjectStore, manifest: Manifest, parent: Optional[Manifest], head: Optional[Manifest], branch: bool
) -> Manifest:
    """:func:`_commit` when ``parent`` is already behind the head."""
    pv = parent.version if parent else None
    if _read_claim(store, manifest.name, pv) == manifest.version:
        return _load_manifest(store, manifest.key)  # a re-run of a change that is in the lineage
    if branch:
        return _branched(write_manifest(store, manifest), _ref(manifest.name, head and head.version))
    what = parent.ref if parent else "a version without a parent"
    raise HeadMoved(
        f"{what} is not the head of dataset {manifest.name!r}: the head is "
        f"{_ref(manifest.name, head and head.version)}; {manifest.ref} was not added. Build on parent "
        "'latest' (a concurrent change is then rebased onto), or pass branch=True (--branch) for a side "
        "version that 'latest' never returns",
        head,
    )


def _branched(manifest: Manifest, head: str) -> Manifest:
    log.warning("%s is a side branch off %s: the head stays %s", manifest.ref, manifest.parent or "nothing", head)
    return manifest


def _ref(name: str, version: Optional[str]) -> str:
    return f"{name}@{version}" if version else f"{name} (no versions)"


# --------------------------------------------------------------------------- API


def create_version(
    store: ObjectStore,
    name: str,
    root_dir: str | os.PathLike[str],
    task: str,
    classes: Optional[Sequence[str]] = None,
    parent: Optional[str | Manifest] = None,
    notes: Optional[Mapping[str, Any]] = None,
    *,
    splits: Optional[Mapping[str, Sequence[str]]] = None,
    source: Optional[Mapping[str, Any]] = None,
    branch: bool = False,
    workers: int = 8,
) -> Manifest:
    """Snapshot every file under ``root_dir`` as a new version of dataset ``name``.

    ``classes`` default to the parent's, else the Pet classes / COCO categories;
    ``splits`` default to the dataset's split files (:func:`derive_splits`).
    Blobs are uploaded first and the manifest last, so a failure leaves no version.
    The new version becomes the head, so ``parent`` must be the head (``'latest'``, or
    None for a dataset's first version); otherwise, or when another writer moves the
    head meanwhile, HeadMoved is raised: a snapshot is never rebased, since it does not
    hold the other writer's change. ``branch`` allows a side version off a non-head parent
    (the head stays). The same snapshot again returns the existing version.
    """
    _check_name(name)
    _check_task(task)
    root = Path(root_dir).expanduser()
    files = scan_dir(root)
    if not files:
        raise DatasetError(f"dataset directory {root} holds no files")
    parent_m = _resolve(store, name, parent) if parent is not None else None
    if classes is None:
        classes = parent_m.classes if parent_m else derive_classes(root, task)
    classes = _check_classes(classes)
    splits_ = _check_splits(derive_splits(root, task) if splits is None else splits)
    notes_ = _check_notes(notes)
    source_ = _check_notes({"kind": "directory", "path": str(root.absolute())} if source is None else source, "source")
    entries = _upload_files(store, [(rel, _file_loader(p, rel)) for rel, p in files], workers)
    manifest = Manifest.build(
        name=name,
        parent=parent_m.version if parent_m else None,
        task=task,
        classes=classes,
        splits=splits_,
        files=entries,
        source=source_,
        notes=notes_,
    )
    return _commit(store, manifest, parent_m, branch=branch)


def add_samples(
    store: ObjectStore,
    name: str,
    parent_version: str | Manifest,
    new_files: Mapping[str, FileSource],
    split_updates: Optional[Mapping[str, Sequence[str]]] = None,
    notes: Optional[Mapping[str, Any]] = None,
    *,
    sync_split_files: bool = True,
    rebase: Optional[bool] = None,
    branch: bool = False,
    workers: int = 8,
) -> Manifest:
    """A child version = parent + ``new_files`` (relpath -> bytes or Path); the parent is untouched.

    Any relpath may be new or replace a parent file (e.g. an updated split list or
    COCO annotation JSON). ``split_updates`` ({split: [names]}) appends sample names
    to the manifest's split lists. For the semantic task, with ``sync_split_files``,
    ``annotations/<split>.txt`` is also rewritten to list the new names unless the
    caller passes that file; for COCO the caller must pass the updated
    ``annotations/instances_<split>.json`` itself.

    The child becomes the head (compare-and-set, see the module doc). When the head is
    not (or no longer) the parent: with ``rebase`` (default: ``parent_version`` is
    ``'latest'``) the same files and names are re-applied onto the new head, up to
    MAX_REBASES times, or RebaseConflict is raised when the head changed a file this call
    writes too (redo the change from the new head); without it HeadMoved names the head,
    unless ``branch`` asks for a side version off a non-head parent. A change already
    fully in the parent (a re-run) returns the parent: no duplicate names, no new version.
    """
    _check_name(name)
    base = _resolve(store, name, parent_version)
    rebase = (isinstance(parent_version, str) and parent_version == "latest") if rebase is None else rebase
    items, updates = _check_additions(base, new_files, split_updates)
    notes_ = _check_notes(notes)
    added = _upload_files(store, sorted(items.items()), workers)
    parent = base
    for _ in range(MAX_REBASES + 1):
        child = _child_manifest(store, parent, added, updates, notes_, sync_split_files, workers)
        if child is None:
            return parent
        try:
            return _commit(store, child, parent, branch=branch and not rebase)
        except HeadMoved as err:
            if not rebase or err.head is None:
                raise
            parent = _rebase_target(base, err.head, added)
    head = head_version(store, name)
    raise HeadMoved(
        f"add_samples({base.ref}): the head of dataset {name!r} moved {MAX_REBASES + 1} times while "
        f"this change was being added (now {_ref(name, head and head.version)}); nothing was added, retry",
        head,
    )


def _check_additions(
    parent: Manifest, new_files: Any, split_updates: Any
) -> tuple[dict[str, Callable[[], bytes]], dict[str, list[str]]]:
    """``(loaders by relpath, split updates)`` of an :func:`add_samples` call, each checked."""
    if not isinstance(new_files, Mapping):
        raise DatasetError(f"new_files must map relative paths to bytes or Paths, got {type(new_files).__name__}")
    updates = _check_splits(split_updates)
    if not new_files and not updates:
        raise DatasetError(f"add_samples({parent.ref}) needs new_files or split_updates")
    return {rel: _source_loader(rel, value) for rel, value in new_files.items()}, updates


def _child_manifest(
    store: ObjectStore,
    parent: Manifest,
    added: Sequence[FileEntry],
    updates: Mapping[str, Sequence[str]],
    notes: dict[str, Any],
    sync_split_files: bool,
    workers: int,
) -> Optional[Manifest]:
    """``parent`` + the uploaded ``added`` files + ``updates``; None when that changes nothing."""
    splits = _appended_splits(parent.splits, updates)
    entries = list(added)
    if sync_split_files and parent.task == "semantic":
        own = {e.path for e in added}
        split_files = {
            rel: _bytes_loader(_split_file(store, parent, rel, splits[split]))
            for split in updates
            if (rel := f"annotations/{split}.txt") not in own
        }
        entries += _upload_files(store, sorted(split_files.items()), workers)
    files = parent.file_map
    replaced = sum(1 for e in entries if e.path in files)
    files.update({e.path: e for e in entries})
    if files == parent.file_map and splits == parent.splits:
        return None
    return Manifest.build(
        name=parent.name,
        parent=parent.version,
        task=parent.task,
        classes=list(parent.classes),
        splits=splits,
        files=list(files.values()),
        source={
            "kind": "add_samples",
            "parent": parent.version,
            "added": len(entries) - replaced,
            "replaced": replaced,
        },
        notes=notes,
    )


def _rebase_target(base: Manifest, head: Manifest, added: Sequence[FileEntry]) -> Manifest:
    """``head``, once it is clear that re-applying ``added`` onto it drops nothing the head
    changed since ``base`` (the same file written with the same content is fine)."""
    old, new = base.file_map, head.file_map
    clash = sorted(e.path for e in added if new.get(e.path) not in (old.get(e.path), e))
    if clash:
        raise RebaseConflict(
            f"cannot rebase onto {head.ref}: since {base.ref} it changed {', '.join(clash[:5])}"
            f"{' ...' if len(clash) > 5 else ''}, which this change writes too; nothing was added: "
            "redo the change from the new head",
            head,
        )
    log.info("dataset %s: the head moved to %s; re-applying the change onto it", head.name, head.version)
    return head


def _bytes_loader(data: Union[bytes, bytearray, memoryview]) -> Callable[[], bytes]:
    return lambda: bytes(data)


def _source_loader(rel: str, value: FileSource) -> Callable[[], bytes]:
    """The loader of one ``new_files`` value: its bytes, or the file read on upload."""
    _check_relpath(rel)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_loader(value)
    if isinstance(value, os.PathLike):
        return _file_loader(Path(value), rel)
    raise DatasetError(f"new_files[{rel!r}] must be bytes or a pathlib.Path, got {type(value).__name__}")


def _appended_splits(splits: Mapping[str, Sequence[str]], updates: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``splits`` with the names of ``updates`` appended to each split, skipping names it has."""
    out = {k: list(v) for k, v in splits.items()}
    for split, names in updates.items():
        current = out.setdefault(split, [])
        seen = set(current)
        for n in names:
            if n not in seen:
                current.append(n)
                seen.add(n)
    return out


def _split_file(store: ObjectStore, parent: Manifest, rel: str, names: Sequence[str]) -> bytes:
    """``annotations/<split>.txt`` listing ``names``: the parent's file with the missing names appended."""
    parent_files = parent.file_map
    if rel not in parent_files:
        return "".join(f"{n}\n" for n in names).encode("utf-8")
    old = _fetch_blob(store, parent, parent_files[rel]).decode("utf-8", errors="replace")
    have = set(_read_split_names(old.encode("utf-8"), rel))
    extra = [n for n in names if n not in have]
    text = old if (not old or old.endswith("\n")) else old + "\n"
    return (text + "".join(f"{n}\n" for n in extra)).encode("utf-8")


def list_datasets(store: ObjectStore) -> list[str]:
    """Names of the datasets that have at least one version."""
    names = set()
    for key in store.list("datasets/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2].endswith(".json"):
            names.add(parts[1])
    return sorted(names)


def _version_ids(store: ObjectStore, name: str) -> list[str]:
    prefix = f"datasets/{_check_name(name)}/"
    out = []
    for key in store.list(prefix):
        rest = key[len(prefix) :]
        if "/" not in rest and rest.endswith(".json"):
            vid = rest[: -len(".json")]
            if len(vid) == VERSION_LEN and _HEX.match(vid):
                out.append(vid)
    return out


def list_versions(store: ObjectStore, name: str) -> list[Manifest]:
    """Every version of ``name``, oldest first (by created time)."""
    ms = [_load_manifest(store, manifest_key(name, v)) for v in _version_ids(store, name)]
    return sorted(ms, key=lambda m: (m.created, m.version))


def latest_version(store: ObjectStore, name: str) -> Manifest:
    """The head of ``name`` (:func:`head_version`): the end of its lineage chain.

    Stores written before lineage records existed fall back to the newest version by
    ``created`` time. Versions that lost a race to become the head, and side branches,
    are never returned.
    """
    head = head_version(store, name)
    if head is None:
        raise DatasetError(f"dataset {name!r} has no versions in {store.describe()}")
    return head


def get_version(store: ObjectStore, name: str, version: str) -> Manifest:
    """The version of ``name`` whose id starts with ``version`` (unique prefix, full id,
    full digest, or ``latest``)."""
    _check_name(name)
    if version == "latest":
        return latest_version(store, name)
    v = version.strip().lower() if isinstance(version, str) else ""
    if not v or not _HEX.match(v) or len(v) > 64:
        raise DatasetError(f"invalid version {version!r} of dataset {name!r}: expected hex characters or 'latest'")
    if len(v) >= VERSION_LEN:
        key = manifest_key(name, v[:VERSION_LEN])
        try:
            m = _load_manifest(store, key)
        except ObjectNotFound:
            m = None
        if m is not None and m.digest.startswith(v):
            return m
        raise DatasetError(f"dataset {name!r} has no version {version!r} in {store.describe()}")
    matches = [vid for vid in _version_ids(store, name) if vid.startswith(v)]
    if not matches:
        known = ", ".join(_version_ids(store, name)[:10]) or "none"
        raise DatasetError(f"dataset {name!r} has no version {version!r} in {store.describe()} (known: {known})")
    if len(matches) > 1:
        raise DatasetError(f"version prefix {version!r} of dataset {name!r} is ambiguous: {', '.join(matches)}")
    return _load_manifest(store, manifest_key(name, matches[0]))


def _resolve(store: ObjectStore, name: str, version: str | Manifest) -> Manifest:
    if isinstance(version, Manifest):
        if version.name != name:
            raise DatasetError(f"version {version.ref} does not belong to dataset {name!r}")
        return get_version(store, name, version.digest)
    return get_version(store, name, version)


def diff_versions(a: Manifest, b: Manifest) -> dict[str, list[str]]:
    """Paths ``added`` in b, ``removed`` from a, and ``changed`` (different content)."""
    fa, fb = a.file_map, b.file_map
    return {
        "added": sorted(set(fb) - set(fa)),
        "removed": sorted(set(fa) - set(fb)),
        "changed": sorted(p for p in set(fa) & set(fb) if fa[p].sha256 != fb[p].sha256),
    }


def verify_version(store: ObjectStore, manifest: Manifest, *, raise_errors: bool = True, workers: int = 8) -> list[str]:
    """Check every blob of ``manifest`` (presence, size, sha256).

    Returns the list of problems (one line per bad file); raises StoreError listing
    all of them unless ``raise_errors`` is False.
    """
    _parse_manifest(manifest.to_dict(), manifest.ref)

    def check(entry: FileEntry) -> Optional[str]:
        try:
            _fetch_blob(store, manifest, entry, verify=True)
        except ObjectNotFound:  # pragma: no cover - _fetch_blob maps it
            return f"{entry.path}: missing"
        except StoreError as err:
            msg = str(err)
            if "is missing" in msg or "is corrupt" in msg:
                return msg.split(": ", 1)[-1]
            raise
        return None

    problems = [p for p in _run_all(check, manifest.files, workers) if p]
    if problems and raise_errors:
        raise StoreError(
            f"{manifest.ref} failed verification ({len(problems)} of {len(manifest.files)} files bad):\n  "
            + "\n  ".join(problems)
        )
    return problems


# --------------------------------------------------------------------------- materialise


def read_materialized(out_dir: str | os.PathLike[str]) -> Optional[Manifest]:
    """The manifest a :func:`materialize` call left in ``out_dir``, or None."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        return _parse_manifest(json.loads(marker.read_text(encoding="utf-8")), str(marker))
    except (OSError, ValueError, StoreError):
        return None


def _is_materialized(out: Path, manifest: Manifest, verify: bool) -> bool:
    """Whether ``out`` already holds exactly ``manifest``'s files."""
    found = read_materialized(out)
    if found is None or found.digest != manifest.digest:
        return False
    try:
        on_disk = {rel for rel, _ in scan_dir(out)}
    except DatasetError:
        return False
    if on_disk != {f.path for f in manifest.files}:
        return False
    for f in manifest.files:
        p = out.joinpath(*f.path.split("/"))
        try:
            if p.stat().st_size != f.size:
                return False
            if verify and sha256_file(p) != f.sha256:
                return False
        except OSError:
            return False
    return True


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _dir_lock(out: Path) -> Iterator[None]:
    """Serialise materialisations of one directory across processes (e.g. Ray workers)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialize(
    store: ObjectStore,
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    verify: bool = True,
    *,
    workers: int = 8,
) -> Path:
    """Download ``manifest``'s files into ``out_dir`` and return it.

    Every blob is checked (size always, sha256 when ``verify``). Files go to a temp
    dir next to ``out_dir`` that is renamed into place at the end, so ``out_dir`` is
    never half written. An ``out_dir`` that already holds this version is reused; one
    holding another materialised version is replaced; any other non-empty directory
    is refused (DatasetError). Store and integrity failures raise StoreError. A ``.segloop-version.json`` marker records the version.
    """
    out = Path(out_dir).expanduser().absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create {out.parent}: {err.strerror or err}") from None
    with _dir_lock(out):
        if _is_materialized(out, manifest, verify):
            return out
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise DatasetError(f"cannot materialise {manifest.ref} into {out}: it exists and is not a directory")
            if any(out.iterdir()) and not (out / MARKER).is_file():
                raise DatasetError(
                    f"cannot materialise {manifest.ref} into {out}: the directory is not empty and "
                    "was not written by materialize; choose a new or empty directory"
                )
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            os.chmod(tmp, 0o755)

            def fetch(entry: FileEntry) -> None:
                data = _fetch_blob(store, manifest, entry, verify=verify)
                dest = tmp.joinpath(*entry.path.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)

            _run_all(fetch, manifest.files, workers)
            (tmp / MARKER).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
            _swap_in(tmp, out)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot materialise {manifest.ref} into {out}: {err.strerror or err}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(tmp, out)


# --------------------------------------------------------------------------- MLflow


def mlflow_dataset_info(manifest: Manifest, store: Optional[ObjectStore] = None) -> dict[str, str]:
    """Arguments for an MLflow dataset entity (``mlflow.data.meta_dataset.MetaDataset``).

    ``digest`` is the 16-hex version id: MLflow's dataset table limits digests to 36 chars.
    """
    return {
        "name": manifest.name,
        "version": manifest.version,
        "digest": manifest.version,
        "source": store.url_for(manifest.key) if store is not None else f"segloop:{manifest.key}",
    }


# --------------------------------------------------------------------------- CLI


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _summary(m: Manifest) -> str:
    splits = " ".join(f"{k}={len(v)}" for k, v in sorted(m.splits.items())) or "-"
    return (
        f"{m.version}  {m.created}  parent={m.parent or '-'}  task={m.task}  "
        f"files={len(m.files)}  size={_fmt_size(m.total_bytes)}  splits: {splits}"
    )


def parse_notes(items: Sequence[str]) -> dict[str, Any]:
    """``--note key=value`` flags -> a dict (shared by the versions and queue CLIs)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--note {item!r} must look like key=value")
        out[key.strip()] = value
    return out


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="store URL: a local directory or s3://BUCKET (endpoint from SEGLOOP_S3_ENDPOINT); "
        "default $SEGLOOP_STORE or ./.segloop/store",
    )
    parser = argparse.ArgumentParser(
        prog="segloop versions",
        description="Immutable, content-addressed dataset versions.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="list datasets, or the versions of one dataset")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("show", parents=[common], help="show one version (default: latest)")
    p.add_argument("name")
    p.add_argument("version", nargs="?", default="latest")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")

    p = sub.add_parser("diff", parents=[common], help="files added/removed/changed from A to B")
    p.add_argument("name")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("materialize", parents=[common], help="download a version into a directory")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("out")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks (sizes are still checked)")

    p = sub.add_parser("create", parents=[common], help="snapshot a local dataset directory")
    p.add_argument("name")
    p.add_argument("dir")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--classes", help="comma-separated class names (default: derived from the dataset)")
    p.add_argument("--parent", help="parent version (id prefix or 'latest'); must be the head")
    p.add_argument("--branch", action="store_true", help="allow a side version off a parent that is not the head")
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("verify", parents=[common], help="check every blob of a version")
    p.add_argument("name")
    p.add_argument("version", nargs="?", default="latest")
    return parser


def _cmd_list(store: ObjectStore, args: argparse.Namespace) -> None:
    if args.name:
        versions = list_versions(store, args.name)
        if args.json:
            print(json.dumps([m.to_dict() for m in versions], indent=2))
        elif not versions:
            print(f"dataset {args.name!r} has no versions in {store.describe()}", file=sys.stderr)
        for m in versions if not args.json else []:
            print(_summary(m))
    else:
        names = list_datasets(store)
        if args.json:
            print(json.dumps(names))
        for n in names if not args.json else []:
            print(n)


def _cmd_show(store: ObjectStore, args: argparse.Namespace) -> None:
    m = get_version(store, args.name, args.version)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2, sort_keys=True))
        return
    print(f"{m.ref}  (digest {m.digest})")
    print(_summary(m))
    print(f"classes: {', '.join(m.classes)}")
    if m.source:
        print(f"source: {json.dumps(m.source, sort_keys=True)}")
    if m.notes:
        print(f"notes: {json.dumps(m.notes, sort_keys=True)}")


def _cmd_diff(store: ObjectStore, args: argparse.Namespace) -> None:
    a, b = get_version(store, args.name, args.a), get_version(store, args.name, args.b)
    d = diff_versions(a, b)
    if args.json:
        print(json.dumps(d, indent=2))
        return
    for tag, key in (("+", "added"), ("-", "removed"), ("~", "changed")):
        for path in d[key]:
            print(f"{tag} {path}")
    print(f"{len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed")


def _cmd_materialize(store: ObjectStore, args: argparse.Namespace) -> None:
    m = get_version(store, args.name, args.version)
    out = materialize(store, m, args.out, verify=not args.no_verify)
    print(f"{m.ref} -> {out}")


def _cmd_create(store: ObjectStore, args: argparse.Namespace) -> None:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    m = create_version(
        store,
        args.name,
        args.dir,
        args.task,
        classes,
        parent=args.parent,
        notes=parse_notes(args.note),
        branch=args.branch,
    )
    print(f"{m.ref}  ({len(m.files)} files, {_fmt_size(m.total_bytes)})")


def _cmd_verify(store: ObjectStore, args: argparse.Namespace) -> None:
    m = get_version(store, args.name, args.version)
    verify_version(store, m)
    print(f"{m.ref}: all {len(m.files)} files ok")


COMMANDS: dict[str, Callable[[ObjectStore, argparse.Namespace], None]] = {
    "list": _cmd_list,
    "show": _cmd_show,
    "diff": _cmd_diff,
    "materialize": _cmd_materialize,
    "create": _cmd_create,
    "verify": _cmd_verify,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point. Exit codes: 0 ok, 1 store/integrity failure, 2 bad input."""
    from dataplane.store import run_store_command

    args = _build_parser().parse_args(argv)
    return run_store_command(getattr(args, "store", None), lambda store: COMMANDS[args.cmd](store, args))


if __name__ == "__main__":
    raise SystemExit(main())
