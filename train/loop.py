"""The Ray Train worker function: data, model, DDP, epochs, checkpoints, MLflow.

``train_loop_per_worker`` runs in every Ray Train worker. Each epoch it trains on its
shard, validates on its shard (metrics reduced across ranks), and calls
``ray.train.report`` with the metrics and, on rank 0, a checkpoint holding model,
optimizer, scheduler, epoch and config. A worker restarted by ``FailureConfig`` (or a
re-run with the same run name) picks the latest checkpoint up through
``ray.train.get_checkpoint()`` and continues from the next epoch.

Rank 0 also logs the epoch's metrics to the MLflow run the driver created (its id comes in
the config), with MLflow's system-metrics sampler running in that worker, where the
CPU/GPU work happens.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from train.config import TrainConfig
from train.data import build_dataset, collate_fn
from train.engine import evaluate_instance, evaluate_semantic, needs_grad_scaler, train_one_epoch
from train.losses import SegmentationLoss
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


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, iters_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
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
        f"epoch {epoch + 1}/{epochs} | " + " | ".join(parts)
        + f" | {metrics.get('images_per_s', 0):.1f} img/s | {metrics.get('epoch_s', 0):.1f}s | ETA {format_eta(eta_s)}"
    )


def say(line: str) -> None:
    """Progress for a person: straight to stdout (Ray's print patch would echo it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def save_checkpoint(state: dict[str, Any]) -> "ray.train.Checkpoint":  # noqa: F821
    import ray.train

    tmp = tempfile.mkdtemp(prefix="segloop-ckpt-")
    torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
    return ray.train.Checkpoint.from_directory(tmp)


def load_checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    """Read a Ray checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker; ``config`` = TrainConfig dump + driver extras."""
    import ray.train
    import ray.train.torch

    extras = {k: config.pop(k) for k in ("dataset_path", "mlflow_run_id", "mlflow_tracking_uri", "num_classes", "class_names")}
    cfg = TrainConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + rank)
    device = ray.train.torch.get_device()
    amp = cfg.amp and device.type == "cuda"

    root = Path(extras["dataset_path"])
    train_ds, val_ds, info = build_datasets(cfg, root)
    num_classes, class_names = extras["num_classes"], extras["class_names"]

    model = build_model(
        cfg.model, num_classes, weights=cfg.weights, weights_backbone=cfg.weights_backbone,
        checkpoint=cfg.init_checkpoint, **cfg.model_kwargs,
    )
    ddp_kwargs = {"find_unused_parameters": True} if cfg.task == "instance" else {}
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    raw_model = getattr(model, "module", model)
    train_loader = ray.train.torch.prepare_data_loader(make_loader(train_ds, cfg, shuffle=True, task=cfg.task))
    val_loader = make_loader(shard(val_ds, rank, world), cfg, shuffle=False, task=cfg.task)
    if cfg.task == "instance":
        val_loader = ray.train.torch.prepare_data_loader(val_loader, add_dist_sampler=False)
    criterion = SegmentationLoss(cfg.ce_weight, cfg.dice_weight) if cfg.task == "semantic" else None
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, cfg.amp) else None

    start_epoch, best, stale, history = 0, -math.inf, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, stale, history = state["epoch"] + 1, state["best"], state["stale"], state["history"]
        if rank == 0:
            say(f"resumed from checkpoint at epoch {start_epoch}/{cfg.epochs}")

    tracker = _RankZeroTracker(extras, enabled=rank == 0)
    run_t0 = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.fail_at_epoch is not None and epoch == cfg.fail_at_epoch and checkpoint is None:
                raise InjectedFailure(f"fail_at_epoch={epoch}: simulated worker failure")
            if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            tr = train_one_epoch(
                model, criterion, optimizer, train_loader, device,
                task=cfg.task, scheduler=scheduler, scaler=scaler, amp=amp,
            )
            if cfg.task == "semantic":
                val, _ = evaluate_semantic(
                    raw_model, val_loader, device, num_classes=num_classes, class_names=class_names,
                    criterion=criterion, amp=amp, ignore_index=info.ignore_index,
                )
            else:
                val, _ = evaluate_instance(
                    raw_model, val_loader, device, coco_gt=info.coco, label_to_cat_id=info.label_to_cat_id,
                    num_classes=num_classes, amp=amp,
                )
            metrics = {"train_" + k.replace("/", "_"): v for k, v in tr.items() if k not in ("images", "seconds")}
            metrics.update(val)
            metrics.update(
                epoch=epoch,
                lr=optimizer.param_groups[0]["lr"],
                images_per_s=tr["images"] / max(tr["seconds"], 1e-9),
                epoch_s=time.perf_counter() - run_t0 if epoch == start_epoch else tr["seconds"],
            )
            score = metrics.get(cfg.metric, float("nan"))
            improved = math.isfinite(score) and score > best
            best, stale = (score, 0) if improved else (best, stale + 1)
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            elapsed = time.perf_counter() - run_t0
            eta = elapsed / (epoch + 1 - start_epoch) * (cfg.epochs - epoch - 1)
            stop = cfg.patience > 0 and stale >= cfg.patience
            metrics["early_stopped"] = float(stop)
            ckpt = None
            if rank == 0:
                say(epoch_line(epoch, cfg.epochs, metrics, cfg.metric, 0 if stop else eta))
                tracker.log(metrics, step=epoch)
                ckpt = save_checkpoint({
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "epoch": epoch,
                    "best": best,
                    "stale": stale,
                    "history": history,
                    "config": cfg.model_dump(mode="json"),
                    "num_classes": num_classes,
                    "class_names": list(class_names),
                })
            ray.train.report({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ckpt)
            if stop:
                if rank == 0:
                    say(f"early stopping: {cfg.metric} did not improve for {cfg.patience} epochs")
                break
    finally:
        tracker.close()


class _RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run, system metrics included."""

    def __init__(self, extras: dict[str, Any], enabled: bool) -> None:
        self.run = None
        if not enabled or not extras.get("mlflow_run_id"):
            return
        import mlflow

        mlflow.set_tracking_uri(extras["mlflow_tracking_uri"])
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=extras["mlflow_run_id"], log_system_metrics=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.mlflow.log_metrics(clean, step=step)

    def close(self) -> None:
        if self.run is not None:
            # Leave the run open for the driver (it logs artifacts and the model, then ends it).
            self.mlflow.end_run(status="RUNNING")
            self.run = None
