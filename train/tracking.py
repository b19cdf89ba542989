"""MLflow set-up: the embedded default store, fail-fast reachability, params and inputs.

Embedded default: a SQLite tracking store ``<data_dir>/mlflow.db`` with artifacts under
``<data_dir>/mlartifacts`` — ``mlflow ui --backend-store-uri sqlite:///<data_dir>/mlflow.db``
shows it. ``MLFLOW_TRACKING_URI`` points at a server instead (and ``MLFLOW_S3_ENDPOINT_URL``
plus AWS credentials put artifacts on MinIO/S3, as MLflow itself reads them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segloop.errors import ConfigError
from segloop.settings import artifact_root, tracking_uri


def setup(data_dir: str | Path, experiment: str) -> tuple[str, str]:
    """Point MLflow at the store, check it answers, create/select the experiment.

    Returns ``(tracking_uri, experiment_id)``. An unreachable server is a ConfigError
    raised within seconds, before any training work starts.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri(data_dir)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, artifact_location=artifact_root(data_dir))
        )
    except Exception as err:  # noqa: BLE001 - MlflowException, OSError and requests' errors alike
        raise ConfigError(f"MLflow tracking server {uri} is not reachable or refused the request: {err}") from None
    mlflow.set_experiment(experiment_id=exp_id)
    return uri, exp_id


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params (``a.b``), values as strings, 6000-char cap."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def log_dataset(info: Mapping[str, str], context: str = "training") -> None:
    """Record the dataset's name, version and digest as an MLflow input (the DVC replacement)."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    source = info.get("source", "")
    ds = MetaDataset(source=HTTPDatasetSource(url=source), name=info["name"], digest=info["digest"][:36])
    mlflow.log_input(ds, context=context, tags={"version": info.get("version", "")})
    mlflow.set_tags(
        {"dataset.name": info["name"], "dataset.version": info.get("version", ""), "dataset.digest": info["digest"]}
    )


def find_run(experiment_id: str, run_name: str) -> str | None:
    """The newest MLflow run of this experiment with ``segloop.run_name`` = run_name (for resume)."""
    import mlflow

    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`segloop.run_name` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None
