"""One epoch of training and one pass of evaluation, for both tasks.

Small free functions in the spirit of torchvision's ``references/`` scripts. They know
nothing about Ray: the Ray Train loop (``train.loop``), the promotion step
(``train.registry``) and the benchmarks call them with a model, a loader and a device.
Under DDP each rank sees its shard; the returned metrics are already reduced across ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.metrics.instance import (
    CocoEvaluator,
    InstanceConfusionMatrix,
    concat_matches,
    fitness,
    match_detections,
    pr_curves,
)
from train.metrics.semantic import ConfusionMatrix, class_indices, semantic_metrics


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it, fp16 otherwise; a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """fp16 autocast needs loss scaling; bf16 has fp32's range and does not."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def to_device(images: Any, targets: Any, device: torch.device) -> tuple[Any, Any]:
    """Move a semantic batch (tensors) or an instance batch (lists of tensors/dicts)."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


def batch_size_of(images: Any) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def _instance_losses(model: nn.Module, images: list, targets: list) -> dict[str, torch.Tensor]:
    losses = model(images, targets)
    return {"loss/" + k.removeprefix("loss_"): v for k, v in losses.items()}


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    *,
    task: str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    max_grad_norm: float | None = 10.0,
) -> dict[str, float]:
    """Train for one pass over ``loader``; the scheduler steps per iteration.

    Returns the mean loss (and its components), the number of images this rank saw and
    the wall time, so the caller can report images/s.
    """
    model.train()
    sums: dict[str, float] = {}
    n_images, n_batches, t0 = 0, 0, time.perf_counter()
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        with autocast(device, amp):
            if task == "semantic":
                logits = model(images)
                loss = criterion(logits.float(), targets)
                parts = {k: v for k, v in criterion.components.items() if k != "loss/total"}
            else:
                parts = _instance_losses(model, images, targets)
                loss = sum(parts.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}; lower the learning rate (lr) or turn amp off")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
        n_images += batch_size_of(images)
        n_batches += 1
    out = {k: v / max(n_batches, 1) for k, v in sums.items()}
    out = _mean_across_ranks(out)
    out["images"] = _sum_across_ranks(float(n_images))
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.inference_mode()
def evaluate_semantic(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    num_classes: int,
    class_names: Sequence[str],
    criterion: nn.Module | None = None,
    amp: bool = False,
    ignore_index: int = 255,
) -> tuple[dict[str, float], ConfusionMatrix]:
    """Validation loss, pixel accuracy, per-class and mean IoU/Dice, reduced over ranks."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, class_names=class_names)
    loss_sum, n = 0.0, 0
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        if criterion is not None:
            loss_sum += float(criterion(logits, targets)) * images.shape[0]
        n += images.shape[0]
        cm.update(class_indices(logits), targets)
    cm.reduce_from_all_processes()
    metrics = semantic_metrics(cm.mat, class_names)
    out = {f"val_{_key(k)}": v for k, v in metrics.items()}
    if criterion is not None:
        loss_sum, n = _sum_across_ranks(loss_sum), _sum_across_ranks(float(n))
        out["val_loss"] = loss_sum / max(n, 1)
    return out, cm


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics (FrozenBatchNorm2d is not one)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    task: str,
    max_images: int,
    amp: bool = False,
) -> int:
    """Precise BatchNorm: recompute the running statistics for the current weights.

    A short from-scratch run leaves BatchNorm's running averages far behind the weights
    (MobileNetV3 updates them with momentum 0.01), so an evaluated or saved model sees
    inputs normalised with stale statistics and predicts one class everywhere. This runs
    up to ``max_images`` training images through ``model`` in train mode without gradients
    and sets each layer's statistics to the plain average over those batches (PreciseBN,
    Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), then averages them across DDP
    ranks. Call it with the unwrapped model (DDP would broadcast rank 0's buffers on every
    forward). Returns the number of images this rank used (0: nothing changed).
    """
    bns = _batchnorms(model)
    if not bns or max_images <= 0:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    forward = _bn_forward(model, bns, task)
    was_training = model.training
    model.train()
    seen = 0
    try:
        for images, targets in loader:
            images, targets = to_device(images, targets, device)
            with autocast(device, amp):
                forward(images, targets)
            seen += batch_size_of(images)
            if seen >= max_images:
                break
    finally:
        model.train(was_training)
        for m, (momentum, mean, var, count) in zip(bns, saved):
            m.momentum = momentum
            if seen == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    _average_bn_across_ranks(bns, seen)
    return seen


def _bn_forward(model: nn.Module, bns: list[nn.Module], task: str) -> Callable[[Any, Any], Any]:
    """The cheapest train-mode forward that reaches every BatchNorm layer.

    For a detection model whose BatchNorm layers all sit in its backbone (the light Mask
    R-CNN), that is its input transform and backbone; otherwise (Mask R-CNN v2 has them in its
    heads too) the whole model with the targets, as in training.
    """
    if task == "semantic":
        return lambda images, targets: model(images)
    backbone, transform = getattr(model, "backbone", None), getattr(model, "transform", None)
    if backbone is not None and transform is not None:
        inside = {id(m) for m in backbone.modules()}
        if all(id(m) in inside for m in bns):
            return lambda images, targets: backbone(transform(images, targets)[0].tensors)
    return lambda images, targets: model(images, targets)


def _average_bn_across_ranks(bns: list[nn.modules.batchnorm._BatchNorm], seen: int) -> None:
    """Pool every rank's statistics (weighted by its images): mean of means, E[x^2] for the variance."""
    if not _dist():
        return
    total = _sum_across_ranks(float(seen))
    if total == 0:
        return
    w = seen / total
    for m in bns:
        mean, var = m.running_mean.float(), m.running_var.float()
        packed = torch.cat([w * mean, w * (var + mean * mean)])
        if dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed)
        packed = packed.to(m.running_mean.device)
        g_mean, g_sq = packed.chunk(2)
        m.running_mean.copy_(g_mean)
        m.running_var.copy_((g_sq - g_mean * g_mean).clamp_min(0))


def _bn_eval(model: nn.Module) -> list[nn.Module]:
    changed = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in changed:
        m.eval()
    return changed


@torch.inference_mode()
def evaluate_instance(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    coco_gt: Any,
    label_to_cat_id: dict[int, int],
    num_classes: int,
    with_loss: bool = True,
    with_curves: bool = False,
    amp: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """COCO bbox/segm mAP (pycocotools), validation loss and, optionally, the curves.

    The validation loss comes from a train-mode forward with BatchNorm kept in eval mode,
    since torchvision's detection models only return losses in train mode.
    Returns ``(metrics, extras)`` where extras holds the evaluator, the PR/F1 curves and
    the IoU-matched confusion matrix when ``with_curves``.
    """
    evaluator = CocoEvaluator(coco_gt, ("bbox", "segm"), label_to_cat_id)
    icm = InstanceConfusionMatrix(num_classes) if with_curves else None
    matches: list[dict] = []
    loss_sum, n = 0.0, 0
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        if with_loss:
            model.train()
            bns = _bn_eval(model)
            with autocast(device, amp):
                loss_sum += float(sum(model(images, targets).values())) * len(images)
            for m in bns:
                m.train()
        model.eval()
        with autocast(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        cpu_targets = [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        evaluator.update({int(t["image_id"]): o for t, o in zip(cpu_targets, outputs)})
        if with_curves:
            icm.update(outputs, cpu_targets)
            matches += [match_detections(o, t) for o, t in zip(outputs, cpu_targets)]
        n += len(images)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = evaluator.stats()
    out = {f"val_{_key(k)}": v for k, v in stats.items()}
    out["val_fitness"] = fitness(stats, "segm")
    if with_loss:
        out["val_loss"] = _sum_across_ranks(loss_sum) / max(_sum_across_ranks(float(n)), 1)
    extras: dict[str, Any] = {"evaluator": evaluator}
    if with_curves:
        icm.reduce_from_all_processes()
        extras["confusion_matrix"] = icm
        extras["curves"] = pr_curves(**concat_matches(_gather_list(matches)), classes=list(range(1, num_classes)))
    return out, extras


def _key(k: str) -> str:
    """MLflow/Ray-friendly metric key: ``segm/AP/ball`` -> ``segm_AP_ball``."""
    return k.replace("/", "_").replace(" ", "_")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_across_ranks(x: float) -> float:
    if not _dist():
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def _mean_across_ranks(d: dict[str, float]) -> dict[str, float]:
    if not _dist():
        return d
    w = dist.get_world_size()
    return {k: _sum_across_ranks(v) / w for k, v in sorted(d.items())}


def _gather_list(items: list) -> list:
    if not _dist():
        return items
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]
