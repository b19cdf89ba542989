"""Capture records: the captured samples (``captures/<day>/<id>.json``, written by
:mod:`serve_app.capture`) as the queue reads them, and their listing by uncertainty.

Listing filters by day folder first, so a time range reads only the JSONs of those days.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dataplane.capture import CAPTURE_PREFIX, capture_day
from dataplane.store import ObjectNotFound, ObjectStore
from segloop.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from dataplane.versions import Manifest

logger = logging.getLogger(__name__)

CAPTURE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class CaptureRecord:
    """One captured sample, as read from its metadata JSON."""

    id: str
    time: _dt.datetime
    entropy: Optional[float]
    confidence: Optional[float]
    task: Optional[str]
    model_name: Optional[str]
    model_version: Optional[str]
    image_key: str
    json_key: str
    width: Optional[int]
    height: Optional[int]
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def from_meta(cls, meta: Any, json_key: str) -> CaptureRecord:
        if not isinstance(meta, dict):
            raise DatasetError(f"capture {json_key}: metadata is not a JSON object")
        missing = [k for k in ("id", "time", "image_key") if not meta.get(k)]
        if missing:
            raise DatasetError(f"capture {json_key}: metadata lacks {', '.join(missing)}")
        try:
            t = parse_time(meta["time"])
        except ValueError:
            raise DatasetError(f"capture {json_key}: invalid time {meta['time']!r}") from None
        model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        ent, conf = meta.get("entropy"), meta.get("confidence")
        return cls(
            id=str(meta["id"]),
            time=t,
            entropy=float(ent) if isinstance(ent, (int, float)) else None,
            confidence=float(conf) if isinstance(conf, (int, float)) else None,
            task=meta.get("task"),
            model_name=model.get("name"),
            model_version=str(meta["model_version"]) if meta.get("model_version") is not None else model.get("version"),
            image_key=str(meta["image_key"]),
            json_key=json_key,
            width=meta.get("width") if isinstance(meta.get("width"), int) else None,
            height=meta.get("height") if isinstance(meta.get("height"), int) else None,
            meta=meta,
        )

    @property
    def class_names(self) -> list[str]:
        pred = self.meta.get("prediction") or {}
        return [str(c) for c in pred.get("class_names") or []]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": iso(self.time),
            "entropy": self.entropy,
            "confidence": self.confidence,
            "task": self.task,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "width": self.width,
            "height": self.height,
            "image_key": self.image_key,
            "json_key": self.json_key,
        }


# ----------------------------------------------------------------------------- time


def iso(t: _dt.datetime) -> str:
    """ISO UTC time with microseconds and a ``Z`` suffix."""
    return t.astimezone(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: Any, *, end_of_day: bool = False) -> _dt.datetime:
    """datetime/date/ISO string -> aware UTC datetime; a bare date with ``end_of_day`` -> next midnight."""
    if isinstance(value, _dt.datetime):
        t = value
    elif isinstance(value, _dt.date):
        t = _dt.datetime(value.year, value.month, value.day) + (
            _dt.timedelta(days=1) if end_of_day else _dt.timedelta()
        )
    elif isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
            return parse_time(_dt.date.fromisoformat(s), end_of_day=end_of_day)
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    else:
        raise ValueError(f"not a time: {value!r}")
    return t.replace(tzinfo=_dt.UTC) if t.tzinfo is None else t.astimezone(_dt.UTC)


def _time_arg(value: Any, what: str, end_of_day: bool = False) -> Optional[_dt.datetime]:
    if value is None or value == "":
        return None
    try:
        return parse_time(value, end_of_day=end_of_day)
    except ValueError:
        raise ConfigError(
            f"{what} {value!r} is not a date or ISO time (e.g. 2025-01-31 or 2025-01-31T12:00:00Z)"
        ) from None


# ----------------------------------------------------------------------------- listing


def sample_names(manifest: Manifest) -> set[str]:
    """Every sample name of a dataset version, with and without its extension."""
    names: set[str] = set()
    for split_names in manifest.splits.values():
        for n in split_names:
            names.add(n)
            names.add(Path(n).stem)
    return names


def list_captures(
    store: ObjectStore,
    since: Any = None,
    until: Any = None,
    model_version: Optional[str] = None,
    *,
    task: Optional[str] = None,
    exclude: Optional[Manifest] = None,
    limit: Optional[int] = None,
    strict: bool = False,
    workers: int = 8,
) -> list[CaptureRecord]:
    """Captured samples sorted by entropy, highest first (no entropy last; ties newest first).

    ``since`` is inclusive and ``until`` exclusive (a bare date ``until`` includes that day);
    ``exclude`` (a dataset Manifest) leaves out captures already annotated into it.
    Unreadable capture JSONs are skipped with a warning (``strict``: DatasetError).
    """
    t0 = _time_arg(since, "since")
    t1 = _time_arg(until, "until", end_of_day=True)
    keys = _capture_keys(store, t0.strftime("%Y-%m-%d") if t0 else None, t1.strftime("%Y-%m-%d") if t1 else None)
    skip = sample_names(exclude) if exclude is not None else set()
    load = functools.partial(_read_record_or_skip, store, strict=strict)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys) or 1))) as pool:
        records = [r for r in pool.map(load, keys) if r is not None]
    out = []
    for r in records:
        if t0 and r.time < t0 or t1 and r.time >= t1:
            continue
        if model_version is not None and r.model_version != str(model_version):
            continue
        if task is not None and r.task != task:
            continue
        if r.id in skip:
            continue
        out.append(r)
    out.sort(key=lambda r: (r.entropy if r.entropy is not None else -math.inf, r.time, r.id), reverse=True)
    return out[:limit] if limit is not None else out


def _capture_keys(store: ObjectStore, day0: Optional[str], day1: Optional[str]) -> list[str]:
    """The capture JSON keys in day folders ``day0..day1`` (inclusive, either open)."""
    keys = []
    for key in store.list(CAPTURE_PREFIX):
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].endswith(".json"):
            continue
        day = parts[1]
        if (day0 and day < day0) or (day1 and day > day1):
            continue
        keys.append(key)
    return keys


def _read_record_or_skip(store: ObjectStore, key: str, *, strict: bool) -> Optional[CaptureRecord]:
    try:
        return read_record(store, key)
    except ObjectNotFound:
        return None  # deleted while listing
    except DatasetError as err:
        if strict:
            raise
        logger.warning("skipping capture %s", err)
        return None


def read_record(store: ObjectStore, key: str) -> CaptureRecord:
    """The record of one capture JSON; DatasetError naming it when it is not valid JSON."""
    raw = store.get_bytes(key)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"capture {key}: metadata is not valid JSON: {err}") from None
    return CaptureRecord.from_meta(meta, key)


def get_capture(store: ObjectStore, capture_id: str) -> CaptureRecord:
    """The capture with this id (DatasetError naming it when there is none)."""
    if not isinstance(capture_id, str) or not CAPTURE_ID.fullmatch(capture_id):
        raise DatasetError(f"invalid capture id {capture_id!r}")
    day = capture_day(capture_id)
    keys = [f"{CAPTURE_PREFIX}{day}/{capture_id}.json"] if day else []
    for key in keys:
        try:
            return read_record(store, key)
        except ObjectNotFound:
            pass
    for key in store.list(CAPTURE_PREFIX):  # non-standard id or moved day folder
        if key.endswith(f"/{capture_id}.json"):
            return read_record(store, key)
    raise DatasetError(f"no capture {capture_id!r} in {store.describe()}")
