"""The FastAPI ingress and the typed application builder.

``serve run serve_config.yaml`` / ``serve deploy serve_config.yaml`` / ``segloop serve deploy``
call :func:`build_app` (``serve_app.app:build_app``) with the validated :class:`AppArgs`. The
control plane (``monitoring.serving``) deploys the app declaratively and switches its model in
place through Serve's API; it never imports this package.

Endpoints: ``POST /predict`` (raw image body or multipart field ``file``; JSON, or the mask
PNG with ``Accept: image/png``), ``GET /healthz``, ``GET /model``.

Two topologies share one HTTP front (:class:`_Front`): *split* (``SegIngress`` calls the
``SegModel`` deployment by handle, so a request whose model replica died is sent again) and
*fused* (``SegServer``: HTTP and model in one replica, no actor call per request). Either runs
behind Ray's Python proxy or, with ``segloop.settings.SERVE_FAST_PATH_ENV`` set where Ray
starts, behind HAProxy with each replica serving HTTP itself (direct ingress).
"""

# No ``from __future__ import annotations`` here: Serve reads build_app's annotation as a
# class to validate ``args`` with, and a string annotation would skip that.

import asyncio
import hmac
import json
import logging
import os
import time
from types import SimpleNamespace
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from segloop.settings import require_shared_services, require_token_off_loopback, store_config, store_config_dict
from serve_app.body import BodyLimits, read_body
from serve_app.config import AppArgs
from serve_app.imaging import STATUS, ImageLimits, ImageRejected, check_body_size
from serve_app.metrics import ingress_metrics
from serve_app.model import MODEL_DEPLOYMENT, SegModel

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


RETRY_AFTER = {"Retry-After": "1"}


def _is_backpressure(err: Exception) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(err, BackPressureError) or "BackPressureError" in type(err).__name__


def _http_host() -> Optional[str]:
    """The address Serve's HTTP entry (proxy or HAProxy, and direct-ingress replicas) binds."""
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - no controller (unit use): nothing listens
        return None


def _replica_died(err: Exception) -> bool:
    """The replica's process is gone (not the model raising): safe to send the request again."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(err, (RayActorError, ActorUnavailableError))


class _LocalHandle:
    """The model object in this process behind the ``handle.method.remote(...)`` interface, so one
    HTTP front serves both topologies (a task stands in for the DeploymentResponse)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        return SimpleNamespace(remote=lambda *args: asyncio.ensure_future(method(*args)))


class _Front:
    """HTTP front: auth, admission, body limits, multipart, error mapping, request metrics."""

    def __init__(self, model: DeploymentHandle | _LocalHandle, options: dict[str, Any]) -> None:
        self._model = model
        self._max_inflight = int(options.get("max_inflight", 256))
        self._inflight = 0
        self._limits = ImageLimits(options["max_body_bytes"], options["max_pixels"])
        self._timeout_s = float(options.get("request_timeout_s", 60))
        self._body_limits = BodyLimits(
            max_bytes=options["max_body_bytes"],
            read_timeout_s=float(options.get("body_timeout_s", 30)),
            drain_bytes=max(int(options.get("drain_body_bytes", 128 * 2**20)), options["max_body_bytes"]),
        )
        env = options.get("auth_token_env")
        if env and not os.environ.get(env):
            raise RuntimeError(f"auth_token_env {env!r} is set but the variable is empty in the replica's environment")
        self._token = (os.environ.get(env) if env else options.get("auth_token")) or None
        require_token_off_loopback(_http_host(), self._token is not None)
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
        headers = request.headers
        body = await read_body(
            request.stream(), headers.get("content-type", ""), headers.get("content-length"), self._body_limits
        )
        check_body_size(len(body), self._limits)
        return body

    async def _call_model(self, body: bytes, want_png: bool) -> dict | Response:
        """The model's answer, or the JSON error to send.

        ``/predict`` is idempotent, so a request whose model replica died under it (a crash, a
        ``kill -9``, a lost node) is sent once more; the router has then dropped that replica.
        """
        deadline = time.monotonic() + self._timeout_s
        for attempt in (1, 2):
            response = self._model.predict.remote(body, want_png)
            try:
                return await asyncio.wait_for(_await(response), timeout=max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                response.cancel()
                return self._reject("overloaded", f"the model did not answer within {self._timeout_s:g} s", status=504)
            except Exception as err:  # noqa: BLE001 - map every failure to a JSON error
                if _is_backpressure(err):
                    return self._reject("overloaded", "the model queue is full, retry later", headers=RETRY_AFTER)
                if not _replica_died(err):
                    logger.exception("model call failed")
                    return self._reject("internal", f"internal error: {type(err).__name__}")
                if attempt == 1:
                    logger.warning("a model replica died under a request (%s); sending it again", type(err).__name__)
        return self._reject(
            "model_unavailable", "no model replica could answer (one died); retry shortly", headers=RETRY_AFTER
        )

    def _reject(
        self, reason: str, message: str, status: Optional[int] = None, headers: Optional[dict] = None
    ) -> Response:
        """Every failed /predict answer: the metrics get the HTTP status the client gets."""
        code = status or STATUS[reason]
        self._metrics.rejected(reason, code, self._version, self._task)
        return _error(reason, message, code, headers)

    # -- endpoints ----------------------------------------------------------------------------

    async def _predict(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._reject("unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        if self._inflight >= self._max_inflight:  # before the body is read: bounded memory and queue
            return self._reject("overloaded", "too many requests in flight, retry later", headers=RETRY_AFTER)
        self._inflight += 1
        try:
            return await self._answer(request)
        finally:
            self._inflight -= 1

    async def _answer(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await self._read_body(request)
        except ImageRejected as err:
            return self._reject(err.reason, err.message)
        want_png = "image/png" in request.headers.get("accept", "")
        result = await self._call_model(body, want_png)
        if isinstance(result, Response):
            return result
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

    async def _healthz(self) -> Response:
        try:
            info = await asyncio.wait_for(_await(self._model.info.remote()), timeout=10)
        except Exception as err:  # noqa: BLE001
            return _json({"status": "unavailable", "error": f"{type(err).__name__}: {err}"}, 503)
        if not info.get("ready"):
            return _json({"status": "loading"}, 503)
        return _json({"status": "ok", "model_version": info["version"]})

    async def _model_info(self) -> Response:
        try:
            info = await asyncio.wait_for(_await(self._model.info.remote()), timeout=10)
        except Exception as err:  # noqa: BLE001
            return _error("internal", f"model deployment unavailable: {type(err).__name__}: {err}", 503)
        return _json(info)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=512)
@serve.ingress(api)
class SegIngress(_Front):
    """The split topology's HTTP deployment: it calls the ``SegModel`` deployment by handle."""

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        return await self._predict(request)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return await self._healthz()

    @api.get("/model")
    async def model(self) -> Response:
        return await self._model_info()


fused_api = FastAPI(title="segloop", description="Image segmentation served by Ray Serve", docs_url="/docs")


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=512, graceful_shutdown_timeout_s=30)
@serve.ingress(fused_api)
class SegServer(_Front):
    """The fused topology: HTTP and the model in one replica, no actor hop per request.

    Named like the model deployment, so ``user_config`` swaps, ``/model`` and the control
    plane's handle calls (``info``) reach it the same way.
    """

    def __init__(
        self, limits: dict[str, int], defaults: dict[str, Any], capture: dict[str, Any] | None, options: dict
    ) -> None:
        self._impl = SegModel.func_or_class(limits, defaults, capture)
        super().__init__(_LocalHandle(self._impl), options)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self._impl.reconfigure(user_config)

    def check_health(self) -> None:
        self._impl.check_health()

    async def info(self) -> dict[str, Any]:
        return await self._impl.info()

    @fused_api.post("/predict")
    async def predict(self, request: Request) -> Response:
        return await self._predict(request)

    @fused_api.get("/healthz")
    async def healthz(self) -> Response:
        return await self._healthz()

    @fused_api.get("/model")
    async def model(self) -> Response:
        return await self._model_info()


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
    front = {
        "max_body_bytes": args.max_body_bytes,
        "max_pixels": args.max_pixels,
        "request_timeout_s": args.request_timeout_s,
        "body_timeout_s": args.body_timeout_s,
        "drain_body_bytes": args.drain_body_bytes,
        "auth_token_env": args.auth_token_env,
        "auth_token": args.auth_token,
    }
    if args.topology == "fused":
        # The replica admits what the split model deployment would hold: in progress + queued.
        admit = args.ingress_max_ongoing_requests
        if args.model_max_queued_requests >= 0:
            admit = args.model_max_ongoing_requests + args.model_max_queued_requests
        model_options.update(max_ongoing_requests=admit + 16, max_queued_requests=-1)  # Serve never refuses first
        return SegServer.options(**model_options).bind(limits, defaults, capture, {**front, "max_inflight": admit})
    model = SegModel.options(**model_options).bind(limits, defaults, capture)
    return SegIngress.options(
        num_replicas=args.ingress_num_replicas,
        max_ongoing_requests=args.ingress_max_ongoing_requests + 16,
        max_queued_requests=args.ingress_max_queued_requests,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
    ).bind(model, {**front, "max_inflight": args.ingress_max_ongoing_requests})
