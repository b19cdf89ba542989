"""The model deployment: loads a segloop model, batches requests, hot-swaps versions.

Inference is :class:`train.predict.Predictor` (the same code the MLflow pyfunc and the
benchmarks run); ``run_batch`` turns its outputs into ``/predict``'s JSON fields.

Model switching never fails a request:

* ``reconfigure(user_config)`` (Serve calls it on start and, in place, whenever the
  ``user_config`` changes) loads the first model before the replica reports ready; later
  changes load the new model *in the background* into a new object and then replace one
  reference (``self._current``). Each batch reads that reference once when it starts, so
  in-flight batches finish on the old model and every response names the version that
  produced it. A load that fails leaves the old model serving (``/model`` shows the error).
* With an alias URI (``models:/NAME@champion``) and ``poll_interval_s > 0`` every
  replica re-resolves the alias on that period and swaps the same way, so moving the
  ``champion`` alias in MLflow is all a promotion or rollback has to do.

The capture hook for active learning is :meth:`SegModel._capture`: it offers each answered
image, with its uncertainty statistics and embedding (:func:`capture_signals`), to the replica's :class:`serve_app.capture.Capturer` (bounded queue, never blocks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
from ray import serve

from serve_app.config import ModelSettings
from serve_app.imaging import ImageLimits, ImageRejected, decode_image
from serve_app.metrics import model_metrics
from serve_app.postprocess import (
    encode_png,
    instance_fields,
    instance_label_mask,
    semantic_fields,
)
from train.model_ref import parse_model_uri

logger = logging.getLogger("ray.serve")

MODEL_DEPLOYMENT = "SegModel"


# ----------------------------------------------------------------------------- inference


def load_model(settings: ModelSettings) -> Any:
    """The :class:`train.predict.Predictor` for ``settings`` (weights_only loads, no pickled code)."""
    from train.predict import CheckpointHints, Predictor

    hints = CheckpointHints(
        model_name=settings.model_name,
        task=settings.task,
        class_names=settings.class_names,
        image_size=settings.image_size,
        model_kwargs=settings.model_kwargs or None,
    )
    return Predictor.load(
        settings.model_uri,
        tracking_uri=settings.mlflow_tracking_uri,
        device=settings.device,
        half=settings.half,
        channels_last=settings.channels_last,
        hints=hints,
    )


def resolve_registry_version(settings: ModelSettings) -> str:
    """The version a registry URI points at now (alias resolved)."""
    from train.predict import resolve_registry_version as resolve

    kind, name, ref = parse_model_uri(settings.model_uri)
    if kind != "registry":
        raise ValueError(f"{settings.model_uri} is not a registry URI")
    return resolve(name, ref, settings.mlflow_tracking_uri)


CAPTURE_KEY = "_capture"  # per-image capture signals: taken off the result before it is answered


def _response_fields(predictor: Any, out: Any, image: np.ndarray, png: bool, score_threshold: float) -> dict:
    """One prediction as the JSON fields of ``/predict`` (plus the mask PNG when asked for)."""
    names = predictor.meta.class_names
    if predictor.meta.task == "semantic":
        fields = semantic_fields(out.mask, out.probs, names, want_png_b64=not png)
        mask = out.mask
    else:
        arrays = {"boxes": out.boxes, "labels": out.labels, "scores": out.scores, "masks": out.masks}
        fields = instance_fields(arrays, names, image.shape[:2], score_threshold)  # masks on the model's grid
        mask = instance_label_mask(out.masks, out.scores, image.shape[:2]) if png else None
    if png:
        fields["mask_png"] = encode_png(mask)
    return fields


def capture_signals(out: Any, score_threshold: float) -> dict[str, Any]:
    """What a capture records beyond the response: uncertainty statistics and the embedding
    (:func:`train.predict.output_uncertainty`), from the same forward pass."""
    from train.predict import output_uncertainty  # torch: the replica has it, the ingress need not

    return {"uncertainty": output_uncertainty(out, score_threshold), "embedding": out.embedding}


def run_batch(
    predictor: Any,
    images: list[np.ndarray],
    want_png: list[bool] | None = None,
    score_threshold: float = 0.05,
    capture: bool = False,
) -> tuple[list[dict[str, Any]], float]:
    """Predict a batch of RGB uint8 images; returns (per-image response fields, forward seconds).

    ``capture``: each result also holds :data:`CAPTURE_KEY` (:func:`capture_signals`), which the
    caller takes off before answering.
    """
    want_png = want_png or [False] * len(images)
    outs, forward_s = predictor.predict(images, score_threshold)
    model = {"name": predictor.name, "version": predictor.version, "uri": predictor.uri}
    results = []
    for out, img, png in zip(outs, images, want_png):
        fields = _response_fields(predictor, out, img, png, score_threshold)
        if capture:
            try:
                fields[CAPTURE_KEY] = capture_signals(out, score_threshold)
            except Exception:  # noqa: BLE001 - capture never fails a prediction: no signals for this one
                logger.exception("capture signals failed; the prediction is answered without them")
                fields[CAPTURE_KEY] = {}
        results.append({**fields, "model": model, "model_version": predictor.version})
    return results, forward_s


def run_isolated(
    predictor: Any, images: list[np.ndarray], want_png: list[bool], score_threshold: float, capture: bool = False
) -> tuple[list[dict[str, Any]], float]:
    """:func:`run_batch`; if the batch fails, each image alone, so a bad image fails only itself.

    An image that fails on its own gets an error dict (``reason: internal``) in its slot.
    """
    try:
        return run_batch(predictor, images, want_png, score_threshold, capture)
    except Exception as err:  # noqa: BLE001 - find the culprit below
        if len(images) == 1:
            raise
        logger.warning(
            "a batch of %d failed (%s: %s); predicting its images one by one", len(images), type(err).__name__, err
        )
    results: list[dict[str, Any]] = []
    forward_s = 0.0
    for image, png in zip(images, want_png):
        try:
            (result,), seconds = run_batch(predictor, [image], [png], score_threshold, capture)
        except Exception as err:  # noqa: BLE001 - this image's own failure
            logger.exception("prediction failed for a %dx%d image", image.shape[1], image.shape[0])
            result, seconds = _failed(err), 0.0
        results.append(result)
        forward_s += seconds
    return results, forward_s


def _failed(err: Exception) -> dict[str, Any]:
    return {"error": f"prediction failed: {type(err).__name__}: {err}", "reason": "internal", "status": 500}


def predict_bytes(lm: Any, bodies: list[bytes], limits: ImageLimits, score_threshold: float = 0.05) -> list[dict]:
    """Decode + predict + JSON fields for a batch of request bodies (the benchmark's limit path)."""
    images = [decode_image(b, limits) for b in bodies]
    results, _ = run_batch(lm, images, None, score_threshold)
    return results


# ----------------------------------------------------------------------------- deployment


def make_capturer(capture: dict[str, Any] | None) -> Any:
    """The replica's Capturer (None when capture is disabled); the store opens lazily."""
    if not capture:
        return None
    from dataplane.capture import budget_gate, store_policy_source
    from serve_app.capture import Capturer, ray_capture_metrics

    budget = capture.get("budget")
    return Capturer(
        capture["store"],
        capture.get("policy"),
        queue_size=capture.get("queue_size", 256),
        max_retries=capture.get("max_retries", 5),
        metrics=ray_capture_metrics(),
        policy_source=store_policy_source(capture["store"]),
        policy_poll_s=capture.get("policy_poll_s", 5.0),
        budget=budget_gate(budget, capture["store"]) if budget else None,
    )


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=16, graceful_shutdown_timeout_s=30)
class SegModel:
    """Decodes, batches and predicts; ``user_config`` = :class:`ModelSettings`."""

    def __init__(
        self, limits: dict[str, int], defaults: dict[str, Any] | None = None, capture: dict[str, Any] | None = None
    ) -> None:
        self._limits = ImageLimits(**limits)
        self._defaults = defaults or {}
        self._settings: ModelSettings | None = None
        self._current: Any | None = None
        self._swap_lock = asyncio.Lock()
        self._loading: str | None = None
        self._last_error: str | None = None
        self._switches = 0
        self._poller: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._metrics = model_metrics()
        self._capturer = make_capturer(capture)

    # -- configuration and switching ---------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        merged = {**self._defaults, **{k: v for k, v in (user_config or {}).items() if v is not None}}
        settings = ModelSettings.model_validate(merged)
        previous, self._settings = self._settings, settings
        self._predict_batch.set_max_batch_size(settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        if self._current is None:
            # First model: the replica only becomes ready (and healthy) with a model loaded.
            self._current = await asyncio.to_thread(load_model, settings)
            logger.info("loaded model %s version %s", self._current.name, self._current.version)
        elif previous is None or previous.model_source() != settings.model_source():
            self._spawn(self._swap(settings, "reconfigure"))
        self._restart_poller()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swap(self, settings: ModelSettings, why: str) -> bool:
        async with self._swap_lock:
            if settings is not self._settings and settings.model_source() != self._settings.model_source():
                return False  # superseded by a newer config while waiting
            self._loading = settings.model_uri
            try:
                new = await asyncio.to_thread(load_model, settings)
            except Exception as err:  # noqa: BLE001 - keep serving the old model
                self._last_error = f"{type(err).__name__}: {err}"
                logger.error(
                    "loading %s (%s) failed, still serving %s: %s",
                    settings.model_uri,
                    why,
                    self._current.version if self._current else None,
                    self._last_error,
                )
                return False
            finally:
                self._loading = None
            old, self._current = self._current, new  # the swap: one reference, between batches
            self._last_error = None
            self._switches += 1
            logger.info("switched model (%s): %s -> %s", why, old.version if old else None, new.version)
            return True

    def _restart_poller(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        s = self._settings
        if s is not None and s.poll_interval_s > 0 and s.alias is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(s))

    async def _poll(self, settings: ModelSettings) -> None:
        while True:
            await asyncio.sleep(settings.poll_interval_s)
            try:
                version = await asyncio.to_thread(resolve_registry_version, settings)
            except Exception as err:  # noqa: BLE001 - registry unreachable: keep serving, try again later
                logger.warning("cannot resolve %s: %s", settings.model_uri, err)
                continue
            current = self._current
            if current is not None and version != current.version and self._loading is None:
                logger.info("%s now points at version %s (serving %s)", settings.model_uri, version, current.version)
                await self._swap(settings, f"alias moved to {version}")

    # -- requests -----------------------------------------------------------------------

    async def predict(self, body: bytes, want_png: bool = False) -> dict[str, Any]:
        """Decode (off the event loop), batch, predict. Errors come back as dicts, not exceptions."""
        t0 = time.perf_counter()
        try:
            image = await asyncio.get_running_loop().run_in_executor(None, decode_image, body, self._limits)
        except ImageRejected as err:
            return {**err.to_json(), "status": err.status}
        decode_s = time.perf_counter() - t0
        try:
            result = await self._predict_batch(image, want_png)
        except Exception as err:  # noqa: BLE001 - a model failure answers 500, the replica stays up
            logger.exception("prediction failed")
            return _failed(err)
        if "reason" in result:
            return result
        result["timings_ms"]["decode"] = round(decode_s * 1000, 3)
        signals = result.pop(CAPTURE_KEY, None)  # capture metadata only, never the response
        self._capture(body, result, signals)
        return result

    def _capture(self, image_bytes: bytes, result: dict[str, Any], signals: dict[str, Any] | None) -> None:
        """Active-learning capture: never blocks or raises (bounded queue, background writer).

        ``signals`` None: the batch ran while capture was off. If the policy came on meanwhile,
        the image is not offered: a record without its statistics and embedding would be ranked
        by entropy alone and refused by kcenter/badge. (While it stays off, the offer counts it
        as skipped, as before.)
        """
        if self._capturer is None or (signals is None and self._capturer.policy.mode != "off"):
            return
        self._capturer.offer(image_bytes, None, {**result, **(signals or {})})

    def __del__(self) -> None:
        if getattr(self, "_capturer", None) is not None:
            self._capturer.close(timeout=5)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, images: list[np.ndarray], want_png: list[bool]) -> list[dict[str, Any]]:
        lm = self._current  # read once: a swap during this batch does not affect it
        if lm is None:
            raise RuntimeError("no model loaded")
        threshold = self._settings.score_threshold if self._settings else 0.05
        t0 = time.perf_counter()
        capture = self._capturer is not None and self._capturer.policy.mode != "off"
        results, forward_s = await asyncio.to_thread(run_isolated, lm, list(images), list(want_png), threshold, capture)
        total_s = time.perf_counter() - t0
        self._metrics.batch(lm.version, len(images), forward_s)
        for r in results:
            if "reason" in r:
                continue
            self._metrics.image(lm.version, r["confidence"], r["entropy"])
            r["timings_ms"] = {
                "model": round(forward_s * 1000, 3),
                "batch": round(total_s * 1000, 3),
                "batch_size": len(images),
            }
        return results

    # -- introspection ---------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        lm = self._current
        data = lm.info() if lm is not None else {"version": None}
        data.update(
            {
                "ready": lm is not None,
                "loading": self._loading,
                "last_error": self._last_error,
                "switches": self._switches,
                "follows": self._settings.model_uri if self._settings else None,
                "poll_interval_s": self._settings.poll_interval_s if self._settings else None,
                "max_batch_size": self._settings.max_batch_size if self._settings else None,
                "pid": os.getpid(),
                "capture": self._capturer.stats() if self._capturer is not None else None,
            }
        )
        try:
            data["replica"] = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside Serve (tests)
            data["replica"] = None
        return data

    def check_health(self) -> None:
        """Serve's periodic replica health check: unhealthy without a model."""
        if self._current is None:
            raise RuntimeError("no model loaded")
