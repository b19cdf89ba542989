"""The run core shared by ``python -m train`` and ``python -m tune``: preflight and the trainer.

:func:`prepare` checks everything a run needs before any work starts — the model fits the
task, the dataset resolves (a local directory or an object-store version) and every split
opens, MLflow answers, the Ray cluster has the CPUs/GPUs — and returns a :class:`RunContext`.
:func:`make_trainer` builds the ``TorchTrainer`` around ``train.loop.train_loop_per_worker``
from a config, that context and the MLflow run the workers log into.

Where things live (MLflow store, object store) is :mod:`segloop.settings`'s; Ray Train
results go to ``<data_dir>/ray_results``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segloop.errors import ConfigError, DatasetError
from train.config import TrainConfig

# Ray Train's own INFO lines (worker-group start, "Reporting training result N: TrainingReport(...)"
# for every worker and epoch, "Checkpoint successfully created") stay in its log files under
# <session>/logs/train/ (those take every level); the console shows warnings and errors only.
RAY_TRAIN_CONSOLE_LOG_LEVEL = "WARNING"


@dataclass(frozen=True)
class RunContext:
    """What preflight found out; the same for every trial of a search."""

    root: Path  # local dataset directory
    dataset: dict[str, str]  # MLflow identity: name, version, digest, source
    num_classes: int
    class_names: list[str]
    tracking_uri: str
    experiment_id: str
    use_gpu: bool

    def loop_config(self, cfg: TrainConfig, run_id: str | None) -> dict[str, Any]:
        """``train_loop_per_worker``'s config: the TrainConfig plus what preflight resolved."""
        return cfg.model_dump(mode="json") | {
            "dataset_path": str(self.root),
            "mlflow_run_id": run_id,
            "mlflow_tracking_uri": self.tracking_uri,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
        }

    def run_params(self, cfg: TrainConfig) -> dict[str, str]:
        """The MLflow params of a training run: the whole config plus what preflight resolved."""
        from train.tracking import flatten_params

        params = flatten_params(cfg.model_dump(mode="json"))
        params.update(num_classes=str(self.num_classes), use_gpu_resolved=str(self.use_gpu))
        return params


# ----------------------------------------------------------------------------- preflight
def prepare(cfg: TrainConfig) -> RunContext:
    """Preflight: model/task, dataset and splits, MLflow, Ray resources; fails fast and clearly."""
    from train import tracking

    check_model_task(cfg)
    root, ds_info = resolve_dataset(cfg)
    num_classes, class_names = dataset_classes(cfg, root)
    uri, exp_id = tracking.setup(cfg.data_dir, cfg.experiment)
    connect_ray()
    use_gpu = want_gpu(cfg)
    check_resources(cfg, use_gpu)
    return RunContext(root, ds_info, num_classes, class_names, uri, exp_id, use_gpu)


def check_model_task(cfg: TrainConfig) -> None:
    from train.models import model_task

    if model_task(cfg.model) != cfg.task:
        raise ConfigError(f"model {cfg.model!r} is a {model_task(cfg.model)} model but task is {cfg.task!r}")


def local_digest(root: Path) -> str:
    """sha256 over (relative path, size, content sha256) of every file: the dataset's identity."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def resolve_dataset(cfg: TrainConfig) -> tuple[Path, dict[str, str]]:
    """Local path of the training data and its MLflow identity (name, version, digest, source).

    A ``dataset_version`` is materialised from the object store (hashes verified) under
    ``<data_dir>/datasets``; a plain directory is digested in place.
    """
    if cfg.dataset_version:
        from dataplane.versions import get_version, materialize, mlflow_dataset_info
        from segloop.settings import data_store

        store = data_store(cfg.data_dir)
        manifest = get_version(store, cfg.dataset_name, cfg.dataset_version)
        info = mlflow_dataset_info(manifest)
        out = Path(cfg.data_dir).resolve() / "datasets" / cfg.dataset_name / info["version"]
        return Path(materialize(store, manifest, out)), info
    root = Path(cfg.dataset).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist (config key `dataset`)")
    return root, {"name": cfg.dataset_name, "version": "local", "digest": local_digest(root), "source": root.as_uri()}


def dataset_classes(cfg: TrainConfig, root: Path) -> tuple[int, list[str]]:
    """Open the splits once in the driver: bad files fail here, not inside a worker."""
    from train.loop import build_datasets, holdout_dataset

    train_ds, val_ds, info = build_datasets(cfg, root)
    hold = holdout_dataset(cfg, root)
    for name, ds in (("training", train_ds), ("validation", val_ds), ("held-out", hold)):
        if len(ds) == 0:
            raise DatasetError(f"{root}: the {name} split is empty")
    return info.num_classes, list(info.class_names)


def connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)


def want_gpu(cfg: TrainConfig) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.use_gpu == "auto":
        return gpus >= cfg.num_workers
    return bool(cfg.use_gpu)


def check_resources(cfg: TrainConfig, use_gpu: bool) -> None:
    """``num_workers`` above what the cluster has is an error now, not a hang later."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if need_cpu > cpus:
        raise ConfigError(
            f"num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker} needs {need_cpu:g} CPUs, "
            f"the Ray cluster has {cpus:g}; lower num_workers or add nodes"
        )
    if use_gpu and cfg.num_workers > gpus:
        raise ConfigError(
            f"use_gpu with num_workers={cfg.num_workers} needs {cfg.num_workers} GPUs, the Ray cluster has {gpus:g}"
        )


# ----------------------------------------------------------------------------- the trainer
def ray_results_dir(data_dir: str | Path) -> Path:
    """Where Ray Train keeps runs and checkpoints (a run name there resumes)."""
    return Path(data_dir).resolve() / "ray_results"


def make_trainer(
    cfg: TrainConfig,
    ctx: RunContext,
    *,
    run_id: str | None,
    name: str,
    storage_path: str | Path,
    metric: str | None = None,
    mode: str = "max",
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``TorchTrainer`` running ``train_loop_per_worker`` for ``cfg`` into MLflow run ``run_id``.

    The same ``(storage_path, name)`` again resumes from that run's latest checkpoint. Train
    keeps ``cfg.checkpoints_to_keep`` checkpoints, the best by ``metric`` (default: the
    config's validation metric) in ``mode``; workers are retried ``cfg.max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=ctx.loop_config(cfg, run_id),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=ctx.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute=metric or cfg.metric,
                checkpoint_score_order=mode,
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks) or None,
            logging_config=LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LOG_LEVEL),
        ),
    )


def fit(trainer: Any) -> Any:
    """Run the trainer; a failed run raises its error."""
    result = trainer.fit()
    if result.error:
        raise result.error
    return result
