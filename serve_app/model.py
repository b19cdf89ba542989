"""The model deployment: loads a segloop model, batches requests, hot-swaps versions.

Inference core (``load_model`` / ``run_batch``) is plain Python so the benchmark's Flask
server and in-process loop run exactly the same code as the replicas.

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

The capture hook for active learning is :meth:`SegModel._capture` (a no-op here).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray import serve

from serve_app.config import ModelSettings, parse_model_uri
from serve_app.imaging import ImageLimits, ImageRejected, decode_image
from serve_app.metrics import model_metrics
from serve_app.postprocess import encode_png, instance_fields, instance_label_mask, semantic_fields

logger = logging.getLogger("ray.serve")

MODEL_DEPLOYMENT = "SegModel"


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A ready model plus what serving needs to feed and describe it."""

    model: Any  # torch.nn.Module in eval mode on ``device``
    meta: Any  # train.registry.ModelMeta
    name: str
    version: str
    uri: str
    device: str
    half: bool
    channels_last: bool = False
    loaded_at: float = field(default_factory=time.time)
    transforms: Any = None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "task": self.meta.task,
            "architecture": self.meta.model,
            "class_names": list(self.meta.class_names),
            "num_classes": int(self.meta.num_classes),
            "image_size": int(self.meta.image_size),
            "device": self.device,
            "half": self.half,
            "channels_last": self.channels_last,
            "loaded_at": self.loaded_at,
        }


def pick_device(pref: str) -> str:
    import torch

    if pref == "cuda" and not torch.cuda.is_available():
        from train.errors import ConfigError

        raise ConfigError("device 'cuda' requested but no GPU is visible to this replica (set ray_actor_options.num_gpus)")
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return pref


def set_tracking_uri(uri: str | None) -> None:
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)


def resolve_registry_version(settings: ModelSettings) -> str:
    """The version a registry URI points at now (alias resolved)."""
    from train.registry import resolve_version

    kind, name, ref = parse_model_uri(settings.model_uri)
    if kind != "registry":
        raise ValueError(f"{settings.model_uri} is not a registry URI")
    set_tracking_uri(settings.mlflow_tracking_uri)
    return resolve_version(name, ref)


def _load_checkpoint(path: str, settings: ModelSettings) -> tuple[Any, Any, str, str]:
    import torch

    from train.errors import ModelError
    from train.models import build_model, model_task
    from train.registry import ModelMeta

    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path} does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    cfg = obj.get("config", {}) if isinstance(obj, dict) else {}
    model_name = settings.model_name or cfg.get("model")
    class_names = settings.class_names or (obj.get("class_names") if isinstance(obj, dict) else None)
    image_size = settings.image_size or cfg.get("image_size")
    missing = [k for k, v in (("model_name", model_name), ("class_names", class_names), ("image_size", image_size)) if not v]
    if missing:
        raise ModelError(f"checkpoint {path} records no {missing}; set them in the model settings")
    num_classes = int(obj.get("num_classes") or len(class_names)) if isinstance(obj, dict) else len(class_names)
    meta = ModelMeta(
        model=model_name,
        task=settings.task or cfg.get("task") or model_task(model_name),
        num_classes=num_classes,
        class_names=list(class_names),
        image_size=int(image_size),
        model_kwargs=dict(settings.model_kwargs or cfg.get("model_kwargs") or {}),
    )
    model = build_model(meta.model, meta.num_classes, checkpoint=path, **meta.model_kwargs).eval()
    return model, meta, os.path.basename(path), "ckpt-" + digest.hexdigest()[:12]


def load_model(settings: ModelSettings) -> LoadedModel:
    """Build the model ``settings.model_uri`` names (weights_only loads, no pickled code)."""
    from train.transforms import eval_transforms

    kind, target, ref = parse_model_uri(settings.model_uri)
    if kind == "registry":
        from train.registry import load_version

        set_tracking_uri(settings.mlflow_tracking_uri)
        model, meta, version = load_version(target, ref)
        name = target
    else:
        model, meta, name, version = _load_checkpoint(target, settings)
    device = pick_device(settings.device)
    half = bool(settings.half and device == "cuda")
    model = model.to(device).eval()
    channels_last = bool(settings.channels_last and meta.task == "semantic")
    if channels_last:  # same weights and results; ~1.5x faster on 2 CPU threads (bench/serve.py)
        import torch

        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(
        model=model, meta=meta, name=name, version=str(version), uri=settings.model_uri, device=device, half=half,
        channels_last=channels_last, transforms=eval_transforms(meta.task, meta.image_size),
    )


# ----------------------------------------------------------------------------- inference


def _autocast(lm: LoadedModel):
    import contextlib

    import torch

    if lm.half:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _chw(img: np.ndarray) -> Any:
    """HWC uint8 array -> CHW tensor (arrays that came through Ray's object store are read-only)."""
    import torch

    return torch.from_numpy(img if img.flags.writeable else img.copy()).permute(2, 0, 1)


def _semantic_batch(lm: LoadedModel, images: list[np.ndarray], want_png: list[bool]) -> tuple[list[dict], float]:
    import torch
    import torch.nn.functional as F

    from train.metrics.semantic import class_indices

    xs = [lm.transforms(_chw(img), None)[0] for img in images]
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = torch.stack(xs).to(lm.device, non_blocking=True)
        if lm.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(lm):
            logits = lm.model(x)
        logits = logits.float()
        probs = logits.softmax(1).cpu().numpy()
        masks = []
        for i, img in enumerate(images):  # one at a time: full-size logits of a batch can be large
            up = F.interpolate(logits[i : i + 1], size=img.shape[:2], mode="bilinear", align_corners=False)
            masks.append(class_indices(up)[0].to(torch.uint8).cpu().numpy())
    forward_s = time.perf_counter() - t0
    out = []
    for mask, p, png in zip(masks, probs, want_png):
        fields = semantic_fields(mask, p, lm.meta.class_names, want_png_b64=not png)
        if png:
            fields["mask_png"] = encode_png(mask)
        out.append(fields)
    return out, forward_s


def _instance_batch(
    lm: LoadedModel, images: list[np.ndarray], want_png: list[bool], score_threshold: float
) -> tuple[list[dict], float]:
    import torch

    xs = [lm.transforms(_chw(img), None)[0] for img in images]
    # Same-size images go through the model together; mixing sizes would pad the smaller ones
    # and change their results, and a response must not depend on its batch neighbours.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(tuple(x.shape), []).append(i)
    preds: list[dict | None] = [None] * len(xs)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in groups.values():
            with _autocast(lm):
                outs = lm.model([xs[i].to(lm.device, non_blocking=True) for i in idx])
            for i, o in zip(idx, outs):
                keep = o["scores"] >= score_threshold
                preds[i] = {k: o[k][keep].float().cpu().numpy() if k != "labels" else o[k][keep].cpu().numpy() for k in ("boxes", "labels", "scores", "masks")}
    forward_s = time.perf_counter() - t0
    out = []
    for img, p, png in zip(images, preds, want_png):
        shape = img.shape[:2]
        fields = instance_fields(p, lm.meta.class_names, shape, score_threshold)
        if png:
            fields["mask_png"] = encode_png(instance_label_mask(p["masks"], p["scores"], shape))
        out.append(fields)
    return out, forward_s


def run_batch(
    lm: LoadedModel, images: list[np.ndarray], want_png: list[bool] | None = None, score_threshold: float = 0.05
) -> tuple[list[dict[str, Any]], float]:
    """Predict a batch of RGB uint8 images; returns (per-image response fields, forward seconds).

    Preprocessing is the training eval transform (``eval_transforms(task, image_size)``);
    semantic logits are upsampled back to each image's size before the argmax.
    """
    want_png = want_png or [False] * len(images)
    if lm.meta.task == "semantic":
        results, forward_s = _semantic_batch(lm, images, want_png)
    else:
        results, forward_s = _instance_batch(lm, images, want_png, score_threshold)
    for r in results:
        r["model"] = {"name": lm.name, "version": lm.version, "uri": lm.uri}
        r["model_version"] = lm.version
    return results, forward_s


def predict_bytes(lm: LoadedModel, bodies: list[bytes], limits: ImageLimits, score_threshold: float = 0.05) -> list[dict]:
    """Decode + predict + JSON fields for a batch of request bodies (the benchmark's limit path)."""
    images = [decode_image(b, limits) for b in bodies]
    results, _ = run_batch(lm, images, None, score_threshold)
    return results


# ----------------------------------------------------------------------------- deployment


def make_capturer(capture: dict[str, Any] | None) -> Any:
    """The replica's Capturer (None when capture is disabled); the store opens lazily."""
    if not capture:
        return None
    from serve_app.capture import Capturer, ray_capture_metrics, store_policy_source

    return Capturer(capture["store"], capture.get("policy"), queue_size=capture.get("queue_size", 256),
                    max_retries=capture.get("max_retries", 5), metrics=ray_capture_metrics(),
                    policy_source=store_policy_source(capture["store"]),
                    policy_poll_s=capture.get("policy_poll_s", 5.0))


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=16, graceful_shutdown_timeout_s=30)
class SegModel:
    """Decodes, batches and predicts; ``user_config`` = :class:`ModelSettings`."""

    def __init__(self, limits: dict[str, int], defaults: dict[str, Any] | None = None,
                 capture: dict[str, Any] | None = None) -> None:
        self._limits = ImageLimits(**limits)
        self._defaults = defaults or {}
        self._settings: ModelSettings | None = None
        self._current: LoadedModel | None = None
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
            except Exception as err:  # keep serving the old model
                self._last_error = f"{type(err).__name__}: {err}"
                logger.error("loading %s (%s) failed, still serving %s: %s", settings.model_uri, why,
                             self._current.version if self._current else None, self._last_error)
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
            except Exception as err:  # registry unreachable: keep serving, try again later
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
            return {"error": f"prediction failed: {type(err).__name__}: {err}", "reason": "internal", "status": 500}
        result["timings_ms"]["decode"] = round(decode_s * 1000, 3)
        self._capture(body, result)
        return result

    def _capture(self, image_bytes: bytes, result: dict[str, Any]) -> None:
        """Active-learning capture: never blocks or raises (bounded queue, background writer)."""
        if self._capturer is not None:
            self._capturer.offer(image_bytes, None, result)

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
        results, forward_s = await asyncio.to_thread(run_batch, lm, list(images), list(want_png), threshold)
        total_s = time.perf_counter() - t0
        self._metrics.batch(lm.version, len(images), forward_s)
        for r in results:
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
        data.update({
            "ready": lm is not None,
            "loading": self._loading,
            "last_error": self._last_error,
            "switches": self._switches,
            "follows": self._settings.model_uri if self._settings else None,
            "poll_interval_s": self._settings.poll_interval_s if self._settings else None,
            "max_batch_size": self._settings.max_batch_size if self._settings else None,
            "pid": os.getpid(),
            "capture": self._capturer.stats() if self._capturer is not None else None,
        })
        try:
            data["replica"] = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside Serve (tests)
            data["replica"] = None
        return data

    def check_health(self) -> None:
        """Serve's periodic replica health check: unhealthy without a model."""
        if self._current is None:
            raise RuntimeError("no model loaded")
