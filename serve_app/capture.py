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

Beside the uncertain tail, ``random_fraction`` keeps that share of the rest at random (the
record says ``selected_by: random``): selection at export needs some of the ordinary traffic
too. The writer thread drops exact (sha256) and near (embedding cosine >=
``near_duplicate_cosine``) copies of this replica's recent captures (counted ``duplicate``).

Store layout of one capture (keys from :func:`dataplane.store.capture_keys`; written in this order,
so a listed ``.json`` always has its image)::

    captures/<yyyy-mm-dd>/<id>.<ext>        the original request bytes (jpg, png, webp, ...)
    captures/<yyyy-mm-dd>/<id>.mask.png     semantic only: predicted class-index mask (palette PNG,
                                            pixel value = class index, same as the API's mask)
    captures/<yyyy-mm-dd>/<id>.json         metadata, see :func:`build_metadata`

``<id>`` is a UTC timestamp plus a random uuid4 (``20250101T120000123456Z-<32 hex>``), so ids
sort by time and the day folder follows from the id.
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from dataplane.capture import (
    CapturePolicy,
    StoreSpec,
    build_metadata,
    finite_or_none,
    new_capture_id,
    parse_policy,
    store_factory_from,
)
from dataplane.store import ObjectStore
from segloop.errors import ConfigError

logger = logging.getLogger("ray.serve")

STATUSES = ("stored", "dropped", "skipped", "over_budget", "duplicate")


# ----------------------------------------------------------------------------- policy


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
        return self.decide(entropy) is not None

    def decide(self, entropy: Any) -> Optional[str]:
        """``"policy"`` when the mode selects this prediction, ``"random"`` when the policy's
        random share does, else None (the entropy is recorded either way)."""
        e = finite_or_none(entropy)
        with self._lock:
            p = self.policy
            if e is not None:
                self._recent.append(e)
            if p.mode == "all":
                return "policy"
            if p.mode == "off":
                return None
            if e is not None and self._selects(p, e):
                return "policy"
        return "random" if p.random_fraction > 0 and random.random() < p.random_fraction else None

    def _selects(self, p: CapturePolicy, e: float) -> bool:
        if p.mode == "entropy":
            return e >= p.threshold
        n = len(self._recent)
        k = math.ceil(p.fraction * n - 1e-9)
        higher = sum(1 for x in self._recent if x > e)
        return higher < k


class RecentCaptures:
    """What this replica captured lately (image sha256 and embedding), to drop duplicates.

    A client that retries, a camera that sends the same frame, a re-encoded copy: annotating
    them twice buys nothing. Exact copies are found by sha256, near ones by the cosine of
    their embeddings (L2-normalised, so a dot product). Bounded: the last ``size`` captures.
    Used by the writer thread only.
    """

    def __init__(self, size: int = 2048) -> None:
        self._shas: collections.deque[str] = collections.deque(maxlen=size)
        self._vectors: Optional[np.ndarray] = None
        self._next = 0
        self._filled = 0
        self._size = size

    def is_duplicate(self, sha256: str, embedding: Any, cosine: float) -> bool:
        if sha256 in self._shas:
            return True
        v = _unit_vector(embedding)
        if v is None or cosine >= 1.0 or self._vectors is None or self._vectors.shape[1] != v.size:
            return False
        return bool((self._vectors[: self._filled] @ v).max(initial=-1.0) >= cosine)

    def add(self, sha256: str, embedding: Any) -> None:
        self._shas.append(sha256)
        v = _unit_vector(embedding)
        if v is None:
            return
        if self._vectors is None or self._vectors.shape[1] != v.size:  # first one, or another model
            self._vectors, self._next, self._filled = np.zeros((self._size, v.size), np.float32), 0, 0
        self._vectors[self._next] = v
        self._next = (self._next + 1) % self._size
        self._filled = min(self._filled + 1, self._size)


def _unit_vector(embedding: Any) -> Optional[np.ndarray]:
    if embedding is None:
        return None
    v = np.asarray(embedding, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if v.size and np.isfinite(n) and n > 0 else None


# ----------------------------------------------------------------------------- policy in the store


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
            description="Production samples offered for capture, by status "
            "(stored|dropped|skipped|over_budget|duplicate).",
            tag_keys=("status",),
        ),
        queue=Gauge("segloop_capture_queue", description="Captured samples waiting to be written to the object store."),
    )


# ----------------------------------------------------------------------------- store factory


# ----------------------------------------------------------------------------- metadata


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
        budget: Optional[Callable[[int], bool]] = None,
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
        self._budget = budget
        self._recent = RecentCaptures()
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

    def offer(
        self, image_bytes: bytes, content_type: Optional[str] = None, record: Optional[Mapping[str, Any]] = None
    ) -> bool:
        """Capture this prediction if the policy selects it; True when it was queued.

        ``record``: the prediction's response fields (``entropy``, ``confidence``, ``task``,
        ``model``, ``width``/``height``, ``class_fractions`` + ``mask_png``/``mask_png_base64``
        or ``instances``). Never blocks, never raises.
        """
        reserved = 0
        try:
            record = record if isinstance(record, Mapping) else {}
            selected_by = self._state.decide(record.get("entropy"))
            if selected_by is None:
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
            when = _dt.datetime.now(_dt.UTC)
            record = {**record, "selected_by": selected_by}
            item = _Item(new_capture_id(when), when, bytes(image_bytes), content_type, record, self._state.policy)
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

    def __enter__(self) -> Capturer:
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

    def _within_budget(self, item: _Item) -> bool:
        """Draw on the shared daily budget (the writer thread, never the request path)."""
        if self._budget is None:
            return True
        try:
            if self._budget(len(item.image)):
                return True
            self._count("over_budget")
        except Exception as err:  # noqa: BLE001 - no ledger, no capture: the budget bounds the store
            logger.warning("capture %s dropped: the capture budget cannot be read: %s", item.capture_id, err)
            self._count("dropped")
        return False

    def _duplicate(self, item: _Item) -> bool:
        """An exact or near copy of a recent capture of this replica (counted ``duplicate``)."""
        if not item.policy.drop_duplicates:
            return False
        sha = hashlib.sha256(item.image).hexdigest()
        if self._recent.is_duplicate(sha, item.record.get("embedding"), item.policy.near_duplicate_cosine):
            self._count("duplicate")
            return True
        return False

    def _write(self, item: _Item) -> None:
        if self._duplicate(item) or not self._within_budget(item):
            return
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
            self._recent.add(meta["image_sha256"], item.record.get("embedding"))  # only what was stored
            self._count("stored")
            return


def _content_type(key: str, meta: Mapping[str, Any]) -> str:
    if key.endswith(".png") and key != meta.get("image_key"):
        return "image/png"
    return str(meta.get("content_type") or "application/octet-stream")
