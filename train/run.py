"""The run core shared by ``python -m train`` and ``python -m tune``: preflight and the trainer.

:func:`prepare` checks everything a run needs before any work starts — the model fits the
task, the dataset resolves (a local directory or an object-store version) and every split
opens, MLflow answers, the Ray cluster has the CPUs/GPUs — and returns a :class:`RunContext`.
:func:`make_trainer` builds the ``TorchTrainer`` around ``train.loop.train_loop_per_worker``
from a config, that context and the MLflow run the workers log into.

Nothing here assumes a shared filesystem. Workers and evaluation tasks get a
:class:`DatasetSource` and materialise the dataset version on their own node; Ray Train's
checkpoints go where the object store is (``s3://<bucket>/ray_results`` with an S3 store,
``<data_dir>/ray_results`` with the embedded local one). Where things live is
:mod:`segloop.settings`'s; on a multi-node cluster preflight refuses the one-machine defaults.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segloop.errors import ConfigError, DatasetError
from train.config import TrainConfig

# Ray Train's own INFO lines (worker-group start, "Reporting training result N: TrainingReport(...)"
# for every worker and epoch, "Checkpoint successfully created") stay in its log files under
# <session>/logs/train/ (those take every level); the console shows warnings and errors only.
RAY_TRAIN_CONSOLE_LOG_LEVEL = "WARNING"


@dataclass(frozen=True)
class DatasetSource:
    """How a process on any node gets the run's data.

    A dataset version is downloaded by each process from the object store into its own node's
    cache (:func:`segloop.settings.node_cache_dir`), every blob's hash checked; the store
    config travels, the credentials come from that node's environment. A plain directory
    (``dataset:``) is only for one-node runs (preflight refuses it on a multi-node cluster).
    """

    name: str
    version: str | None = None
    store: dict[str, Any] | None = None
    path: str | None = None

    def local_path(self) -> Path:
        """The data on this node (materialised here when it is a version)."""
        if self.version is None:
            return Path(self.path or ".")
        from dataplane.store import open_store
        from dataplane.versions import get_version, materialize
        from segloop.settings import node_cache_dir

        store = open_store(self.store)
        manifest = get_version(store, self.name, self.version)
        return Path(materialize(store, manifest, node_cache_dir() / "datasets" / self.name / self.version))


@dataclass(frozen=True)
class RunContext:
    """What preflight found out; the same for every trial of a search."""

    root: Path  # the dataset on the driver's node (preflight, the model's input example)
    source: DatasetSource  # the dataset for workers and evaluation tasks on any node
    dataset: dict[str, str]  # MLflow identity: name, version, digest, source
    num_classes: int
    class_names: list[str]
    tracking_uri: str
    experiment_id: str
    use_gpu: bool

    def loop_config(self, cfg: TrainConfig, run_id: str | None) -> dict[str, Any]:
        """``train_loop_per_worker``'s config: the TrainConfig plus what preflight resolved."""
        return cfg.model_dump(mode="json") | {
            "dataset_source": asdict(self.source),
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
    """Preflight: model/task, dataset and splits, MLflow, shared services, Ray resources; fails
    fast and clearly (what needs no cluster is checked before connecting to one)."""
    from segloop.settings import require_shared_services, store_config
    from train import tracking

    check_model_task(cfg)
    root, source, ds_info = resolve_dataset(cfg)
    num_classes, class_names = dataset_classes(cfg, root)
    uri, exp_id = tracking.setup(cfg.data_dir, cfg.experiment)
    connect_ray()
    require_shared_services(
        store=store_config(cfg.data_dir),
        tracking=uri,
        dataset_dir=None if cfg.dataset_version else str(root),
        what="training",
    )
    use_gpu = want_gpu(cfg)
    check_resources(cfg, use_gpu)
    return RunContext(root, source, ds_info, num_classes, class_names, uri, exp_id, use_gpu)


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


def resolve_dataset(cfg: TrainConfig) -> tuple[Path, DatasetSource, dict[str, str]]:
    """The data on the driver's node, the source workers use, and its MLflow identity.

    A ``dataset_version`` (an id or unique prefix) is resolved to its full id and materialised
    from the object store (hashes verified) under ``<data_dir>/datasets``; a plain directory
    is digested in place.
    """
    if cfg.dataset_version:
        from dataplane.versions import get_version, materialize, mlflow_dataset_info
        from segloop.settings import data_store, store_config_dict

        store = data_store(cfg.data_dir)
        store.ping(require_bucket=True)  # an unreachable endpoint or a missing bucket: say so now
        manifest = get_version(store, cfg.dataset_name, cfg.dataset_version)
        info = mlflow_dataset_info(manifest)
        out = Path(cfg.data_dir).resolve() / "datasets" / cfg.dataset_name / info["version"]
        source = DatasetSource(cfg.dataset_name, info["version"], store_config_dict(cfg.data_dir))
        return Path(materialize(store, manifest, out)), source, info
    root = Path(cfg.dataset).expanduser().resolve()
    if not root.is_dir():
        hint = ""
        if "working_dir_files" in root.parts:  # Ray unpacks a job's --working-dir there
            hint = (
                "; in a Ray job a relative path resolves inside the uploaded working directory, which "
                "leaves out git-ignored data: use dataset_version=<id> (segloop versions create) or an absolute path"
            )
        raise DatasetError(f"dataset directory {root} does not exist (config key `dataset`){hint}")
    info = {"name": cfg.dataset_name, "version": "local", "digest": local_digest(root), "source": root.as_uri()}
    return root, DatasetSource(cfg.dataset_name, path=str(root)), info


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
@dataclass(frozen=True)
class RunStorage:
    """Where Ray Train keeps runs and checkpoints (the same name there resumes)."""

    path: str  # a local directory, or ``<bucket>/ray_results`` on ``filesystem``
    filesystem: Any = None  # pyarrow.fs.S3FileSystem for an S3 store, None for a local path

    def __str__(self) -> str:
        return f"s3://{self.path}" if self.filesystem is not None else self.path

    def exists(self, path: str | None) -> bool:
        """Whether a checkpoint path Train reported is still on this storage (Train drops old ones)."""
        if not path:
            return False
        if self.filesystem is None:
            return "://" in path or Path(path).exists()
        import pyarrow.fs

        return self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def checkpoint(self, path: str) -> Any:
        """The ``ray.train.Checkpoint`` at a path Train reported, readable from any node."""
        from ray.train import Checkpoint

        return Checkpoint(path, filesystem=self.filesystem)


def run_storage(data_dir: str | Path) -> RunStorage:
    """Checkpoints go where the object store is: ``s3://<bucket>/ray_results`` (any node reads
    them: resumed workers, the promotion step) or ``<data_dir>/ray_results`` with a local store."""
    from segloop.settings import store_config

    cfg = store_config(data_dir)
    if cfg.kind != "s3":
        return RunStorage(str(Path(data_dir).resolve() / "ray_results"))
    import pyarrow.fs

    from dataplane.store import s3_credentials

    access, secret = s3_credentials()
    if not access:
        raise ConfigError(f"no S3 credentials for {cfg.endpoint}: set SEGLOOP_S3_ACCESS_KEY/SEGLOOP_S3_SECRET_KEY")
    endpoint = (cfg.endpoint or "").split("://", 1)[-1]
    fs = pyarrow.fs.S3FileSystem(
        access_key=access,
        secret_key=secret,
        endpoint_override=endpoint,
        scheme="https" if cfg.secure else "http",
        region=cfg.region or "us-east-1",
        connect_timeout=cfg.timeout,
        request_timeout=max(cfg.timeout, 30.0),
    )
    return RunStorage(f"{cfg.bucket}/ray_results", fs)


def make_trainer(
    cfg: TrainConfig,
    ctx: RunContext,
    *,
    run_id: str | None,
    name: str,
    storage: RunStorage,
    metric: str | None = None,
    mode: str = "max",
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``TorchTrainer`` running ``train_loop_per_worker`` for ``cfg`` into MLflow run ``run_id``.

    The same ``(storage, name)`` again resumes from that run's latest checkpoint. Train
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
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
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
    """Run the trainer; a failed run raises its error.

    ``TorchTrainer.fit`` installs a SIGINT handler (Ctrl-C aborts the run) that holds the
    run's controller actor and stays installed after the run: the finished controller (and
    its dataset-manager actor) would live on as long as the driver does, two idle worker
    processes per run. Restoring the previous handler releases them, and Ctrl-C after
    training interrupts the driver as usual again.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.error:
        raise result.error
    return result
