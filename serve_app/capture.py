"""Active-learning capture: keep the production inputs the model is unsure about.

The model deployment calls :meth:`Capturer.offer` after each prediction with the request's
raw bytes and its response fields (which already hold the per-image ``entropy`` and
``confidence`` of the same forward pass, see :mod:`serve_app.postprocess`). ``offer`` only
asks the :class:`CapturePolicy` and puts the sample on a bounded in-memory queue; a daemon
thread writes it to the object store. So capture never slows or fails ``/predict``:

* ``offer`` never blocks and never raises; a full queue drops the sample (counted);
* writes are retried with exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``,
  ``max_retries`` retries); a sample that still cannot be written is dropped (counted) and the
  thread moves on, so capture resumes by itself as soon as the store answers again;
* counters ``stored`` / ``dropped`` / ``skipped`` (not selected by the policy) and the queue
  length go to :meth:`Capturer.stats` and to an optional metrics sink (``segloop_captures``,
  ``segloop_capture_queue``, see :func:`ray_capture_metrics`).

Policies (switchable at run time with :meth:`Capturer.set_policy`, or by a ``policy_source``
polled in the background, e.g. :func:`store_policy_source` reading ``control/capture_policy.json``
that :func:`write_policy` writes, so one write reaches every replica without a redeploy):

* ``off`` - capture nothing;  ``all`` - capture everything;
* ``entropy`` - capture when ``entropy >= threshold``;
* ``top_fraction`` - capture when the entropy is among the top ``fraction`` of the last
  ``window`` predictions (itself included): fewer than ``ceil(fraction * n)`` of those ``n``
  entropies are strictly higher. While fewer than ``window`` predictions have been seen the
  decision uses the ones seen so far.

Store layout of one capture (keys from :func:`train.store.capture_keys`; written in this order,
so a listed ``.json`` always has its image)::

    captures/<yyyy-mm-dd>/<id>.<ext>        the original request bytes (jpg, png, webp, ...)
    captures/<yyyy-mm-dd>/<id>.mask.png     semantic only: predicted class-index mask (palette PNG,
                                            pixel value = class index, same as the API's mask)
    captures/<yyyy-mm-dd>/<id>.json         metadata, see :func:`build_metadata`

``<id>`` is a UTC timestamp plus a random uuid4 (``20250101T120000123456Z-<32 hex>``), so ids
sort by time and the day folder follows from the id.
"""

from __future__ import annotations

import base64
import collections
import datetime as _dt
import functools
import hashlib
import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.errors import ConfigError
from train.queue import METADATA_FORMAT, image_format, new_capture_id
from train.store import ObjectStore, StoreConfig, capture_keys, check_key, open_store, store_config_from_url

logger = logging.getLogger("ray.serve")

POLICY_KEY = "control/capture_policy.json"
STATUSES = ("stored", "dropped", "skipped")


# ----------------------------------------------------------------------------- policy


class CapturePolicy(BaseModel):
    """Which predictions to keep; see the module docstring for the modes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["off", "all", "entropy", "top_fraction"] = "off"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="entropy mode: capture when entropy >= threshold")
    fraction: float = Field(0.1, gt=0.0, le=1.0, description="top_fraction mode: share of recent traffic to keep")
    window: int = Field(200, ge=1, le=100_000, description="top_fraction mode: recent predictions to rank against")


def parse_policy(policy: Union[CapturePolicy, Mapping[str, Any], str, None]) -> CapturePolicy:
    """A CapturePolicy from a policy, a dict, or a mode name; ConfigError naming the problem."""
    if policy is None:
        return CapturePolicy()
    if isinstance(policy, CapturePolicy):
        return policy
    if isinstance(policy, str):
        policy = {"mode": policy}
    if not isinstance(policy, Mapping):
        raise ConfigError(f"capture policy must be a mapping like {{'mode': 'entropy', 'threshold': 0.6}}, got {policy!r}")
    try:
        return CapturePolicy.model_validate(dict(policy))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ConfigError(f"invalid capture policy {dict(policy)!r}: {loc}: {first['msg']}") from None


class PolicyState:
    """A policy plus the rolling window of recent entropies that ``top_fraction`` ranks against.

    Every valid entropy is recorded whatever the mode, so switching to ``top_fraction`` decides
    on real traffic at once. Thread-safe; one decision costs O(window).
    """

    def __init__(self, policy: Union[CapturePolicy, Mapping[str, Any], str, None] = None) -> None:
        self._lock = threading.Lock()
        self.policy = parse_policy(policy)
        self._recent: collections.deque[float] = collections.deque(maxlen=self.policy.window)

    def set_policy(self, policy: Union[CapturePolicy, Mapping[str, Any], str, None]) -> CapturePolicy:
        new = parse_policy(policy)
        with self._lock:
            if new.window != self._recent.maxlen:
                self._recent = collections.deque(self._recent, maxlen=new.window)
            self.policy = new
        return new

    def should_capture(self, entropy: Any) -> bool:
        """Decide for one prediction (and record its entropy). Missing/NaN entropy: only ``all``."""
        e = _finite(entropy)
        with self._lock:
            p = self.policy
            if e is not None:
                self._recent.append(e)
            if p.mode == "all":
                return True
            if p.mode == "off" or e is None:
                return False
            if p.mode == "entropy":
                return e >= p.threshold
            n = len(self._recent)
            k = math.ceil(p.fraction * n - 1e-9)
            higher = sum(1 for x in self._recent if x > e)
            return higher < k


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------- policy in the store


def write_policy(store: ObjectStore, policy: Union[CapturePolicy, Mapping[str, Any], str], key: str = POLICY_KEY) -> CapturePolicy:
    """Publish a policy that every Capturer with :func:`store_policy_source` picks up."""
    p = parse_policy(policy)
    store.put_json(check_key(key), p.model_dump())
    return p


def read_policy(store: ObjectStore, key: str = POLICY_KEY) -> Optional[CapturePolicy]:
    """The published policy, or None when none is published."""
    from train.store import ObjectNotFound

    try:
        data = store.get_json(check_key(key))
    except ObjectNotFound:
        return None
    return parse_policy(data)


def store_policy_source(store: Union[ObjectStore, StoreConfig, Mapping[str, Any], str, Callable[[], ObjectStore]],
                        key: str = POLICY_KEY) -> Callable[[], Optional[CapturePolicy]]:
    """A ``policy_source`` for :class:`Capturer` that reads the policy :func:`write_policy` published."""
    factory = store_factory_from(store)
    holder: list[ObjectStore] = []

    def source() -> Optional[CapturePolicy]:
        if not holder:
            holder.append(factory())
        return read_policy(holder[0], key)

    return source


# ----------------------------------------------------------------------------- metrics


@dataclass
class RayCaptureMetrics:
    """``segloop_captures{status}`` counter and ``segloop_capture_queue`` gauge (Ray metrics)."""

    captures: Any
    queue: Any

    def inc(self, status: str) -> None:
        self.captures.inc(1, tags={"status": status})

    def set_queue(self, n: int) -> None:
        self.queue.set(n)


@functools.cache
def ray_capture_metrics() -> RayCaptureMetrics:
    """The Ray metrics sink, created once per process (call inside a replica, not at import)."""
    from ray.serve.metrics import Counter, Gauge

    return RayCaptureMetrics(
        captures=Counter(
            "segloop_captures",
            description="Production samples offered for capture, by status (stored|dropped|skipped).",
            tag_keys=("status",),
        ),
        queue=Gauge("segloop_capture_queue", description="Captured samples waiting to be written to the object store."),
    )


# ----------------------------------------------------------------------------- store factory


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
        from train.config import validate

        cfg = validate(StoreConfig, dict(spec), source="capture store config")
        return lambda: open_store(cfg)
    if isinstance(spec, str):
        cfg = store_config_from_url(spec)
        return lambda: open_store(cfg)
    if callable(spec):
        return spec
    raise ConfigError(f"capture store must be an ObjectStore, a StoreConfig (dict), a URL or a callable, got {spec!r}")


# ----------------------------------------------------------------------------- metadata


def _utc_iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _mask_png(record: Mapping[str, Any]) -> Optional[bytes]:
    data = record.get("mask_png")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    text = record.get("mask_png_base64")
    if isinstance(text, str) and text:
        return base64.b64decode(text)
    return None


def _num(x: Any) -> Optional[float]:
    return _finite(x)


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
    """
    fmt, ext, mime = image_format(image, content_type)
    data_key, json_key = capture_keys(capture_id, ext, when)
    task = record.get("task")
    model = record.get("model") if isinstance(record.get("model"), Mapping) else {}
    model = {k: (str(model[k]) if model.get(k) is not None else None) for k in ("name", "version", "uri")}
    version = record.get("model_version", model.get("version"))
    class_names = [str(c) for c in record.get("class_names") or []]
    objects: dict[str, bytes] = {data_key: image}
    prediction: dict[str, Any] = {"class_names": class_names}
    preannotation: Optional[dict[str, Any]] = None
    if task == "instance":
        instances = [dict(i) for i in record.get("instances") or [] if isinstance(i, Mapping)]
        counts: dict[str, int] = {}
        for inst in instances:
            name = str(inst.get("category_name", inst.get("category_id")))
            counts[name] = counts.get(name, 0) + 1
        scores = [s for s in (_num(i.get("score")) for i in instances) if s is not None]
        prediction.update(
            num_instances=len(instances), counts=counts, mean_score=(sum(scores) / len(scores)) if scores else None
        )
        keep = ("category_id", "category_name", "score", "bbox", "segmentation")
        preannotation = {"kind": "coco_instances", "instances": [{k: i.get(k) for k in keep} for i in instances]}
    else:
        fractions = record.get("class_fractions")
        prediction["class_fractions"] = dict(fractions) if isinstance(fractions, Mapping) else None
        mask = _mask_png(record)
        if mask is not None:
            mask_key = json_key[: -len(".json")] + ".mask.png"
            objects[mask_key] = mask
            preannotation = {
                "kind": "mask_png",
                "key": mask_key,
                "encoding": "palette PNG, pixel value = class index into class_names",
            }
    meta = {
        "format": METADATA_FORMAT,
        "id": capture_id,
        "time": _utc_iso(when),
        "entropy": _num(record.get("entropy")),
        "confidence": _num(record.get("confidence")),
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
        "policy": policy.model_dump() if policy is not None else None,
    }
    return meta, objects, json_key


# ----------------------------------------------------------------------------- capturer


@dataclass
class _Item:
    capture_id: str
    when: _dt.datetime
    image: bytes
    content_type: Optional[str]
    record: dict[str, Any]
    policy: CapturePolicy


class Capturer:
    """Bounded, non-blocking capture of production samples into an ObjectStore.

    ``store_factory``: see :func:`store_factory_from` (a StoreConfig dict in Serve).
    At most ``queue_size`` samples and ``max_queue_bytes`` of image bytes wait in memory.
    ``metrics``: optional object with ``inc(status)`` and ``set_queue(n)`` (e.g.
    :func:`ray_capture_metrics`); its errors are ignored. ``policy_source``: optional
    callable returning a policy (or None = keep the current one), polled every
    ``policy_poll_s`` seconds by the writer thread.
    """

    def __init__(
        self,
        store_factory: StoreSpec,
        policy: Union[CapturePolicy, Mapping[str, Any], str, None] = None,
        queue_size: int = 256,
        max_retries: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        metrics: Any = None,
        *,
        policy_source: Optional[Callable[[], Any]] = None,
        policy_poll_s: float = 10.0,
        max_queue_bytes: int = 64 * 2**20,
        name: str = "segloop-capture",
    ) -> None:
        if queue_size < 1 or max_queue_bytes < 1:
            raise ConfigError(f"queue_size and max_queue_bytes must be >= 1, got {queue_size}, {max_queue_bytes}")
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < 0 or policy_poll_s <= 0:
            raise ConfigError("max_retries, backoff_s and max_backoff_s must be >= 0 and policy_poll_s > 0")
        self._factory = store_factory_from(store_factory)
        self._state = PolicyState(policy)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.max_queue_bytes = int(max_queue_bytes)
        self._queued_bytes = 0
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._metrics = metrics
        self._policy_source = policy_source
        self._policy_poll_s = float(policy_poll_s)
        self._store: Optional[ObjectStore] = None
        self._counts = {s: 0 for s in STATUSES}
        self._errors = 0
        self._last_error: Optional[str] = None
        self._healthy = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- serving side (must stay cheap: called on the replica's event loop) ------------------

    @property
    def policy(self) -> CapturePolicy:
        return self._state.policy

    def set_policy(self, policy: Union[CapturePolicy, Mapping[str, Any], str]) -> CapturePolicy:
        """Switch the policy now (ConfigError for an invalid one; the old one stays)."""
        new = self._state.set_policy(policy)
        logger.info("capture policy: %s", new.model_dump())
        return new

    def offer(self, image_bytes: bytes, content_type: Optional[str] = None, record: Optional[Mapping[str, Any]] = None) -> bool:
        """Capture this prediction if the policy selects it; True when it was queued.

        ``record``: the prediction's response fields (``entropy``, ``confidence``, ``task``,
        ``model``, ``width``/``height``, ``class_fractions`` + ``mask_png``/``mask_png_base64``
        or ``instances``). Never blocks, never raises.
        """
        reserved = 0
        try:
            record = record if isinstance(record, Mapping) else {}
            if not self._state.should_capture(record.get("entropy")):
                self._count("skipped")
                return False
            if self._closed or not isinstance(image_bytes, (bytes, bytearray, memoryview)) or not image_bytes:
                self._count("dropped")
                return False
            with self._lock:  # bound the memory held by queued images, not only their number
                if self._queued_bytes + len(image_bytes) > self.max_queue_bytes:
                    raise queue.Full
                reserved = len(image_bytes)
                self._queued_bytes += reserved
            when = _dt.datetime.now(_dt.timezone.utc)
            item = _Item(new_capture_id(when), when, bytes(image_bytes), content_type, dict(record), self._state.policy)
            self._queue.put_nowait(item)
        except Exception as err:  # noqa: BLE001 - capture must never fail a prediction
            if reserved:
                self._release(reserved)
            if not isinstance(err, queue.Full):
                logger.exception("capture offer failed")
            self._count("dropped")
            return False
        self._gauge()
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out.update(queued=self._queue.qsize(), errors=self._errors, last_error=self._last_error)
        out["policy"] = self._state.policy.model_dump()
        return out

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued sample is written or dropped; False on timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                q.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, write what is queued within ``timeout``, drop (count) the rest."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=max(1.0, self.max_backoff_s + 1.0))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._release(len(item.image))
            self._count("dropped")
            self._queue.task_done()
        self._gauge()

    def __enter__(self) -> "Capturer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _count(self, status: str) -> None:
        with self._lock:
            self._counts[status] += 1
        if self._metrics is not None:
            try:
                self._metrics.inc(status)
            except Exception:  # noqa: BLE001
                pass

    def _release(self, n: int) -> None:
        with self._lock:
            self._queued_bytes -= n

    def _gauge(self) -> None:
        if self._metrics is not None:
            try:
                self._metrics.set_queue(self._queue.qsize())
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            if self._policy_source is not None and time.monotonic() >= next_poll:
                self._poll_policy()
                next_poll = time.monotonic() + self._policy_poll_s
            try:
                item = self._queue.get(timeout=min(0.5, self._policy_poll_s))
            except queue.Empty:
                self._gauge()  # Ray drops a gauge not set within a report period: keep it alive
                continue
            try:
                self._release(len(item.image))
                self._write(item)
            except Exception:  # noqa: BLE001 - the writer thread must survive anything
                logger.exception("capture writer failed on a sample")
                self._count("dropped")
            finally:
                self._queue.task_done()
                self._gauge()

    def _poll_policy(self) -> None:
        try:
            found = self._policy_source()  # type: ignore[misc]
            if found is not None:
                new = parse_policy(found)
                if new != self._state.policy:
                    self.set_policy(new)
        except Exception as err:  # noqa: BLE001 - keep the current policy
            logger.debug("capture policy source failed: %s", err)

    def _write(self, item: _Item) -> None:
        try:
            meta, objects, json_key = build_metadata(
                item.capture_id, item.when, item.image, item.content_type, item.record, item.policy
            )
        except Exception as err:  # noqa: BLE001 - a malformed record: nothing to retry
            logger.warning("capture %s dropped: cannot build its metadata: %s", item.capture_id, err)
            self._count("dropped")
            return
        done: set[str] = set()
        attempt = 0
        while True:
            try:
                if self._store is None:
                    self._store = self._factory()
                for key, data in objects.items():  # image (and mask) first ...
                    if key not in done:
                        self._store.put_bytes(key, data, content_type=_content_type(key, meta))
                        done.add(key)
                self._store.put_json(json_key, meta)  # ... the JSON last
            except Exception as err:  # noqa: BLE001 - StoreError, ConfigError from the factory, ...
                with self._lock:
                    self._errors += 1
                    self._last_error = f"{type(err).__name__}: {err}"
                if self._healthy:
                    logger.warning("capture store unavailable, retrying in the background: %s", err)
                    self._healthy = False
                if attempt >= self.max_retries or self._stop.is_set():
                    logger.debug("capture %s dropped after %d attempts", item.capture_id, attempt + 1)
                    self._count("dropped")
                    return
                delay = min(self.backoff_s * (2**attempt), self.max_backoff_s) * random.uniform(0.75, 1.0)
                attempt += 1
                if self._stop.wait(delay):
                    self._count("dropped")
                    return
                continue
            if not self._healthy:
                logger.warning("capture store is back; capturing again")
                self._healthy = True
            self._count("stored")
            return


def _content_type(key: str, meta: Mapping[str, Any]) -> str:
    if key.endswith(".png") and key != meta.get("image_key"):
        return "image/png"
    return str(meta.get("content_type") or "application/octet-stream")
