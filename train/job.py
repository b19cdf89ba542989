"""The training job's driver: checks, Ray Train, final evaluation, registry, promotion.

Run it with ``python -m train --config configs/pets.yaml`` locally or
``ray job submit --working-dir . -- python -m train --config configs/pets.yaml`` on a
cluster. Steps:

1. preflight (``train.run.prepare``) — model, dataset, MLflow and cluster resources are
   checked before any work;
2. ``TorchTrainer.fit`` (``train.run.make_trainer``) — ``train.loop.train_loop_per_worker`` on
   ``num_workers`` DDP workers, in an MLflow run that a re-run with the same ``run_name`` resumes;
3. final evaluation of the best checkpoint on the held-out split (a Ray task placed like a
   worker, so it gets a GPU when training had one) -> curves, confusion matrices, report;
4. the model is logged and registered, then compared with the champion on the same
   held-out data and promoted (alias ``champion``) only if it wins.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.config import TrainConfig
from train.run import DatasetSource, RunContext, fit, make_trainer, prepare, run_storage


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


# ----------------------------------------------------------------------------- evaluation
def evaluate_on_holdout(
    cfg_dict: dict,
    source: dict[str, Any],
    state: Any,
    num_classes: int,
    class_names: list[str],
    with_curves: bool = True,
) -> dict[str, Any]:
    """Score one set of weights on the held-out split; returns metrics + plot material.

    ``state`` is a state_dict or ``("registry", name, version, tracking_uri)``; runs as a Ray
    task on any node, which materialises the dataset (``source``, a :class:`DatasetSource` dict).
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
        model, meta, _ = load_version(state[1], state[2])
        cfg = cfg.model_copy(update={"image_size": meta.image_size})  # scored with its own input size
    else:
        model = build_model(cfg.model, num_classes, **cfg.model_kwargs)
        model.load_state_dict(state)
    model.to(device).eval()
    ds = holdout_dataset(cfg, DatasetSource(**source).local_path())
    loader = make_loader(ds, cfg, shuffle=False, task=cfg.task)
    amp = cfg.amp and device.type == "cuda"
    if cfg.task == "semantic":
        metrics, cm = evaluate_semantic(
            model,
            loader,
            device,
            num_classes=num_classes,
            class_names=class_names,
            amp=amp,
            ignore_index=ds.ignore_index,
        )
        return {"metrics": metrics, "confusion_matrix": cm.mat.cpu().numpy()}
    metrics, extras = evaluate_instance(
        model,
        loader,
        device,
        coco_gt=ds.coco,
        label_to_cat_id=ds.label_to_cat_id,
        num_classes=num_classes,
        with_loss=False,
        with_curves=with_curves,
        amp=amp,
    )
    out: dict[str, Any] = {"metrics": metrics}
    if with_curves:
        out["confusion_matrix"] = extras["confusion_matrix"].compute().cpu().numpy()
        out["curves"] = extras["curves"]
    return out


def run_remote(fn: Any, use_gpu: bool, *args: Any) -> Any:
    import ray

    return ray.get(ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(fn).remote(*args))


# ----------------------------------------------------------------------------- artifacts
def write_artifacts(
    out: Path,
    cfg: TrainConfig,
    history: list[dict],
    holdout: dict[str, Any],
    class_names: list[str],
    decision_text: str,
) -> list[Path]:
    """Curves, confusion matrices and a Markdown report with the plots embedded."""
    from train.metrics.plots import plot_confusion_matrix, plot_metric_confidence, plot_pr_curve, plot_training_curves

    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    keys = ["train_loss", "val_loss", cfg.metric] + (["val_mdice"] if cfg.task == "semantic" else ["val_segm_mAP50"])
    plots.append(
        plot_training_curves(history, [k for k in keys if any(k in h for h in history)], out / "training_curves.png")
    )
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


def evaluate_and_promote(cfg: TrainConfig, ctx: RunContext, state: dict[str, Any], history: list[dict]) -> Promotion:
    """Steps 3-4 on the active MLflow run: held-out eval, champion comparison, register, promote, report.

    Shared by ``run`` and ``python -m tune --register-best``, so a tuned model is judged
    exactly like a trained one.
    """
    holdout = score_on_holdout(cfg, ctx, state["model"])
    challenger_score = holdout["metrics"][cfg.promotion_key]
    version = register_model(cfg, ctx, state)
    decision = compare_and_promote(cfg, version, challenger_score, lambda v: score_champion(cfg, ctx, v))
    log_report(cfg, history, holdout, ctx.class_names, decision)
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    champ = "-" if decision.champion_score is None else f"v{decision.champion_version} {decision.champion_score:.4f}"
    print(
        f"model {cfg.registered_model} v{version}: holdout {cfg.promotion_key}={challenger_score:.4f} "
        f"(champion {champ}) -> {verdict}: {decision.reason}",
        flush=True,
    )
    return Promotion(version, holdout["metrics"], decision.promoted, decision.reason)


def compare_and_promote(
    cfg: TrainConfig, version: str, challenger_score: float, score_of: Callable[[str], float]
) -> Any:
    """Read and score (``score_of``) the champion, decide, move the alias — all under the model's
    promotion lock, so the champion compared is the one replaced.

    Fails closed: if the champion cannot be read or scored (MLflow locked or down, the lock
    held too long), the challenger is not promoted and the reason says why.
    """
    from train import registry

    champ_version, champ_score = None, None

    def decision(promoted: bool, reason: str) -> registry.Decision:
        return registry.Decision(
            promoted,
            version,
            challenger_score,
            champ_version,
            champ_score,
            cfg.promotion_margin,
            cfg.promotion_key,
            reason,
        )

    try:
        with registry.promotion_lock(cfg.registered_model):
            champ_version = registry.champion_version(cfg.registered_model)
            champ_score = None if champ_version is None else score_of(champ_version)
            promoted, reason = registry.decide(challenger_score, champ_score, cfg.promotion_margin)
            if not cfg.promote:
                promoted, reason = False, "promotion disabled (promote=false); " + reason
            decided = decision(promoted, reason)
            registry.record_decision(cfg.registered_model, decided)
            return decided
    except Exception as err:  # noqa: BLE001 - any failure here means "not compared", never "promoted"
        decided = decision(False, f"not promoted: the champion could not be compared ({type(err).__name__}: {err})")
    try:
        registry.record_decision(cfg.registered_model, decided)
    except Exception as err:  # noqa: BLE001 - the run's own tags still carry the decision
        print(f"warning: cannot tag {cfg.registered_model} v{version} with its decision: {err}", flush=True)
    return decided


def score_on_holdout(cfg: TrainConfig, ctx: RunContext, weights: dict[str, Any]) -> dict[str, Any]:
    """The challenger on the held-out split (a Ray task), logged as ``holdout_*`` metrics."""
    import mlflow

    holdout = run_remote(
        evaluate_on_holdout,
        ctx.use_gpu,
        cfg.model_dump(mode="json"),
        asdict(ctx.source),
        weights,
        ctx.num_classes,
        ctx.class_names,
    )
    mlflow.log_metrics(
        {
            f"holdout_{k.removeprefix('val_')}": v
            for k, v in holdout["metrics"].items()
            if isinstance(v, float) and math.isfinite(v)
        }
    )
    return holdout


def score_champion(cfg: TrainConfig, ctx: RunContext, version: str) -> float:
    """The champion's score on the same held-out data, with the same code."""
    import mlflow

    champ = run_remote(
        evaluate_on_holdout,
        ctx.use_gpu,
        cfg.model_dump(mode="json"),
        asdict(ctx.source),
        ("registry", cfg.registered_model, version, mlflow.get_tracking_uri()),
        ctx.num_classes,
        ctx.class_names,
        False,
    )
    return champ["metrics"][cfg.promotion_key]


def register_model(cfg: TrainConfig, ctx: RunContext, state: dict[str, Any]) -> str:
    """Log the weights as the run's model and register a new version; returns it."""
    from train import registry

    meta = registry.ModelMeta(
        model=cfg.model,
        task=cfg.task,
        num_classes=ctx.num_classes,
        class_names=ctx.class_names,
        image_size=cfg.image_size,
        model_kwargs=cfg.model_kwargs,
        metric=cfg.metric,
        dataset=ctx.dataset,
    )
    return registry.log_model(state["model"], meta, cfg.registered_model, example_image(ctx.root, cfg))


def log_report(
    cfg: TrainConfig, history: list[dict], holdout: dict[str, Any], class_names: list[str], decision: Any
) -> None:
    """Report, plots and decision as artifacts of the active run; the decision as its tags."""
    import mlflow

    promoted, reason = decision.promoted, decision.reason
    mlflow.log_metric("epochs_run", len(history))
    with tempfile.TemporaryDirectory() as d:
        files = write_artifacts(
            Path(d), cfg, history, holdout, class_names, f"{'promoted' if promoted else 'not promoted'} — {reason}"
        )
        for f in files:
            mlflow.log_artifact(str(f), artifact_path="report")
        (Path(d) / "decision.json").write_text(json.dumps(asdict(decision), indent=2))
        mlflow.log_artifact(str(Path(d) / "decision.json"))
    mlflow.set_tags(
        {
            "segloop.model_version": decision.challenger_version,
            "segloop.decision": "promoted" if promoted else "rejected",
            "segloop.reason": reason,
        }
    )


# ----------------------------------------------------------------------------- the job
def run(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate, register and (maybe) promote; see the module docstring."""
    import mlflow

    ctx = prepare(cfg)
    cfg = pin_init_checkpoint(cfg)
    run_name = cfg.run_name or f"{cfg.dataset_name}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = start_mlflow_run(cfg, ctx, run_name)
    try:
        trainer = make_trainer(
            cfg, ctx, run_id=run_id, name=run_name, storage=run_storage(cfg.data_dir), metric=cfg.metric
        )
        result = fit(trainer)
        state, best_metrics, history = best_checkpoint(result, cfg.metric)
        promo = evaluate_and_promote(cfg, ctx, state, history)
        mlflow.end_run("FINISHED")
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    return TrainResult(
        run_id, run_name, promo.version, best_metrics, promo.holdout, promo.promoted, promo.reason, len(history)
    )


def pin_init_checkpoint(cfg: TrainConfig) -> TrainConfig:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/V`` as it is now: every worker, and every restart
    after a failure, fine-tunes from the same weights, and the run's params say which."""
    from train.model_ref import is_registry_uri, parse_model_uri
    from train.registry import resolve_version

    if not is_registry_uri(cfg.init_checkpoint):
        return cfg
    _, name, ref = parse_model_uri(cfg.init_checkpoint)
    version = resolve_version(name, ref)
    print(f"fine-tuning from {cfg.init_checkpoint} = models:/{name}/{version}", flush=True)
    return cfg.model_copy(update={"init_checkpoint": f"models:/{name}/{version}"})


def start_mlflow_run(cfg: TrainConfig, ctx: RunContext, run_name: str) -> str:
    """Start (or, for a ``run_name`` seen before, resume) the MLflow run; params and dataset once."""
    import mlflow

    from train import tracking

    run_id = tracking.find_run(ctx.experiment_id, run_name) if cfg.run_name else None
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, experiment_id=ctx.experiment_id)
    try:
        mlflow.set_tags({"segloop.run_name": run_name, "segloop.task": cfg.task, "segloop.model": cfg.model})
        if not mlflow.get_run(active.info.run_id).data.params:
            mlflow.log_params(ctx.run_params(cfg))
            tracking.log_dataset(ctx.dataset)
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    return active.info.run_id


def best_checkpoint(result: Any, metric: str) -> tuple[dict[str, Any], dict[str, float], list[dict]]:
    """``(state, metrics)`` of the best kept checkpoint and the history of the last one."""
    from train.loop import load_checkpoint_state

    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(metric, -math.inf))
    state = load_checkpoint_state(best_ckpt)
    last_state = load_checkpoint_state(result.checkpoint) if result.checkpoint else state
    return state, dict(best_metrics), last_state["history"]
