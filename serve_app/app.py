"""The FastAPI ingress and the typed application builder.

``serve run serve_config.yaml`` / ``serve deploy serve_config.yaml`` / ``segloop serve deploy``
call :func:`build_app` (``serve_app.app:build_app``) with the validated :class:`AppArgs`. The
control plane (``monitoring.serving``) deploys the app declaratively and switches its model in
place through Serve's API; it never imports this package.

Endpoints: ``POST /predict`` (raw image body or multipart field ``file``; JSON, or the mask
PNG with ``Accept: image/png``), ``GET /healthz``, ``GET /model``.
"""

# No ``from __future__ import annotations`` here: Serve reads build_app's annotation as a
# class to validate ``args`` with, and a string annotation would skip that.

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from segloop.settings import require_shared_services, store_config, store_config_dict
from serve_app.config import AppArgs
from serve_app.imaging import STATUS, ImageLimits, ImageRejected, check_body_size, multipart_file
from serve_app.metrics import ingress_metrics
from serve_app.model import SegModel

logger = logging.getLogger("ray.serve")

INGRESS_DEPLOYMENT = "SegIngress"

api = FastAPI(title="segloop", description="Image segmentation served by Ray Serve", docs_url="/docs")


async def _await(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (for asyncio.wait_for)."""
    return await response


def _json(data: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(
        json.dumps(data, separators=(",", ":")), status_code=status, media_type="application/json", headers=headers
    )


def _error(reason: str, message: str, status: Optional[int] = None, headers: Optional[dict] = None) -> Response:
    return _json({"error": message, "reason": reason}, status or STATUS[reason], headers)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(api)
class SegIngress:
    """HTTP front: auth, body limits, multipart, error mapping, request metrics."""

    def __init__(self, model: DeploymentHandle, options: dict[str, Any]) -> None:
        self._model = model
        self._limits = ImageLimits(options["max_body_bytes"], options["max_pixels"])
        self._timeout_s = float(options.get("request_timeout_s", 60))
        env = options.get("auth_token_env")
        if env and not os.environ.get(env):
            raise RuntimeError(f"auth_token_env {env!r} is set but the variable is empty in the replica's environment")
        self._token = (os.environ.get(env) if env else options.get("auth_token")) or None
        self._metrics = ingress_metrics()
        self._version = "none"  # last version seen, tags errors that never reached a model
        self._task = "unknown"

    # -- helpers ------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token.encode())

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limits.max_bytes:
            raise ImageRejected(
                "body_too_large",
                f"the request body has {length} bytes, more than the limit of {self._limits.max_bytes} bytes",
            )
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self._limits.max_bytes:
                raise ImageRejected(
                    "body_too_large", f"the request body exceeds the limit of {self._limits.max_bytes} bytes"
                )
            chunks.append(chunk)
        body = b"".join(chunks)
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            body = await asyncio.to_thread(multipart_file, body, content_type, "file")
        check_body_size(len(body), self._limits)
        return body

    def _reject(
        self, reason: str, message: str, status: Optional[int] = None, headers: Optional[dict] = None
    ) -> Response:
        """Every failed /predict answer: the metrics get the HTTP status the client gets."""
        code = status or STATUS[reason]
        self._metrics.rejected(reason, code, self._version, self._task)
        return _error(reason, message, code, headers)

    # -- endpoints ----------------------------------------------------------------------------

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        if not self._authorized(request):
            return self._reject("unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await self._read_body(request)
        except ImageRejected as err:
            return self._reject(err.reason, err.message)
        want_png = "image/png" in request.headers.get("accept", "")
        response = self._model.predict.remote(body, want_png)
        try:
            result = await asyncio.wait_for(_await(response), timeout=self._timeout_s)
        except TimeoutError:
            response.cancel()
            return self._reject("overloaded", f"the model did not answer within {self._timeout_s}s", status=504)
        except Exception as err:  # noqa: BLE001 - map every failure to a JSON error
            from ray.serve.exceptions import BackPressureError

            if isinstance(err, BackPressureError) or "BackPressureError" in type(err).__name__:
                return self._reject("overloaded", "the model queue is full, retry later", headers={"Retry-After": "1"})
            logger.exception("model call failed")
            return self._reject("internal", f"internal error: {type(err).__name__}")
        if "reason" in result:
            return self._reject(result["reason"], result["error"], result.get("status"))
        version, task = result["model_version"], result["task"]
        self._version, self._task = version, task
        elapsed = time.perf_counter() - t0
        self._metrics.ok(version, task, elapsed)
        headers = {"X-Model-Name": result["model"]["name"], "X-Model-Version": version}
        png = result.pop("mask_png", None)
        if png is not None:
            return Response(png, media_type="image/png", headers=headers)
        result["timings_ms"]["total"] = round(elapsed * 1000, 3)
        return _json(result, headers=headers)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        try:
            info = await asyncio.wait_for(_await(self._model.info.remote()), timeout=10)
        except Exception as err:  # noqa: BLE001
            return _json({"status": "unavailable", "error": f"{type(err).__name__}: {err}"}, 503)
        if not info.get("ready"):
            return _json({"status": "loading"}, 503)
        return _json({"status": "ok", "model_version": info["version"]})

    @api.get("/model")
    async def model(self) -> Response:
        try:
            info = await asyncio.wait_for(_await(self._model.info.remote()), timeout=10)
        except Exception as err:  # noqa: BLE001
            return _error("internal", f"model deployment unavailable: {type(err).__name__}: {err}", 503)
        return _json(info)


# ----------------------------------------------------------------------------- builder


def check_shared(args: AppArgs, settings: Any) -> None:
    """On a multi-node cluster, replicas on other machines must find the model and the store."""
    from dataplane.store import StoreConfig

    capture, store = args.capture, None
    if capture is not None:  # the policy in the store can switch capture on at any time
        store = StoreConfig.model_validate(capture.store) if capture.store else store_config(args.data_dir)
    require_shared_services(store=store, tracking=settings.mlflow_tracking_uri, what="serving")


def build_app(args: AppArgs) -> Application:
    """Typed application builder (``import_path: serve_app.app:build_app``)."""
    if isinstance(args, dict):  # called directly from Python with a dict
        args = AppArgs.model_validate(args)
    settings = args.resolved_model_settings()
    check_shared(args, settings)
    model_options: dict[str, Any] = {
        "user_config": settings.model_dump(mode="json"),
        "max_ongoing_requests": args.model_max_ongoing_requests,
        "max_queued_requests": args.model_max_queued_requests,
        "ray_actor_options": {"num_cpus": args.model_num_cpus, "num_gpus": args.model_num_gpus},
    }
    if args.model_num_replicas is not None:
        model_options["num_replicas"] = args.model_num_replicas
    else:
        model_options["autoscaling_config"] = args.model_autoscaling.model_dump()
    defaults = {"mlflow_tracking_uri": settings.mlflow_tracking_uri}
    limits = {"max_bytes": args.max_body_bytes, "max_pixels": args.max_pixels}
    capture = args.capture.model_dump(mode="json") if args.capture else None
    if capture and capture["store"] is None:
        capture["store"] = store_config_dict(args.data_dir)
    model = SegModel.options(**model_options).bind(limits, defaults, capture)
    ingress_options = {
        "max_body_bytes": args.max_body_bytes,
        "max_pixels": args.max_pixels,
        "request_timeout_s": args.request_timeout_s,
        "auth_token_env": args.auth_token_env,
        "auth_token": args.auth_token,
    }
    return SegIngress.options(
        num_replicas=args.ingress_num_replicas,
        max_ongoing_requests=args.ingress_max_ongoing_requests,
        max_queued_requests=args.ingress_max_queued_requests,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
    ).bind(model, ingress_options)
