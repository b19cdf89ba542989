"""The training job's driver: checks, Ray Train, final evaluation, registry, promotion.

Run it with ``python -m train --config configs/pets.yaml`` locally or
``ray job submit --working-dir . -- python -m train --config configs/pets.yaml`` on a
cluster. Steps:

1. preflight — config, dataset, cluster resources and MLflow are checked before any work;
2. ``TorchTrainer.fit`` — ``train.loop.train_loop_per_worker`` on ``num_workers`` DDP workers;
3. final evaluation of the best checkpoint on the held-out split (a Ray task placed like a
   worker, so it gets a GPU when training had one) -> curves, confusion matrices, report;
4. the model is logged and registered, then compared with the champion on the same
   held-out data and promoted (alias ``champion``) only if it wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.config import TrainConfig
from train.errors import ConfigError, DatasetError


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    model_version: str | None
    metrics: dict[str, float]
    holdout: dict[str, float]
    promoted: bool | None
    reason: str
    epochs_run: int


# ----------------------------------------------------------------------------- dataset
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
        from train.store import store_from_env
        from train.versions import get_version, materialize, mlflow_dataset_info

        store = store_from_env()
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


# ----------------------------------------------------------------------------- cluster
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


# ----------------------------------------------------------------------------- evaluation
def evaluate_on_holdout(cfg_dict: dict, root: str, state: Any, num_classes: int, class_names: list[str],
                        with_curves: bool = True) -> dict[str, Any]:
    """Score one set of weights on the held-out split; returns metrics + plot material.

    ``state`` is a state_dict or ``("registry", name, version, tracking_uri)``; runs as a Ray task.
    """
    import torch

    from train.engine import evaluate_instance, evaluate_semantic
    from train.loop import holdout_dataset, make_loader
    from train.models import build_model
    from train.registry import load_version

    cfg = TrainConfig.model_validate(cfg_dict)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(state, tuple):
        import mlflow

        mlflow.set_tracking_uri(state[3])
        model, _, _ = load_version(state[1], state[2])
    else:
        model = build_model(cfg.model, num_classes, **cfg.model_kwargs)
        model.load_state_dict(state)
    model.to(device).eval()
    ds = holdout_dataset(cfg, Path(root))
    loader = make_loader(ds, cfg, shuffle=False, task=cfg.task)
    amp = cfg.amp and device.type == "cuda"
    if cfg.task == "semantic":
        metrics, cm = evaluate_semantic(model, loader, device, num_classes=num_classes, class_names=class_names,
                                        amp=amp, ignore_index=ds.ignore_index)
        return {"metrics": metrics, "confusion_matrix": cm.mat.cpu().numpy()}
    metrics, extras = evaluate_instance(model, loader, device, coco_gt=ds.coco, label_to_cat_id=ds.label_to_cat_id,
                                        num_classes=num_classes, with_loss=False, with_curves=with_curves, amp=amp)
    out: dict[str, Any] = {"metrics": metrics}
    if with_curves:
        out["confusion_matrix"] = extras["confusion_matrix"].compute().cpu().numpy()
        out["curves"] = extras["curves"]
    return out


def run_remote(fn: Any, use_gpu: bool, *args: Any) -> Any:
    import ray

    return ray.get(ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(fn).remote(*args))


# ----------------------------------------------------------------------------- artifacts
def write_artifacts(out: Path, cfg: TrainConfig, history: list[dict], holdout: dict[str, Any],
                    class_names: list[str], decision_text: str) -> list[Path]:
    """Curves, confusion matrices and a Markdown report with the plots embedded."""
    from train.metrics.plots import plot_confusion_matrix, plot_metric_confidence, plot_pr_curve, plot_training_curves

    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    keys = ["train_loss", "val_loss", cfg.metric] + (["val_mdice"] if cfg.task == "semantic" else ["val_segm_mAP50"])
    plots.append(plot_training_curves(history, [k for k in keys if any(k in h for h in history)], out / "training_curves.png"))
    if cfg.task == "semantic":
        plots.append(plot_confusion_matrix(holdout["confusion_matrix"], class_names, out / "confusion_matrix.png"))
    else:
        names_bg = ["background"] + class_names[1:]
        plots.append(plot_confusion_matrix(holdout["confusion_matrix"], names_bg, out / "confusion_matrix.png"))
        plots.append(plot_pr_curve(holdout["curves"], class_names, out / "pr_curve.png"))
        for key in ("precision", "recall", "f1"):
            plots.append(plot_metric_confidence(holdout["curves"], key, class_names, out / f"{key}_confidence.png"))
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(holdout["metrics"].items()) if isinstance(v, float))
    last = history[-1] if history else {}
    report = [
        f"# segloop training report — {cfg.model} on {cfg.dataset_name}",
        "",
        f"Epochs run: {len(history)} of {cfg.epochs}; workers: {cfg.num_workers}; best {cfg.metric}: "
        f"{max((h.get(cfg.metric, -1) for h in history), default=float('nan')):.4f}; "
        f"last epoch {last.get('images_per_s', 0):.1f} img/s.",
        "",
        f"**Promotion:** {decision_text}",
        "",
        "## Held-out metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        rows,
        "",
        "## Plots",
        "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]
    md = out / "report.md"
    md.write_text("\n".join(report) + "\n")
    np.save(out / "holdout_confusion_matrix.npy", holdout["confusion_matrix"])
    return plots + [md]


def example_image(root: Path, cfg: TrainConfig) -> np.ndarray:
    """A real input example (the first held-out image, uint8 [1,H,W,3]) for the model signature."""
    from train.loop import holdout_dataset

    ds = holdout_dataset(cfg, root)
    ds.transforms = None
    image, _ = ds[0]
    return image.permute(1, 2, 0).numpy()[None]


# ----------------------------------------------------------------------------- registry & promotion
@dataclass
class Promotion:
    version: str
    holdout: dict[str, float]
    promoted: bool
    reason: str


def evaluate_and_promote(cfg: TrainConfig, root: Path, ds_info: dict[str, str], state: dict[str, Any],
                         history: list[dict], num_classes: int, class_names: list[str], use_gpu: bool) -> Promotion:
    """Steps 3-4 on the active MLflow run: held-out eval, champion comparison, register, promote, report.

    Shared by ``run`` and ``python -m tune --register-best``, so a tuned model is judged
    exactly like a trained one.
    """
    import mlflow

    from train import registry

    # held-out evaluation of the challenger and, on the same data, of the champion
    holdout = run_remote(evaluate_on_holdout, use_gpu, cfg.model_dump(mode="json"), str(root),
                         state["model"], num_classes, class_names)
    challenger_score = holdout["metrics"][cfg.metric]
    mlflow.log_metrics({f"holdout_{k.removeprefix('val_')}": v for k, v in holdout["metrics"].items()
                        if isinstance(v, float) and math.isfinite(v)})
    mlflow.log_metric("epochs_run", len(history))

    champ_version = registry.champion_version(cfg.registered_model)
    champ_score = None
    if champ_version is not None:
        champ = run_remote(evaluate_on_holdout, use_gpu, cfg.model_dump(mode="json"), str(root),
                           ("registry", cfg.registered_model, champ_version, mlflow.get_tracking_uri()), num_classes, class_names, False)
        champ_score = champ["metrics"][cfg.metric]
    promoted, reason = registry.decide(challenger_score, champ_score, cfg.promotion_margin)
    if not cfg.promote:
        promoted, reason = False, "promotion disabled (promote=false); " + reason

    meta = registry.ModelMeta(model=cfg.model, task=cfg.task, num_classes=num_classes, class_names=class_names,
                              image_size=cfg.image_size, model_kwargs=cfg.model_kwargs, metric=cfg.metric,
                              dataset=ds_info)
    version = registry.log_model(state["model"], meta, cfg.registered_model, example_image(root, cfg))
    decision = registry.Decision(promoted, version, challenger_score, champ_version, champ_score,
                                 cfg.promotion_margin, cfg.metric, reason)
    registry.record_decision(cfg.registered_model, decision)
    with tempfile.TemporaryDirectory() as d:
        files = write_artifacts(Path(d), cfg, history, holdout, class_names,
                                f"{'promoted' if promoted else 'not promoted'} — {reason}")
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="report")
        (Path(d) / "decision.json").write_text(json.dumps(asdict(decision), indent=2))
        mlflow.log_artifact(str(Path(d) / "decision.json"))
    mlflow.set_tags({"segloop.model_version": version, "segloop.decision": "promoted" if promoted else "rejected",
                     "segloop.reason": reason})
    verdict = "promoted to champion" if promoted else "not promoted"
    print(f"model {cfg.registered_model} v{version}: holdout {cfg.metric}={challenger_score:.4f} "
          f"(champion {'-' if champ_score is None else f'v{champ_version} {champ_score:.4f}'}) -> {verdict}: {reason}",
          flush=True)
    return Promotion(version, holdout["metrics"], promoted, reason)


# ----------------------------------------------------------------------------- the job
def run(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate, register and (maybe) promote; see the module docstring."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train import tracking
    from train.loop import load_checkpoint_state, train_loop_per_worker
    from train.models import model_task

    if model_task(cfg.model) != cfg.task:
        raise ConfigError(f"model {cfg.model!r} is a {model_task(cfg.model)} model but task is {cfg.task!r}")
    root, ds_info = resolve_dataset(cfg)
    num_classes, class_names = dataset_classes(cfg, root)
    uri, exp_id = tracking.setup(cfg.data_dir, cfg.experiment)
    connect_ray()
    use_gpu = want_gpu(cfg)
    check_resources(cfg, use_gpu)

    run_name = cfg.run_name or f"{cfg.dataset_name}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracking.find_run(exp_id, run_name) if cfg.run_name else None
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, experiment_id=exp_id)
    run_id = active.info.run_id
    try:
        mlflow.set_tags({"segloop.run_name": run_name, "segloop.task": cfg.task, "segloop.model": cfg.model})
        if not mlflow.get_run(run_id).data.params:
            mlflow.log_params(tracking.flatten_params(cfg.model_dump(mode="json")))
            mlflow.log_params({"num_classes": num_classes, "use_gpu_resolved": use_gpu})
            tracking.log_dataset(ds_info)
        loop_config = cfg.model_dump(mode="json") | {
            "dataset_path": str(root), "mlflow_run_id": run_id, "mlflow_tracking_uri": uri,
            "num_classes": num_classes, "class_names": class_names,
        }
        storage = Path(cfg.data_dir).resolve() / "ray_results"
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep,
                                                   checkpoint_score_attribute=cfg.metric,
                                                   checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(cfg.metric, -math.inf))
        state = load_checkpoint_state(best_ckpt)
        last_state = load_checkpoint_state(result.checkpoint) if result.checkpoint else state
        history = last_state["history"]

        promo = evaluate_and_promote(cfg, root, ds_info, state, history, num_classes, class_names, use_gpu)
        mlflow.end_run("FINISHED")
        return TrainResult(run_id, run_name, promo.version, dict(best_metrics), promo.holdout, promo.promoted,
                           promo.reason, len(history))
    except BaseException:
        mlflow.end_run("FAILED")
        raise
