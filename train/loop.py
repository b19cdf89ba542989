"""The Ray Train worker function: data, model, DDP, epochs, checkpoints, MLflow.

``train_loop_per_worker`` runs in every Ray Train worker. Each epoch it trains on its
shard, validates on its shard (metrics reduced across ranks), and calls
``ray.train.report`` with the metrics and, on rank 0, a checkpoint holding model,
optimizer, scheduler, epoch and config. A worker restarted by ``FailureConfig`` (or a
re-run with the same run name) picks the latest checkpoint up through
``ray.train.get_checkpoint()`` and continues from the next epoch.

Before validating, every epoch recomputes the BatchNorm statistics for the epoch's final
weights over (up to ``precise_bn_images``) training images: running averages lag the weights
badly in a short from-scratch run, and a model evaluated or saved with them predicts one
class everywhere.

Rank 0 also logs the epoch's metrics to the MLflow run the driver created (its id comes in
the config), with MLflow's system-metrics sampler running in that worker, where the
CPU/GPU work happens.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from train.config import TrainConfig
from train.data import build_dataset, collate_fn
from train.engine import (
    evaluate_instance,
    evaluate_semantic,
    needs_grad_scaler,
    recompute_bn_stats,
    train_one_epoch,
)
from train.losses import SegmentationLoss
from train.model_ref import is_registry_uri
from train.models import build_model
from train.transforms import eval_transforms, train_transforms

CHECKPOINT_FILE = "checkpoint.pt"


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_at_epoch`` test hook to simulate a worker dying mid-training."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    """torchvision's MobileNetV3 uses 0.01: fine for long runs, too slow for a short from-scratch one."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of ``n`` samples (at least one sample each side)."""
    perm = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def build_datasets(cfg: TrainConfig, root: Path) -> tuple[Any, Any, Any]:
    """``(train, val, info)``: semantic carves val out of trainval; instance uses train/val."""
    opts = {"border": cfg.border} if cfg.task == "semantic" else {}
    if cfg.task == "semantic":
        train_full = build_dataset("semantic", root, "trainval", train_transforms("semantic", cfg.image_size), **opts)
        val_full = build_dataset("semantic", root, "trainval", eval_transforms("semantic", cfg.image_size), **opts)
        tr_idx, va_idx = split_indices(len(train_full), cfg.val_fraction, cfg.seed)
        return Subset(train_full, tr_idx), Subset(val_full, va_idx), train_full
    train_ds = build_dataset("instance", root, "train", train_transforms("instance", cfg.image_size))
    val_ds = build_dataset("instance", root, "val", eval_transforms("instance", cfg.image_size))
    return train_ds, val_ds, val_ds


def holdout_dataset(cfg: TrainConfig, root: Path) -> Any:
    """The split used to compare challenger and champion (never trained on)."""
    split = cfg.holdout_split or ("test" if cfg.task == "semantic" else "val")
    opts = {"border": cfg.border} if cfg.task == "semantic" else {}
    return build_dataset(cfg.task, root, split, eval_transforms(cfg.task, cfg.image_size), **opts)


def make_loader(ds: Any, cfg: TrainConfig, *, shuffle: bool, task: str) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.loader_workers,
        collate_fn=collate_fn if task == "instance" else None,
        drop_last=shuffle and task == "semantic" and len(ds) > cfg.batch_size,
        persistent_workers=cfg.loader_workers > 0,
    )


def shard(ds: Any, rank: int, world: int) -> Any:
    """Evaluation shard without padding, so every sample is scored exactly once."""
    return ds if world == 1 else Subset(ds, list(range(rank, len(ds), world)))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule over the whole run (torchvision references' habit)."""
    total = max(1, cfg.epochs * iters_per_epoch)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr * 0.01)
    if cfg.scheduler == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=0.9)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], metric: str, eta_s: float) -> str:
    """One line a person can follow: loss, the key metrics, images/s and time left."""
    keys = ["train_loss", "val_loss", metric] + (["val_mdice"] if metric == "val_miou" else ["val_segm_mAP50"])
    parts = [f"{k} {metrics[k]:.4f}" for k in keys if k in metrics and isinstance(metrics[k], float)]
    return (
        f"epoch {epoch + 1}/{epochs} | "
        + " | ".join(parts)
        + f" | {metrics.get('images_per_s', 0):.1f} img/s | {metrics.get('epoch_s', 0):.1f}s | ETA {format_eta(eta_s)}"
    )


class _RayTrainConsoleFilter(logging.Filter):
    """Keep Ray Train's own INFO records off a worker's console; warnings and errors pass.

    ``RunConfig(logging_config=LoggingConfig(log_level=...))`` does this for loggers named
    ``ray.train.*``, but Ray 2.60 logs "Reporting training result N: TrainingReport(...)" (every
    worker, every epoch) through a logger named after its file path, which that filter misses.
    Matching on the source file covers both. File handlers are left alone, so the records stay
    in Ray Train's log files (``<session>/logs/train/``).
    """

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self.package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.package_dir)


def quiet_ray_train_console() -> None:
    """Add :class:`_RayTrainConsoleFilter` to the console handlers of this worker's root logger."""
    import ray.train

    package_dir = os.path.dirname(os.path.abspath(ray.train.__file__)) + os.sep
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _RayTrainConsoleFilter) for f in handler.filters):
            handler.addFilter(_RayTrainConsoleFilter(package_dir))


def say(line: str) -> None:
    """Progress for a person: straight to stdout (Ray's print patch would echo it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """``ray.train.report`` the numeric metrics, with a checkpoint of ``state`` when given.

    The checkpoint is written to a temporary directory that Ray copies to the run's storage
    before ``report`` returns (synchronous upload), then removed.
    """
    import ray.train

    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if state is None:
        ray.train.report(numeric, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="segloop-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        ray.train.report(numeric, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    """Read a Ray checkpoint written by :func:`report` (tensors and plain data only)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


@dataclass
class Worker:
    """One Ray Train worker's data, model and optimisation state."""

    cfg: TrainConfig
    rank: int
    device: torch.device
    amp: bool
    num_classes: int
    class_names: list[str]
    info: Any  # the dataset object with ignore_index / COCO ground truth
    model: torch.nn.Module  # DDP-wrapped when world > 1
    raw_model: torch.nn.Module
    train_loader: Any
    val_loader: Any
    criterion: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint, restored on resume."""

    start_epoch: int = 0
    best: float = -math.inf
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed: bool = False


def load_registered_weights(model: torch.nn.Module, cfg: TrainConfig, tracking_uri: str, num_classes: int) -> None:
    """Fine-tuning from a registered version: the same architecture and classes, or a named error."""
    import mlflow

    from segloop.errors import ModelError
    from train.model_ref import parse_model_uri
    from train.registry import load_version

    _, name, ref = parse_model_uri(cfg.init_checkpoint)
    mlflow.set_tracking_uri(tracking_uri)
    loaded, meta, version = load_version(name, ref)
    if meta.model != cfg.model or meta.num_classes != num_classes:
        raise ModelError(
            f"init_checkpoint {cfg.init_checkpoint} (version {version}) is a {meta.model} with {meta.num_classes} "
            f"classes; this run trains a {cfg.model} with {num_classes}: set init_checkpoint to a matching model"
        )
    model.load_state_dict(loaded.state_dict())


def setup_worker(cfg: TrainConfig, extras: dict[str, Any]) -> Worker:
    """Datasets, model (DDP), loaders, loss, optimizer, schedule for this worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # the CPUs this worker reserved
    device = ray.train.torch.get_device()
    from train.run import DatasetSource

    root = DatasetSource(**extras["dataset_source"]).local_path()
    say(
        f"worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()} ({socket.gethostname()}): data {root}"
    )
    train_ds, val_ds, info = build_datasets(cfg, root)
    num_classes = extras["num_classes"]
    from_registry = is_registry_uri(cfg.init_checkpoint)
    model = build_model(
        cfg.model,
        num_classes,
        weights=None if from_registry else cfg.weights,
        weights_backbone=None if from_registry else cfg.weights_backbone,
        checkpoint=None if from_registry else cfg.init_checkpoint,
        **cfg.model_kwargs,
    )
    if from_registry:
        load_registered_weights(model, cfg, extras["mlflow_tracking_uri"], num_classes)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    ddp_kwargs = {"find_unused_parameters": True} if cfg.task == "instance" else {}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    train_loader = ray.train.torch.prepare_data_loader(make_loader(train_ds, cfg, shuffle=True, task=cfg.task))
    val_loader = make_loader(shard(val_ds, rank, world), cfg, shuffle=False, task=cfg.task)
    if cfg.task == "instance":
        val_loader = ray.train.torch.prepare_data_loader(val_loader, add_dist_sampler=False)
    optimizer = build_optimizer(cfg, model)
    return Worker(
        cfg=cfg,
        rank=rank,
        device=device,
        amp=cfg.amp and device.type == "cuda",
        num_classes=num_classes,
        class_names=extras["class_names"],
        info=info,
        model=model,
        raw_model=getattr(model, "module", model),
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=SegmentationLoss(cfg.ce_weight, cfg.dice_weight) if cfg.task == "semantic" else None,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, len(train_loader)),
        scaler=torch.amp.GradScaler("cuda") if needs_grad_scaler(device, cfg.amp) else None,
    )


def resume(w: Worker, checkpoint: Any) -> Progress:
    """Continue from Ray Train's latest checkpoint (a restarted worker or a re-run of the same name)."""
    if checkpoint is None:
        return Progress()
    state = load_checkpoint_state(checkpoint)
    w.raw_model.load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    if w.scaler is not None and state.get("scaler"):
        w.scaler.load_state_dict(state["scaler"])
    p = Progress(state["epoch"] + 1, state["best"], state["stale"], state["history"], resumed=True)
    if w.rank == 0:
        say(f"resumed from checkpoint at epoch {p.start_epoch}/{w.cfg.epochs}")
    return p


def run_epoch(w: Worker, epoch: int) -> dict[str, Any]:
    """Train one epoch, recompute BatchNorm statistics, validate; the epoch's metrics."""
    cfg = w.cfg
    sampler = getattr(w.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    tr = train_one_epoch(
        w.model,
        w.criterion,
        w.optimizer,
        w.train_loader,
        w.device,
        task=cfg.task,
        scheduler=w.scheduler,
        scaler=w.scaler,
        amp=w.amp,
    )
    recompute_bn_stats(
        w.raw_model, w.train_loader, w.device, task=cfg.task, max_images=cfg.precise_bn_images, amp=w.amp
    )
    if cfg.task == "semantic":
        val, _ = evaluate_semantic(
            w.raw_model,
            w.val_loader,
            w.device,
            num_classes=w.num_classes,
            class_names=w.class_names,
            criterion=w.criterion,
            amp=w.amp,
            ignore_index=w.info.ignore_index,
        )
    else:
        val, _ = evaluate_instance(
            w.raw_model,
            w.val_loader,
            w.device,
            coco_gt=w.info.coco,
            label_to_cat_id=w.info.label_to_cat_id,
            num_classes=w.num_classes,
            amp=w.amp,
        )
    metrics = {"train_" + k.replace("/", "_"): v for k, v in tr.items() if k not in ("images", "seconds")}
    metrics.update(val)
    metrics.update(
        epoch=epoch, lr=w.optimizer.param_groups[0]["lr"], images_per_s=tr["images"] / max(tr["seconds"], 1e-9)
    )
    metrics["train_s"] = tr["seconds"]
    return metrics


def checkpoint_state(w: Worker, epoch: int, p: Progress) -> dict[str, Any]:
    return {
        "model": w.raw_model.state_dict(),
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "scaler": w.scaler.state_dict() if w.scaler is not None else {},
        "epoch": epoch,
        "best": p.best,
        "stale": p.stale,
        "history": p.history,
        "config": w.cfg.model_dump(mode="json"),
        "num_classes": w.num_classes,
        "class_names": list(w.class_names),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker; ``config`` = TrainConfig dump + driver extras."""
    import ray.train

    extras = {
        k: config.pop(k)
        for k in ("dataset_source", "mlflow_run_id", "mlflow_tracking_uri", "num_classes", "class_names")
    }
    cfg = TrainConfig.model_validate(config)
    quiet_ray_train_console()
    w = setup_worker(cfg, extras)
    p = resume(w, ray.train.get_checkpoint())
    tracker = _RankZeroTracker(extras, enabled=w.rank == 0)
    run_t0 = time.perf_counter()
    try:
        for epoch in range(p.start_epoch, cfg.epochs):
            if cfg.fail_at_epoch is not None and epoch == cfg.fail_at_epoch and not p.resumed:
                raise InjectedFailure(f"fail_at_epoch={epoch}: simulated worker failure")
            metrics = run_epoch(w, epoch)
            train_s = metrics.pop("train_s")
            metrics["epoch_s"] = time.perf_counter() - run_t0 if epoch == p.start_epoch else train_s
            score = metrics.get(cfg.metric, float("nan"))
            improved = math.isfinite(score) and score > p.best
            p.best, p.stale = (score, 0) if improved else (p.best, p.stale + 1)
            p.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            elapsed = time.perf_counter() - run_t0
            eta = elapsed / (epoch + 1 - p.start_epoch) * (cfg.epochs - epoch - 1)
            stop = cfg.patience > 0 and p.stale >= cfg.patience
            metrics["early_stopped"] = float(stop)
            if w.rank == 0:
                say(epoch_line(epoch, cfg.epochs, metrics, cfg.metric, 0 if stop else eta))
                tracker.log(metrics, step=epoch)
            t_report = time.perf_counter()
            report(metrics, checkpoint_state(w, epoch, p) if w.rank == 0 else None)
            # what saving + uploading the checkpoint cost (kept in the next checkpoint's history)
            p.history[-1]["report_s"] = time.perf_counter() - t_report
            if stop:
                if w.rank == 0:
                    say(f"early stopping: {cfg.metric} did not improve for {cfg.patience} epochs")
                break
    finally:
        tracker.close()


class _RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run, system metrics included.

    Rides out an MLflow outage: an epoch's metrics that cannot be logged are kept and sent
    with the next epoch's, and at the end of the run retried with backoff for up to
    ``OUTAGE_S``; training itself never waits on MLflow.
    """

    OUTAGE_S = 300.0

    def __init__(self, extras: dict[str, Any], enabled: bool) -> None:
        self.run = None
        self._pending: list[tuple[dict[str, float], int]] = []
        if not enabled or not extras.get("mlflow_run_id"):
            return
        import mlflow

        # the sampler's start/stop/"no GPU" INFO lines are not progress; its warnings still show
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        # fail fast and retry here instead: MLflow's own retries (7, with backoff) block an epoch for minutes
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        mlflow.set_tracking_uri(extras["mlflow_tracking_uri"])
        self.mlflow = mlflow
        run_id = extras["mlflow_run_id"]
        self.run = _with_retries(lambda: mlflow.start_run(run_id=run_id, log_system_metrics=True), self.OUTAGE_S)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._pending.append((clean, step))
        self._flush(wait_s=0.0)

    def _flush(self, wait_s: float) -> None:
        """Send the kept epochs in order; on failure keep them (and wait up to ``wait_s`` retrying)."""
        while self._pending:
            metrics, step = self._pending[0]
            try:
                _with_retries(lambda m=metrics, s=step: self.mlflow.log_metrics(m, step=s), wait_s)
            except Exception as err:  # noqa: BLE001 - MLflow is down: keep the metrics, train on
                say(f"MLflow unreachable ({type(err).__name__}); keeping {len(self._pending)} epoch(s) of metrics")
                return
            self._pending.pop(0)

    def close(self) -> None:
        if self.run is None:
            return
        self._flush(wait_s=self.OUTAGE_S)
        if self._pending:
            raise RuntimeError(
                f"MLflow stayed unreachable for {self.OUTAGE_S:.0f}s: {len(self._pending)} epoch(s) of metrics lost"
            )
        # Leave the run open for the driver (it logs artifacts and the model, then ends it).
        _with_retries(lambda: self.mlflow.end_run(status="RUNNING"), self.OUTAGE_S)
        self.run = None


def _with_retries(fn: Any, wait_s: float) -> Any:
    """``fn()``, retried with exponential backoff (1 s, 2 s, … 10 s) for up to ``wait_s`` seconds."""
    deadline, delay = time.monotonic() + wait_s, 1.0
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
