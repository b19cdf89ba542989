"""The control plane's hand on Ray Serve: deploy the app declaratively, switch its model.

It speaks to Serve's controller with the same schema as ``serve deploy serve_config.yaml``
and never imports the app: the app is named by its import path, and its arguments are
validated by Serve against ``serve_app.config.AppArgs`` when the builder runs. The names
below are the app's contract with ``serve_config.yaml`` (tests check they match the app).

:func:`switch_model` moves a running app to another model in place: the new ``user_config``
reaches every replica through ``reconfigure``, which loads the model beside the old one and
swaps between batches, so no replica restarts and no request fails.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping
from typing import Any, Optional

from segloop.settings import require_token_off_loopback, tracking_uri

APP_NAME = "segloop"
IMPORT_PATH = "serve_app.app:build_app"
MODEL_DEPLOYMENT = "SegModel"


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def _as_dict(args: Any) -> dict[str, Any]:
    if hasattr(args, "model_dump"):  # a pydantic AppArgs from a test or the bench
        return args.model_dump(mode="json")
    return dict(args or {})


def app_config(args: Any, name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """The application entry of a Serve config file for these app args (what serve_config.yaml holds).

    The model settings go in the model deployment's ``user_config`` override, the one field
    Serve updates in place (``args`` changes rebuild the app and restart replicas). The MLflow
    URI and the data dir are made explicit: the builder and replicas run in other processes.
    """
    args = _as_dict(args)
    model = dict(args.pop("model", None) or {})
    if args.get("data_dir"):
        args["data_dir"] = os.path.abspath(args["data_dir"])
    if not model.get("mlflow_tracking_uri"):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            tracking_uri(args["data_dir"]) if args.get("data_dir") else None
        )
        model["mlflow_tracking_uri"] = uri
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": MODEL_DEPLOYMENT, "user_config": model}],
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


def _details() -> Any:
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_client().get_serve_details())


def deploy(
    args: Any,
    name: str = APP_NAME,
    route_prefix: str = "/",
    http_options: Optional[dict[str, Any]] = None,
    timeout_s: float = 180,
    wait: bool = True,
    runtime_env: Optional[dict[str, Any]] = None,
) -> None:
    """Deploy (or update) the app declaratively, as ``serve deploy`` would, and wait until it
    runs (``wait=False``: return at once, then :func:`wait_running`).

    ``args``: the app's arguments (a mapping or an ``AppArgs``). Other declaratively deployed
    apps are kept. Serve is started first if needed (HTTP on 127.0.0.1:8000 unless
    ``http_options`` say otherwise).
    """
    entry = app_config(args, name, route_prefix)
    if runtime_env:  # e.g. {"env_vars": {...}}: credentials for the replicas, never in args
        entry["runtime_env"] = runtime_env
    deploy_apps([entry], http_options=http_options, timeout_s=timeout_s, wait=wait)


def deploy_apps(
    entries: list[dict[str, Any]],
    http_options: Optional[dict[str, Any]] = None,
    timeout_s: float = 180,
    wait: bool = True,
) -> None:
    """Deploy Serve config application entries (replacing same-named ones, keeping the rest)."""
    from ray import serve

    serve.start(http_options=http_options or {"host": "127.0.0.1", "port": 8000})
    names = {e["name"] for e in entries}
    apps = [a for a in _declarative_apps(_details()) if a["name"] not in names] + list(entries)
    _apply(apps)
    if wait:
        for e in entries:
            wait_running(e["name"], timeout_s)


def _why(app: Any) -> str:
    """The app's message and each unhealthy deployment's (where a replica constructor's error is)."""
    if app is None:
        return ""
    parts = [app.message]
    for name, dep in app.deployments.items():
        if dep.status.value not in ("HEALTHY", "UPSCALING", "DOWNSCALING") and dep.message:
            parts.append(f"{name}: {dep.message.strip().splitlines()[-1]}")
    return " ".join(p for p in parts if p)


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
            raise RuntimeError(f"Serve application {name!r} is {status}: {_why(app)}")
        time.sleep(0.5)


def _with_model_uri(entry: dict[str, Any], current: Mapping[str, Any], model_uri: str) -> dict[str, Any]:
    """``entry`` with the model deployment's user_config pointing at ``model_uri``."""
    deployments = [d for d in entry.get("deployments", []) if d.get("name") != MODEL_DEPLOYMENT]
    override = next(
        (d for d in entry.get("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), {"name": MODEL_DEPLOYMENT}
    )
    override = {**override, "user_config": {**current, "model_uri": model_uri}}
    return {**entry, "deployments": deployments + [override]}


def switch_model(
    model_uri: str,
    app_name: str = APP_NAME,
    *,
    wait: bool = True,
    timeout_s: float = 120,
    expected_version: Optional[str] = None,
) -> str:
    """Point a running app at ``model_uri`` (``models:/NAME/7``, ``models:/NAME@champion``,
    ``checkpoint:/x.pt``) in place, and return the version now served.

    Needs an app deployed declaratively (:func:`deploy`, ``serve deploy``, ``serve run
    config.yaml``); an app started with ``serve.run(build_app(...))`` can only follow an
    alias (``poll_interval_s``).
    """
    from train.predict import parse_model_uri

    parse_model_uri(model_uri)  # a clear error before anything changes
    details = _details()
    app = details.applications.get(app_name)
    if app is None:
        raise ValueError(f"no Serve application named {app_name!r} (running: {sorted(details.applications)})")
    if app.deployed_app_config is None:
        raise ValueError(
            f"application {app_name!r} was started with serve.run(); deploy it with `segloop serve deploy` or "
            "`serve deploy serve_config.yaml` to switch models in place, or let it follow an alias"
        )
    current = app.deployments[MODEL_DEPLOYMENT].deployment_config.user_config or {}
    entry = _with_model_uri(app.deployed_app_config.model_dump(exclude_unset=True), current, model_uri)
    _apply([a for a in _declarative_apps(details) if a["name"] != app_name] + [entry])
    if not wait:
        return expected_version or ""
    if expected_version is None:
        kind, target, ref = parse_model_uri(model_uri)
        if kind == "registry":
            from train.predict import resolve_registry_version

            expected_version = resolve_registry_version(target, ref, current.get("mlflow_tracking_uri"))
    return wait_for_version(app_name, expected_version, timeout_s)


def redeploy_with_version(name: str, version: str, app_name: str = APP_NAME, timeout_s: float = 120) -> str:
    """Serve registered model ``name`` at ``version`` (pinned) in place; see :func:`switch_model`."""
    return switch_model(f"models:/{name}/{version}", app_name, timeout_s=timeout_s, expected_version=str(version))


def _replica_infos(handle: Any, running: set[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for _ in range(max(4, 4 * len(running))):
        info = handle.info.remote().result(timeout_s=30)
        seen[info["replica"]] = info
        if running and set(seen) >= running:
            break
    return seen


def wait_for_version(app_name: str, version: Optional[str], timeout_s: float = 120) -> str:
    """Wait until every model replica answers with ``version`` (None: until none is loading)."""
    from ray import serve

    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name)
    deadline = time.time() + timeout_s
    last: dict[str, Any] = {}
    while time.time() < deadline:
        replicas = _details().applications[app_name].deployments[MODEL_DEPLOYMENT].replicas
        running = {r.replica_id for r in replicas if r.state.value == "RUNNING"}
        seen = last = _replica_infos(handle, running)
        versions = {i["version"] for i in seen.values()}
        loading = any(i["loading"] for i in seen.values())
        errors = [i["last_error"] for i in seen.values() if i["last_error"]]
        if errors and not loading:
            raise RuntimeError(f"model switch failed on a replica: {errors[0]}")
        if not loading and set(seen) >= running and (version is None or versions == {version}):
            return next(iter(versions))
        time.sleep(0.25)
    raise TimeoutError(f"app {app_name!r} did not serve version {version} within {timeout_s}s: {last}")


# ----------------------------------------------------------------------------- `segloop serve`


def _load_serve_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """A Serve config file (``serve_config.yaml``) with ``key=value`` overrides of the app's args."""
    from ray.serve.schema import ServeDeploySchema

    from segloop.config import apply_overrides, read_yaml_mapping
    from segloop.errors import ConfigError

    data = read_yaml_mapping(path)
    apps = data.get("applications") or []
    app = next((a for a in apps if a.get("import_path") == IMPORT_PATH), None)
    if app is None:
        raise ConfigError(f"{path} has no application with import_path {IMPORT_PATH!r}")
    model_overrides = [o.removeprefix("model.") for o in overrides if o.startswith("model.")]
    app["args"] = apply_overrides(app.get("args") or {}, [o for o in overrides if not o.startswith("model.")])
    if model_overrides:  # the model settings live in the model deployment's user_config
        deployments = [d for d in app.get("deployments", []) if d.get("name") != MODEL_DEPLOYMENT]
        model = _model_deployment(app)
        model["user_config"] = apply_overrides(model.get("user_config") or {}, model_overrides)
        app["deployments"] = deployments + [model]
    try:
        ServeDeploySchema.model_validate(data)
    except ValueError as err:
        raise ConfigError(f"{path} is not a valid Serve config: {err}") from None
    return data


def _deploy_plan(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The application entries and HTTP options ``segloop serve deploy`` will apply, checked
    before Ray is touched (a bad file or a token-less public host fails here, not half-deployed)."""
    data = _load_serve_config(args.config, args.overrides)
    entries = []
    for app in data["applications"]:
        entry = dict(app)
        if app.get("import_path") == IMPORT_PATH:
            built = app_config(app.get("args") or {}, app.get("name", APP_NAME), app.get("route_prefix", "/"))
            user_config = {**built["deployments"][0]["user_config"], **_model_override(app)}
            entry["args"] = built["args"]
            entry["deployments"] = [d for d in app.get("deployments", []) if d.get("name") != MODEL_DEPLOYMENT]
            entry["deployments"].append({**_model_deployment(app), "user_config": user_config})
        entries.append(entry)
    http = data.get("http_options") or {}
    for e in entries:  # the replicas refuse too; failing here says so before anything is deployed
        if e.get("import_path") == IMPORT_PATH:
            app_args = e.get("args") or {}
            require_token_off_loopback(
                http.get("host", "127.0.0.1"), bool(app_args.get("auth_token") or app_args.get("auth_token_env"))
            )
    return entries, http


def _cli_deploy(args: argparse.Namespace, plan: Optional[tuple[list, dict]] = None) -> int:
    entries, http = plan or _deploy_plan(args)
    deploy_apps(
        entries,
        http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)},
        timeout_s=args.timeout,
    )
    for e in entries:
        print(
            f"{e['name']}: RUNNING at http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{e.get('route_prefix', '/')}"
        )
    return 0


def _model_deployment(app: Mapping[str, Any]) -> dict[str, Any]:
    return next(
        (dict(d) for d in app.get("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), {"name": MODEL_DEPLOYMENT}
    )


def _model_override(app: Mapping[str, Any]) -> dict[str, Any]:
    """The model settings in the file's deployment override (they win over ``args.model``)."""
    return dict(_model_deployment(app).get("user_config") or {})


def _cli_status(args: argparse.Namespace) -> int:
    from ray import serve

    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, args.app)
    print(json.dumps(handle.info.remote().result(timeout_s=30), indent=2, default=str))
    return 0


def _cli_switch(args: argparse.Namespace) -> int:
    version = switch_model(args.model_uri, args.app, timeout_s=args.timeout)
    print(f"{args.app}: every replica serves version {version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segloop serve", description="Deploy the Serve app and switch its model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy", help="deploy serve_config.yaml declaratively and wait until it runs")
    d.add_argument("--config", default="serve_config.yaml", help="Serve config file (default: serve_config.yaml)")
    d.add_argument("--timeout", type=float, default=300, help="seconds to wait for RUNNING")
    d.add_argument(
        "overrides", nargs="*", help="key=value overrides of the app's args, e.g. model.model_uri=models:/x/3"
    )
    s = sub.add_parser("switch", help="serve another model in place (no replica restart, no failed request)")
    s.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or checkpoint:/path.pt")
    s.add_argument("--timeout", type=float, default=120)
    for q in (s, sub.add_parser("status", help="what a model replica serves now")):
        q.add_argument("--app", default=APP_NAME, help=f"Serve application name (default: {APP_NAME})")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``segloop serve deploy|switch|status`` against the Ray cluster at RAY_ADDRESS (default: auto)."""
    import ray

    from segloop.errors import cli_error

    args = build_parser().parse_args(argv)
    try:
        plan = _deploy_plan(args) if args.cmd == "deploy" else None
    except (ValueError, RuntimeError) as err:
        return cli_error(err)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace="serve", log_to_driver=False)
    handlers = {"deploy": lambda a: _cli_deploy(a, plan), "switch": _cli_switch, "status": _cli_status}
    try:
        return handlers[args.cmd](args)
    except (ValueError, RuntimeError, TimeoutError) as err:
        return cli_error(err)
