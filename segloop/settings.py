"""Where segloop's shared things live, resolved in one place for every entry point.

Precedence: an explicit setting (``--store``, a config's ``store``) > the environment
(``SEGLOOP_STORE``, ``MLFLOW_TRACKING_URI``) > the embedded default under ``data_dir``:

* object store: ``<data_dir>/store`` (a local directory);
* MLflow: ``sqlite:///<data_dir>/mlflow.db`` with artifacts in ``<data_dir>/mlartifacts``.

The embedded default is for one machine (``make demo``); on a cluster set both variables
to shared services (MinIO/S3 and an MLflow server).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
    """Artifact location for new experiments in the embedded default (None: the server decides)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    d = Path(data_dir).resolve() / "mlartifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d.as_uri()
