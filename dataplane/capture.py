"""The capture contract: what a model replica writes for one production sample, and the
capture policy every replica follows.

Both sides of the contract live here: the writer (``serve_app.capture.Capturer``) builds
records with :func:`build_metadata`, the annotation queue (``dataplane.annotation``) reads
them. The policy is published in the object store (``control/capture_policy.json``) so the
monitor switches capture on and off without a redeploy.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dataplane.store import (
    ObjectNotFound,
    ObjectStore,
    StoreConfig,
    capture_keys,
    check_key,
    open_store,
    store_config_from_url,
)
from segloop.errors import ConfigError

METADATA_FORMAT = 1


CAPTURE_PREFIX = "captures/"


CAPTURE_ID_RE = re.compile(r"(?<![0-9A-Za-z])(\d{8}T\d{12}Z-[0-9a-f]{32})(?![0-9a-f])")


_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG", "jpg", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "png", "image/png"),
    (b"GIF87a", "GIF", "gif", "image/gif"),
    (b"GIF89a", "GIF", "gif", "image/gif"),
    (b"BM", "BMP", "bmp", "image/bmp"),
    (b"II*\x00", "TIFF", "tif", "image/tiff"),
    (b"MM\x00*", "TIFF", "tif", "image/tiff"),
)


_MIME_EXT = {
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tif",
}


def new_capture_id(when: Optional[_dt.datetime] = None) -> str:
    """``<yyyymmdd>T<hhmmss><micro>Z-<uuid4 hex>``: sorts by time, unique, day folder derivable."""
    when = (when or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC)
    return f"{when:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex}"


def find_capture_id(text: str) -> Optional[str]:
    """The capture id inside a file name or URL (Label Studio prefixes uploads), or None."""
    m = CAPTURE_ID_RE.search(text or "")
    return m.group(1) if m else None


def capture_day(capture_id: str) -> Optional[str]:
    """``yyyy-mm-dd`` folder of a capture id (None when the id is not in the standard form)."""
    m = re.match(r"^(\d{4})(\d{2})(\d{2})T", capture_id)
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def image_format(data: bytes, content_type: Optional[str] = None) -> tuple[str, str, str]:
    """``(format, extension, mime type)`` of image bytes, by magic number, else the content type."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", "webp", "image/webp"
    for magic, fmt, ext, mime in _IMAGE_MAGIC:
        if head.startswith(magic):
            return fmt, ext, mime
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime in _MIME_EXT:
        return _MIME_EXT[mime].upper(), _MIME_EXT[mime], mime
    return "UNKNOWN", "bin", "application/octet-stream"


POLICY_KEY = "control/capture_policy.json"


class CapturePolicy(BaseModel):
    """Which predictions to keep; see the module docstring for the modes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["off", "all", "entropy", "top_fraction"] = "off"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="entropy mode: capture when entropy >= threshold")
    fraction: float = Field(0.1, gt=0.0, le=1.0, description="top_fraction mode: share of recent traffic to keep")
    window: int = Field(200, ge=1, le=100_000, description="top_fraction mode: recent predictions to rank against")
    random_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="also keep this share of the traffic the mode leaves out, at random"
    )
    drop_duplicates: bool = Field(True, description="drop exact (sha256) and near copies of recent captures")
    near_duplicate_cosine: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="a near copy: embedding cosine at least this to one this replica captured recently "
        "(1.0: exact copies only)",
    )


def parse_policy(policy: Union[CapturePolicy, Mapping[str, Any], str, None]) -> CapturePolicy:
    """A CapturePolicy from a policy, a dict, or a mode name; ConfigError naming the problem."""
    if policy is None:
        return CapturePolicy()
    if isinstance(policy, CapturePolicy):
        return policy
    if isinstance(policy, str):
        policy = {"mode": policy}
    if not isinstance(policy, Mapping):
        raise ConfigError(
            f"capture policy must be a mapping like {{'mode': 'entropy', 'threshold': 0.6}}, got {policy!r}"
        )
    try:
        return CapturePolicy.model_validate(dict(policy))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ConfigError(f"invalid capture policy {dict(policy)!r}: {loc}: {first['msg']}") from None


def finite_or_none(x: Any) -> Optional[float]:
    """``x`` as a finite float, or None (missing, NaN, inf or not a number)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def write_policy(
    store: ObjectStore, policy: Union[CapturePolicy, Mapping[str, Any], str], key: str = POLICY_KEY
) -> CapturePolicy:
    """Publish a policy that every Capturer with :func:`store_policy_source` picks up."""
    p = parse_policy(policy)
    store.put_json(check_key(key), policy_json(p))
    return p


# Fields added after the first replicas shipped: written only when set, so replicas that predate
# them (and reject unknown keys) still read every policy that does not use them.
_LATER_FIELDS = ("random_fraction", "drop_duplicates", "near_duplicate_cosine")


def policy_json(p: CapturePolicy) -> dict[str, Any]:
    defaults = CapturePolicy()
    return p.model_dump(exclude={k for k in _LATER_FIELDS if getattr(p, k) == getattr(defaults, k)})


def read_policy(store: ObjectStore, key: str = POLICY_KEY) -> Optional[CapturePolicy]:
    """The published policy, or None when none is published."""

    try:
        data = store.get_json(check_key(key))
    except ObjectNotFound:
        return None
    return parse_policy(data)


StoreSpec = Union[ObjectStore, StoreConfig, Mapping[str, Any], str, Callable[[], ObjectStore]]


def store_factory_from(spec: StoreSpec) -> Callable[[], ObjectStore]:
    """A zero-argument callable that opens the store ``spec`` names.

    ``spec``: an ObjectStore; a StoreConfig or its dict (what the Serve app passes; S3
    credentials come from the replica's environment); a store URL (local path or
    ``s3://bucket``); or a callable returning a store. Configs are validated here, the
    store itself is opened on first use in the writer thread.
    """
    if isinstance(spec, ObjectStore):
        return lambda: spec
    if isinstance(spec, StoreConfig):
        return lambda: open_store(spec)
    if isinstance(spec, Mapping):
        from segloop.config import validate

        cfg = validate(StoreConfig, dict(spec), source="capture store config")
        return lambda: open_store(cfg)
    if isinstance(spec, str):
        cfg = store_config_from_url(spec)
        return lambda: open_store(cfg)
    if callable(spec):
        return spec
    raise ConfigError(f"capture store must be an ObjectStore, a StoreConfig (dict), a URL or a callable, got {spec!r}")


def _utc_iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _mask_png(record: Mapping[str, Any]) -> Optional[bytes]:
    data = record.get("mask_png")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    text = record.get("mask_png_base64")
    if isinstance(text, str) and text:
        return base64.b64decode(text)
    return None


def _instance_prediction(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(prediction summary, COCO pre-annotation)`` of an instance response."""
    instances = [dict(i) for i in record.get("instances") or [] if isinstance(i, Mapping)]
    counts: dict[str, int] = {}
    for inst in instances:
        name = str(inst.get("category_name", inst.get("category_id")))
        counts[name] = counts.get(name, 0) + 1
    scores = [s for s in (finite_or_none(i.get("score")) for i in instances) if s is not None]
    prediction = {
        "num_instances": len(instances),
        "counts": counts,
        "mean_score": (sum(scores) / len(scores)) if scores else None,
    }
    keep = ("category_id", "category_name", "score", "bbox", "segmentation")
    return prediction, {"kind": "coco_instances", "instances": [{k: i.get(k) for k in keep} for i in instances]}


def _semantic_prediction(
    record: Mapping[str, Any], json_key: str
) -> tuple[dict[str, Any], Optional[dict[str, Any]], dict[str, bytes]]:
    """``(prediction summary, mask pre-annotation or None, {mask key: PNG})`` of a semantic response."""
    fractions = record.get("class_fractions")
    prediction = {"class_fractions": dict(fractions) if isinstance(fractions, Mapping) else None}
    mask = _mask_png(record)
    if mask is None:
        return prediction, None, {}
    mask_key = json_key.removesuffix(".json") + ".mask.png"
    encoding = "palette PNG, pixel value = class index into class_names"
    return prediction, {"kind": "mask_png", "key": mask_key, "encoding": encoding}, {mask_key: mask}


def build_metadata(
    capture_id: str,
    when: _dt.datetime,
    image: bytes,
    content_type: Optional[str],
    record: Mapping[str, Any],
    policy: Optional[CapturePolicy] = None,
) -> tuple[dict[str, Any], dict[str, bytes], str]:
    """``(metadata, {key: bytes} to write before the JSON, json_key)`` of one capture.

    Metadata (format 1)::

        format, id, time (ISO UTC), entropy, confidence, task,
        model {name, version, uri}, model_version,
        image_key, content_type, image_sha256, image_bytes, width, height,
        prediction      semantic: {class_names, class_fractions}
                        instance: {class_names, num_instances, counts {class: n}, mean_score}
        preannotation   semantic: {kind: "mask_png", key, encoding}
                        instance: {kind: "coco_instances", instances: [{category_id, category_name,
                                   score, bbox [x,y,w,h], segmentation {size, counts}}]}  (COCO RLE)
                        or null when the response carried no mask
        policy          the policy that selected the sample
        selected_by     "policy" (the mode chose it) or "random" (the policy's random share)
        uncertainty     {entropy, class_balanced_entropy, top_entropy, margin} (semantic) or
                        {entropy, score_uncertainty, mask_entropy, max_instance_entropy,
                         class_balanced_entropy, margin} (instance); see train.uncertainty
        embedding       {dtype: "float16", dim, model_version, data: base64 little-endian} or null

    ``selected_by``, ``uncertainty`` and ``embedding`` were added later: readers treat them as
    optional (older captures lack them) and older readers ignore them.
    """
    fmt, ext, mime = image_format(image, content_type)
    data_key, json_key = capture_keys(capture_id, ext, when)
    task = record.get("task")
    model = record.get("model") if isinstance(record.get("model"), Mapping) else {}
    model = {k: (str(model[k]) if model.get(k) is not None else None) for k in ("name", "version", "uri")}
    version = record.get("model_version", model.get("version"))
    objects: dict[str, bytes] = {data_key: image}
    if task == "instance":
        prediction, preannotation = _instance_prediction(record)
    else:
        prediction, preannotation, mask = _semantic_prediction(record, json_key)
        objects.update(mask)
    prediction = {"class_names": [str(c) for c in record.get("class_names") or []], **prediction}
    meta = {
        "format": METADATA_FORMAT,
        "id": capture_id,
        "time": _utc_iso(when),
        "entropy": finite_or_none(record.get("entropy")),
        "confidence": finite_or_none(record.get("confidence")),
        "task": task,
        "model": model,
        "model_version": str(version) if version is not None else None,
        "image_key": data_key,
        "image_format": fmt,
        "content_type": mime,
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "image_bytes": len(image),
        "width": int(record["width"]) if isinstance(record.get("width"), int) else None,
        "height": int(record["height"]) if isinstance(record.get("height"), int) else None,
        "prediction": prediction,
        "preannotation": preannotation,
        "policy": policy_json(policy) if policy is not None else None,
    }
    meta.update(_selection_fields(record, meta["model_version"]))
    return meta, objects, json_key


def _selection_fields(record: Mapping[str, Any], model_version: Optional[str]) -> dict[str, Any]:
    """``selected_by``, ``uncertainty`` and ``embedding`` of a capture (what selection reads)."""
    return {
        "selected_by": str(record.get("selected_by") or "policy"),
        "uncertainty": _uncertainty(record.get("uncertainty")),
        "embedding": encode_embedding(record.get("embedding"), model_version),
    }


def _uncertainty(stats: Any) -> Optional[dict[str, float]]:
    if not isinstance(stats, Mapping):
        return None
    out = {str(k): finite_or_none(v) for k, v in stats.items()}
    return {k: v for k, v in out.items() if v is not None} or None


def encode_embedding(vector: Any, model_version: Optional[str] = None) -> Optional[dict[str, Any]]:
    """A capture's embedding as JSON: float16 little-endian bytes in base64 (None: no embedding)."""
    if vector is None:
        return None
    v = np.asarray(vector, dtype="<f2").reshape(-1)
    if v.size == 0 or not np.isfinite(v).all():
        return None
    data = base64.b64encode(v.tobytes()).decode("ascii")
    return {"dtype": "float16", "dim": int(v.size), "model_version": model_version, "data": data}


def decode_embedding(entry: Any) -> Optional[np.ndarray]:
    """The float32 vector of :func:`encode_embedding`'s JSON; None when absent or malformed."""
    if not isinstance(entry, Mapping) or entry.get("dtype") != "float16" or not isinstance(entry.get("data"), str):
        return None
    try:
        v = np.frombuffer(base64.b64decode(entry["data"], validate=True), dtype="<f2").astype(np.float32)
    except (ValueError, TypeError):
        return None
    if v.size == 0 or v.size != entry.get("dim") or not np.isfinite(v).all():
        return None
    return v


def store_policy_source(
    store: Union[ObjectStore, StoreConfig, Mapping[str, Any], str, Callable[[], ObjectStore]], key: str = POLICY_KEY
) -> Callable[[], Optional[CapturePolicy]]:
    """A ``policy_source`` for :class:`Capturer` that reads the policy :func:`write_policy` published."""
    factory = store_factory_from(store)
    holder: list[ObjectStore] = []

    def source() -> Optional[CapturePolicy]:
        if not holder:
            holder.append(factory())
        return read_policy(holder[0], key)

    return source


# ----------------------------------------------------------------------------- budget


class CaptureBudget(BaseModel):
    """How much capture may store per UTC day, across every replica (None: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objects_per_day: Optional[int] = Field(None, ge=0, description="captured samples per day")
    bytes_per_day: Optional[int] = Field(None, ge=0, description="image bytes per day")


class BudgetLedger:
    """Today's captures counted in one named Ray actor, so every replica draws on one budget.

    Calls run one at a time (a plain actor), so ``take`` is a compare-and-add: captures stop
    exactly at the budget however many replicas write. A restarted ledger counts again from
    the day's capture records in the store (bytes from their metadata).
    """

    def __init__(self, budget: dict[str, Any], store: Any = None) -> None:
        self.budget = CaptureBudget.model_validate(budget)
        self._day, self._objects, self._bytes = "", 0, 0
        self._store = store

    def take(self, nbytes: int, day: Optional[str] = None) -> bool:
        """Reserve one capture of ``nbytes`` today; False (nothing reserved) once over budget."""
        day = day or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
        if day != self._day:
            self._day, (self._objects, self._bytes) = day, self._stored_on(day)
        b = self.budget
        if (b.objects_per_day is not None and self._objects + 1 > b.objects_per_day) or (
            b.bytes_per_day is not None and self._bytes + nbytes > b.bytes_per_day
        ):
            return False
        self._objects, self._bytes = self._objects + 1, self._bytes + nbytes
        return True

    def used(self) -> dict[str, Any]:
        return {"day": self._day, "objects": self._objects, "bytes": self._bytes}

    def _stored_on(self, day: str) -> tuple[int, int]:
        if self._store is None:
            return 0, 0
        store = store_factory_from(self._store)()
        metas = [k for k in store.list(f"captures/{day}/") if k.endswith(".json")]
        sizes = []
        for key in metas:
            try:
                sizes.append(int(store.get_json(key).get("image_bytes", 0) or 0))
            except Exception:  # noqa: BLE001 - an unreadable record still counts as one capture
                sizes.append(0)
        return len(metas), sum(sizes)


BUDGET_ACTOR = "segloop-capture-budget"


def budget_gate(budget: Mapping[str, Any], store: Any = None) -> Callable[[int], bool]:
    """A Capturer ``budget`` callable drawing on the cluster-wide :class:`BudgetLedger`."""
    import ray

    ledger = (
        ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(BudgetLedger)
        .options(name=BUDGET_ACTOR, namespace="segloop", lifetime="detached", get_if_exists=True)
        .remote(dict(budget), store)
    )
    return lambda nbytes: bool(ray.get(ledger.take.remote(nbytes), timeout=10))
