"""Helpers for the serving tests: untrained tiny models in MLflow or as checkpoint files, test images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SEMANTIC = {
    "model": "lraspp_mobilenet_v3_large",
    "class_names": ["background", "pet", "border"],
    "image_size": 64,
    "model_kwargs": {},
}
INSTANCE = {
    "model": "maskrcnn_mobilenet_v3_large_fpn",
    "class_names": ["background", "ball", "box", "tri"],
    "image_size": 96,
    "model_kwargs": {"min_size": 96, "max_size": 128, "box_detections_per_img": 10},
}


def register_model(
    data_dir: str | Path, registered: str, spec: dict, seed: int = 0, alias: str | None = "champion"
) -> str:
    """Build an untrained model from ``spec`` (seeded), log and register it; returns the version."""
    import mlflow
    import torch

    from train.models import build_model, model_task
    from train.registry import ModelMeta, log_model
    from train.tracking import setup

    setup(data_dir, "serve-tests")
    torch.manual_seed(seed)
    model = build_model(spec["model"], len(spec["class_names"]), **spec["model_kwargs"]).eval()
    meta = ModelMeta(
        model=spec["model"],
        task=model_task(spec["model"]),
        num_classes=len(spec["class_names"]),
        class_names=list(spec["class_names"]),
        image_size=spec["image_size"],
        model_kwargs=dict(spec["model_kwargs"]),
    )
    example = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    with mlflow.start_run(run_name=f"{registered}-{seed}"):
        version = log_model(model.state_dict(), meta, registered, example)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(registered, alias, version)
    return version


def save_checkpoint(path: Path, spec: dict, model=None, seed: int = 0) -> Path:
    """A checkpoint in train/loop.py's format (model state + config + classes) for ``checkpoint:`` URIs;
    ``model`` defaults to an untrained one built from ``spec`` (seeded)."""
    import torch

    from train.models import build_model, model_task

    if model is None:
        torch.manual_seed(seed)
        model = build_model(spec["model"], len(spec["class_names"]), **spec["model_kwargs"])
    config = {
        "model": spec["model"],
        "task": model_task(spec["model"]),
        "image_size": spec["image_size"],
        "model_kwargs": dict(spec["model_kwargs"]),
    }
    torch.save(
        {
            "model": model.state_dict(),
            "config": config,
            "num_classes": len(spec["class_names"]),
            "class_names": list(spec["class_names"]),
        },
        path,
    )
    return path


def image_bytes(seed: int = 0, size: tuple[int, int] = (64, 64), fmt: str = "JPEG", mode: str = "RGB", **save) -> bytes:
    """A synthetic pet image (train.data.synth) resized to ``size`` (w, h), encoded as ``fmt``."""
    from train.data.synth import render_pet

    img, _ = render_pet(seed, 64)
    img = img.resize(size)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def shapes_bytes(seed: int = 0, size: int = 96) -> bytes:
    from train.data.synth import render_shapes

    img, _ = render_shapes(seed, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
