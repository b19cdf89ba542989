"""The FastAPI ingress, the typed application builder and model switching.

``serve run serve_config.yaml`` / ``serve deploy serve_config.yaml`` call
:func:`build_app` with the validated :class:`AppArgs`. From Python, :func:`deploy` does the
same declaratively (so later ``user_config`` changes are applied in place), and
:func:`switch_model` moves a running app to another model version without restarting a
replica or failing a request. Setting the ``champion`` alias in MLflow needs no call at all
when replicas follow it (``poll_interval_s > 0``).

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
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve_app.config import APP_NAME, AppArgs, ModelSettings
from serve_app.imaging import STATUS, ImageLimits, ImageRejected, check_body_size, multipart_file
from serve_app.metrics import ingress_metrics
from serve_app.model import MODEL_DEPLOYMENT, SegModel

logger = logging.getLogger("ray.serve")

INGRESS_DEPLOYMENT = "SegIngress"
IMPORT_PATH = "serve_app.app:build_app"

api = FastAPI(title="segloop", description="Image segmentation served by Ray Serve", docs_url="/docs")


async def _await(response: Any) -> Any:
    """A DeploymentResponse as a coroutine (for asyncio.wait_for)."""
    return await response


def _json(data: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status_code=status, media_type="application/json", headers=headers)


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
            raise ImageRejected("body_too_large", f"the request body has {length} bytes, more than the limit of {self._limits.max_bytes} bytes")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self._limits.max_bytes:
                raise ImageRejected("body_too_large", f"the request body exceeds the limit of {self._limits.max_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            body = await asyncio.to_thread(multipart_file, body, content_type, "file")
        check_body_size(len(body), self._limits)
        return body

    def _reject(self, reason: str, message: str, status: Optional[int] = None, headers: Optional[dict] = None) -> Response:
        self._metrics.rejected(reason, self._version, self._task)
        return _error(reason, message, status, headers)

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
        except asyncio.TimeoutError:
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


def build_app(args: AppArgs) -> Application:
    """Typed application builder (``import_path: serve_app.app:build_app``)."""
    if isinstance(args, dict):  # called directly from Python with a dict
        args = AppArgs.model_validate(args)
    settings = args.resolved_model_settings()
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


# ----------------------------------------------------------------------------- deploy & switch


def store_config_dict(data_dir: Optional[str]) -> dict[str, Any]:
    """The object store replicas capture into: SEGLOOP_STORE, else ``<data_dir>/store``."""
    from train.store import store_config_from_url

    url = os.environ.get("SEGLOOP_STORE") or str(Path(data_dir or ".segloop").resolve() / "store")
    return store_config_from_url(url).model_dump(mode="json")


def set_capture_policy(policy: dict[str, Any], store: Any = None, data_dir: Optional[str] = None) -> dict[str, Any]:
    """Switch capture at run time: publish the policy where every replica polls it (no redeploy)."""
    from serve_app.capture import write_policy
    from train.store import open_store

    store = store if store is not None else open_store(store_config_dict(data_dir))
    return write_policy(store, policy).model_dump(mode="json")


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def app_config(args: AppArgs, name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """The application entry of a Serve config file for these args (what serve_config.yaml holds).

    The model settings go in the ``SegModel`` deployment's ``user_config`` override, the one
    field Serve updates in place (``args`` changes rebuild the app and restart replicas).
    """
    if args.data_dir:  # the builder runs in another process with another cwd
        args = args.model_copy(update={"data_dir": os.path.abspath(args.data_dir)})
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json", exclude={"model"}),
        "deployments": [{"name": MODEL_DEPLOYMENT, "user_config": args.resolved_model_settings().model_dump(mode="json")}],
    }


def _declarative_apps(details: Any) -> list[dict[str, Any]]:
    from ray.serve.schema import APIType

    apps = []
    for app in details.applications.values():
        if app.source == APIType.DECLARATIVE and app.deployed_app_config is not None:
            apps.append(app.deployed_app_config.model_dump(exclude_unset=True))
    return apps


def _apply(applications: list[dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    _client().deploy_apps(ServeDeploySchema.model_validate({"applications": applications}))


def _details():
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_client().get_serve_details())


def deploy(
    args: AppArgs,
    name: str = APP_NAME,
    route_prefix: str = "/",
    http_options: Optional[dict[str, Any]] = None,
    timeout_s: float = 180,
    wait: bool = True,
    runtime_env: Optional[dict[str, Any]] = None,
) -> None:
    """Deploy (or update) the app declaratively, as ``serve deploy`` would, and wait until it
    runs (``wait=False``: return at once, then :func:`wait_running`).

    Other declaratively deployed apps are kept. Serve is started first if needed
    (HTTP on 127.0.0.1:8000 unless ``http_options`` say otherwise).
    """
    serve.start(http_options=http_options or {"host": "127.0.0.1", "port": 8000})
    entry = app_config(args, name, route_prefix)
    if runtime_env:  # e.g. {"env_vars": {...}}: credentials for the replicas, never in args
        entry["runtime_env"] = runtime_env
    apps = [a for a in _declarative_apps(_details()) if a["name"] != name] + [entry]
    _apply(apps)
    if wait:
        wait_running(name, timeout_s)


def wait_running(name: str, timeout_s: float = 180) -> None:
    """Block until Serve reports application ``name`` RUNNING (raises if it failed)."""
    deadline = time.time() + timeout_s
    while True:
        details = _details()
        app = details.applications.get(name)
        status = app.status.value if app is not None else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline:
            message = app.message if app is not None else ""
            raise RuntimeError(f"Serve application {name!r} is {status}: {message}")
        time.sleep(0.5)


def switch_model(
    model_uri: str,
    app_name: str = APP_NAME,
    *,
    wait: bool = True,
    timeout_s: float = 120,
    expected_version: Optional[str] = None,
) -> str:
    """Point a running app at ``model_uri`` (``models:/NAME/7``, ``models:/NAME@champion``,
    ``checkpoint:/x.pt``) in place: the new ``user_config`` reaches every replica through
    ``reconfigure``, which loads the model beside the old one and swaps between batches.
    No replica restarts, no request fails. Returns the version now served.

    Needs an app deployed declaratively (:func:`deploy`, ``serve deploy``, ``serve run
    config.yaml``); an app started with ``serve.run(build_app(...))`` can only follow an
    alias (``poll_interval_s``).
    """
    details = _details()
    app = details.applications.get(app_name)
    if app is None:
        raise ValueError(f"no Serve application named {app_name!r} (running: {sorted(details.applications)})")
    if app.deployed_app_config is None:
        raise ValueError(
            f"application {app_name!r} was started with serve.run(); deploy it with serve_app.app.deploy() or "
            "`serve deploy serve_config.yaml` to switch models in place, or let it follow an alias"
        )
    current = app.deployments[MODEL_DEPLOYMENT].deployment_config.user_config or {}
    settings = ModelSettings.model_validate({**current, "model_uri": model_uri})
    entry = app.deployed_app_config.model_dump(exclude_unset=True)
    deployments = [d for d in entry.get("deployments", []) if d.get("name") != MODEL_DEPLOYMENT]
    override = next((d for d in entry.get("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), {"name": MODEL_DEPLOYMENT})
    override = {**override, "user_config": settings.model_dump(mode="json")}
    entry["deployments"] = deployments + [override]
    apps = [a for a in _declarative_apps(details) if a["name"] != app_name] + [entry]
    _apply(apps)
    if not wait:
        return expected_version or ""
    if expected_version is None:
        from serve_app.config import parse_model_uri

        kind, _, ref = parse_model_uri(model_uri)
        if kind == "registry":
            from serve_app.model import resolve_registry_version

            expected_version = resolve_registry_version(settings)
    return wait_for_version(app_name, expected_version, timeout_s)


def redeploy_with_version(name: str, version: str, app_name: str = APP_NAME, timeout_s: float = 120) -> str:
    """Serve registered model ``name`` at ``version`` (pinned) in place; see :func:`switch_model`."""
    return switch_model(f"models:/{name}/{version}", app_name, timeout_s=timeout_s, expected_version=str(version))


def wait_for_version(app_name: str, version: Optional[str], timeout_s: float = 120) -> str:
    """Wait until every model replica answers with ``version`` (None: until none is loading)."""
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    deadline = time.time() + timeout_s
    last: dict[str, Any] = {}
    while time.time() < deadline:
        details = _details()
        replicas = details.applications[app_name].deployments[MODEL_DEPLOYMENT].replicas
        running = {r.replica_id for r in replicas if r.state.value == "RUNNING"}
        seen: dict[str, Any] = {}
        for _ in range(max(4, 4 * len(running))):
            info = handle.info.remote().result(timeout_s=30)
            seen[info["replica"]] = info
            if running and set(seen) >= running:
                break
        last = seen
        versions = {i["version"] for i in seen.values()}
        loading = any(i["loading"] for i in seen.values())
        errors = [i["last_error"] for i in seen.values() if i["last_error"]]
        if errors and not loading:
            raise RuntimeError(f"model switch failed on a replica: {errors[0]}")
        if not loading and set(seen) >= running and (version is None or versions == {version}):
            return next(iter(versions))
        time.sleep(0.25)
    raise TimeoutError(f"app {app_name!r} did not serve version {version} within {timeout_s}s: {last}")
