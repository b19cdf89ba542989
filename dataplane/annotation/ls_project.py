"""Drive a Label Studio server: push a batch of captures as tasks, pull the finished
annotations back as a new dataset version (``segloop queue push|pull``).

* **Push** creates (or updates) a project whose labelling config matches the captures'
  task (:func:`.labelstudio.label_studio_config`), connects it to the object store so it
  reads the captured images where they are (S3 source storage with presigned URLs, or
  local-files storage for a local store; nothing is copied), and adds one task per capture
  in priority order (Label Studio hands them out in that order: sequential sampling), each
  with the model's prediction as an exact brush pre-annotation scored by its uncertainty.
  Captures already in the project are not added again.
* **Pull** reads the tasks whose last annotation is finished (skipped and unfinished tasks
  stay in Label Studio) and are not yet in the dataset, and imports them with
  :func:`.importer.import_annotations`: every sample checked, all or nothing, a problem named
  by its capture and task id. Pulling again without new annotations creates nothing.

The API key comes from ``LABEL_STUDIO_API_KEY``; it is never printed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dataplane.annotation import labelstudio
from dataplane.annotation.exporter import ExportItem, common_task, load_items, record_export
from dataplane.annotation.records import CaptureRecord, iso, sample_names
from dataplane.store import LocalStore, ObjectStore, S3Store, s3_credentials
from segloop.errors import ConfigError, DatasetError, StoreError

if TYPE_CHECKING:
    from dataplane.versions import Manifest

API_KEY_ENV = "LABEL_STUDIO_API_KEY"
STORAGE_TITLE = "segloop captures (images only: do not sync)"
NEVER = "(?!)"  # a regex that matches no key: a "Sync" in the UI imports nothing
SERVED_PREFIX = "annotation/images/"  # images re-encoded as served (EXIF-rotated, WebP...), by content


@dataclass(frozen=True)
class LabelStudioTarget:
    """Where tasks go: a Label Studio server, a project title, and how it reaches the store."""

    url: str
    project: str
    api_key: str = field(default="", repr=False)
    storage_endpoint: Optional[str] = None  # the S3 endpoint as Label Studio (and the browser) reach it
    document_root: str = "/"  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for a local store

    def client(self) -> Any:
        """A checked ``label_studio_sdk.LabelStudio`` client: reachable, key accepted."""
        from label_studio_sdk import LabelStudio

        key = self.api_key or os.environ.get(API_KEY_ENV, "")
        if not key:
            raise ConfigError(f"no Label Studio API key: set {API_KEY_ENV} (Account & Settings -> Access Token)")
        if len(self.project.strip()) < 3:
            raise ConfigError(f"Label Studio project title {self.project!r} must have at least 3 characters")
        ls = LabelStudio(base_url=self.url.rstrip("/"), api_key=key, timeout=30)
        _call(f"Label Studio at {self.url}", ls.users.whoami)
        return ls


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` with Label Studio's errors turned into segloop's: bad input 2, unreachable 1."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return fn(*args, **kwargs)
    except ApiError as err:
        body = err.body if isinstance(err.body, dict) else {}
        detail = body.get("validation_errors") or body.get("detail") or err.body
        if err.status_code in (401, 403) and "reserved network" not in str(detail):
            raise ConfigError(f"{what} refused the API key ({err.status_code}): {detail}") from None
        if err.status_code is not None and err.status_code < 500:
            raise ConfigError(f"{what} refused the request ({err.status_code}): {detail}") from None
        raise StoreError(f"{what} failed ({err.status_code}): {detail}") from None
    except httpx.HTTPError as err:
        raise StoreError(f"{what} is unreachable: {type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------- project and storage


def find_project(ls: Any, title: str) -> Optional[Any]:
    """The project with this title (None when there is none)."""
    projects = _call("Label Studio: list projects", lambda: list(ls.projects.list(title=title)))
    return next((p for p in projects if p.title == title), None)


def ensure_project(ls: Any, title: str, label_config: str) -> Any:
    """The project ``title`` with ``label_config``: created, or its config updated when it differs."""
    project = find_project(ls, title)
    if project is None:
        return _call(
            f"Label Studio: create project {title!r}",
            ls.projects.create,
            title=title,
            label_config=label_config,
            description="Captures chosen by segloop's annotation queue, most useful first.",
            sampling="Sequential sampling",
            show_skip_button=True,
        )
    if (project.label_config or "").strip() != label_config.strip():
        project = _call(
            f"Label Studio: update the labelling config of project {title!r}",
            ls.projects.update,
            id=project.id,
            label_config=label_config,
        )
    return project


def image_url_for(ls: Any, project: Any, store: ObjectStore, target: LabelStudioTarget) -> Callable[[str], str]:
    """Connect the project to the store (once) and return ``key -> the task's image URL``."""
    if isinstance(store, S3Store):
        _ensure_s3_storage(ls, project, store, target)
        return lambda key: f"s3://{store.bucket}/{key}"
    if isinstance(store, LocalStore):
        root = Path(store.root).resolve()
        _ensure_local_storage(ls, project, root, target)
        doc_root = Path(target.document_root).resolve()
        return lambda key: "/data/local-files/?d=" + str((root / key).relative_to(doc_root))
    raise ConfigError(f"Label Studio cannot read images from {store.describe()}")


def _ensure_s3_storage(ls: Any, project: Any, store: S3Store, target: LabelStudioTarget) -> None:
    have = _call("Label Studio: list S3 storages", lambda: list(ls.import_storage.s3.list(project=project.id)))
    if any(s.bucket == store.bucket for s in have):
        return
    access, secret = s3_credentials()
    if not access:
        raise ConfigError(
            "Label Studio needs S3 credentials to presign image URLs: set SEGLOOP_S3_ACCESS_KEY/SECRET_KEY"
        )
    endpoint = target.storage_endpoint or f"{'https' if store.secure else 'http'}://{store.endpoint}"
    _call(
        f"Label Studio: connect project {project.title!r} to s3://{store.bucket} at {endpoint}",
        ls.import_storage.s3.create,
        project=project.id,
        title=STORAGE_TITLE,
        bucket=store.bucket,
        prefix="captures/",
        regex_filter=NEVER,
        use_blob_urls=False,
        presign=True,
        presign_ttl=60,
        s3endpoint=endpoint,
        region_name=store.region or None,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
    )


def _ensure_local_storage(ls: Any, project: Any, root: Path, target: LabelStudioTarget) -> None:
    doc_root = Path(target.document_root).resolve()
    if not root.is_relative_to(doc_root):
        raise ConfigError(f"the store {root} is outside Label Studio's document root {doc_root} (--document-root)")
    have = _call("Label Studio: list local storages", lambda: list(ls.import_storage.local.list(project=project.id)))
    if any(Path(s.path or "") == root for s in have):
        return
    try:
        _call(
            f"Label Studio: connect project {project.title!r} to the local store {root}",
            ls.import_storage.local.create,
            project=project.id,
            title=STORAGE_TITLE,
            path=str(root),
            regex_filter=NEVER,
            use_blob_urls=False,
        )
    except ConfigError as err:
        raise ConfigError(
            f"{err}\n  Label Studio serves local files only when started with "
            f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={doc_root} "
            "(`segloop queue label-studio` starts one so)"
        ) from None


# ----------------------------------------------------------------------------- push


@dataclass
class PushResult:
    project_id: int
    project_url: str
    added: list[str]  # capture ids, in priority order
    already: list[str]  # capture ids the project had before
    problems: list[str]


def project_tasks(ls: Any, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project as JSON-ready dicts (data, annotations, ...), in id order."""
    tasks = _call(
        f"Label Studio: list the tasks of project {project_id}",
        lambda: [t.model_dump(mode="json") for t in ls.tasks.list(project=project_id, fields="all")],
    )
    return sorted(tasks, key=lambda t: t.get("id") or 0)


def push(
    store: ObjectStore,
    target: LabelStudioTarget,
    records: Sequence[CaptureRecord],
    uncertainty: Optional[Mapping[str, float]] = None,
    ls: Any = None,
) -> PushResult:
    """Add ``records`` (most useful first) to the project as tasks with brush pre-annotations.

    ``uncertainty`` (capture id -> the score the selection used) becomes each prediction's
    score; default: the recorded entropy. Captures the project already has are skipped.
    """
    if not records:
        raise DatasetError("nothing to push: the selection chose no captures")
    task, class_names = common_task(records)
    labels = labelstudio.export_labels(task, class_names)
    ls = ls or target.client()
    project = ensure_project(ls, target.project, labelstudio.label_studio_config(labels))
    url_of = image_url_for(ls, project, store, target)
    present = {str((t.get("data") or {}).get("capture_id")) for t in project_tasks(ls, project.id)}
    new = [r for r in records if r.id not in present]
    already = [r.id for r in records if r.id in present]
    items, problems = load_items(store, new, task, class_names) if new else ([], [])
    scores = dict(uncertainty or {})
    tasks = []
    for rank, item in enumerate(items, 1):
        u = scores.get(item.rec.id, item.rec.entropy)
        extra = {"priority": rank, "uncertainty": u, "store_key": item.rec.image_key}
        tasks.append(
            labelstudio.task_json(item, task, labels, url_of(_image_key(store, item)), u, brush=True, extra=extra)
        )
    if tasks:
        _call(
            f"Label Studio: add {len(tasks)} tasks to project {project.id}",
            ls.projects.import_tasks,
            id=project.id,
            request=tasks,
        )
        _record(store, target, project.id, task, class_names, items)
    url = f"{target.url.rstrip('/')}/projects/{project.id}/data"
    return PushResult(project.id, url, [i.rec.id for i in items], already, problems)


def _image_key(store: ObjectStore, item: ExportItem) -> str:
    """The store key of the image as the model saw it: the capture itself, or (EXIF-rotated,
    WebP ...) its served re-encoding stored once under ``annotation/images/`` by content."""
    sha = hashlib.sha256(item.image.data).hexdigest()
    if sha == item.rec.meta.get("image_sha256"):
        return item.rec.image_key
    key = f"{SERVED_PREFIX}{item.rec.id}-{sha[:16]}.{item.image.ext}"
    store.put_if_absent(key, item.image.data)
    return key


def _record(
    store: ObjectStore, target: LabelStudioTarget, project_id: int, task: str, class_names: list[str], items: list
) -> None:
    """What went to annotators, as an export record (the same one ``queue export`` writes)."""
    index = {
        "format": 1,
        "store": store.describe(),
        "task": task,
        "class_names": class_names,
        "created": iso(_dt.datetime.now(_dt.UTC)),
        "label_studio": {"url": target.url, "project": project_id},
        "captures": [dict(i.rec.summary(), file=i.file) for i in items],
    }
    record_export(store, index, "labelstudio")


# ----------------------------------------------------------------------------- pull


@dataclass
class PullStatus:
    """What a project holds that the dataset does not: finished, unfinished and skipped tasks."""

    project_id: int
    fresh: labelstudio.TaskList  # tasks whose capture is not in the dataset yet
    finished: int
    waiting: int  # no finished annotation (not started, draft, or skipped)


def pull_status(store: ObjectStore, target: LabelStudioTarget, parent: Manifest, ls: Any = None) -> PullStatus:
    """Count the project's finished annotations that ``parent`` does not hold yet."""
    ls = ls or target.client()
    project = find_project(ls, target.project)
    if project is None:
        raise DatasetError(f"Label Studio at {target.url} has no project {target.project!r}; push a batch first")
    done = sample_names(parent)
    fresh = [t for t in project_tasks(ls, project.id) if str((t.get("data") or {}).get("capture_id")) not in done]
    anns, skipped = labelstudio.parse_tasks(fresh, f"Label Studio project {project.id}", [])
    return PullStatus(
        project.id, labelstudio.TaskList(fresh, f"Label Studio project {project.id}"), len(anns), len(skipped)
    )


def pull(
    store: ObjectStore,
    target: LabelStudioTarget,
    dataset: str,
    split: Optional[str] = None,
    min_finished: int = 1,
) -> tuple[Optional[Manifest], PullStatus]:
    """Import the finished annotations not yet in ``dataset`` as its new version, all or nothing.

    Returns ``(None, status)`` without writing when fewer than ``min_finished`` are finished.
    """
    from dataplane.annotation.importer import import_annotations
    from dataplane.versions import get_version

    parent = get_version(store, dataset, "latest")
    ls = target.client()
    status = pull_status(store, target, parent, ls)
    if status.finished < min_finished:
        return None, status
    notes = {"label_studio": {"url": target.url, "project": status.project_id}}
    manifest = import_annotations(store, dataset, "latest", status.fresh, fmt="labelstudio", split=split, notes=notes)
    return manifest, status
