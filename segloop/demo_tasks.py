"""What differs between the pets demo and the instance (COCO8-seg) demo: data, splits, model, sizes.

``segloop demo`` runs the same narrated loop for both; each :class:`DemoTask` says how to
generate its two styles of data, where its images and splits are, and how to train it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segloop.errors import ConfigError


@dataclass(frozen=True)
class DemoSizes:
    """The task's defaults for the demo's size flags (each can be set on the command line)."""

    size: int
    n: int
    shift_n: int
    epochs: int
    annotate: int


@dataclass(frozen=True)
class DemoTask:
    """The pets (semantic) demo; :class:`CocoDemo` overrides what instances need."""

    name: str = "pets"
    task: str = "semantic"
    holdout_split: str = "test"  # the split promotion compares on (16 shifted captures join it)
    train_split: str = "trainval"  # where the annotated batch goes
    score: str = "mIoU"
    serve: tuple[tuple[str, Any], ...] = ()  # model settings of the Serve app beyond the defaults
    alert_margin: float = 0.05  # the rules fire this far below/above the normal traffic's mean
    sizes: DemoSizes = DemoSizes(size=64, n=160, shift_n=160, epochs=12, annotate=48)

    @property
    def registered_model(self) -> str:
        return f"segloop-{self.name}"

    def describe_data(self, n: int, shift_n: int) -> str:
        return f"default-style pets ({n}) and shifted-style pets ({shift_n}) in the Oxford-IIIT Pet layout"

    def generate(self, out: Path, n: int, seed: int, size: int, shift: bool) -> Path:
        from train.data.synth import generate_pets

        return generate_pets(out, n=n, seed=seed, size=size, shift=shift)

    def images(self, root: Path, split: str) -> list[Path]:
        """The split's image files, in the layout's order."""
        lines = (root / "annotations" / f"{split}.txt").read_text().splitlines()
        return [root / "images" / f"{ln.split()[0]}.jpg" for ln in lines if ln.strip()]

    def train_config(self, size: int, epochs: int, use_gpu: bool) -> dict[str, Any]:
        """The TrainConfig fields of v1 (the retraining job reuses them on the new version)."""
        return dict(task="semantic", image_size=size, epochs=epochs, batch_size=8, lr=0.01, num_workers=2)

    def retrain_changes(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """How the monitor's retraining job differs from v1's run (pets: not at all, from scratch)."""
        return {}


@dataclass(frozen=True)
class CocoDemo(DemoTask):
    """Instances on generated shapes: YOLO-seg files as COCO8-seg ships them, plus COCO JSON."""

    name: str = "coco"
    task: str = "instance"
    holdout_split: str = "val"
    train_split: str = "train"
    score: str = "segm mAP50-95"
    # Detections under 0.1 are not returned: a weak model's many near-0.05 boxes would otherwise
    # dominate the confidence and entropy that the alert and the capture watch.
    serve: tuple[tuple[str, Any], ...] = (("score_threshold", 0.1),)
    # measured: v1's mean instance uncertainty rises 0.694 -> 0.791 on shifted traffic; the smaller
    # margin leaves room for the weaker v1 of a shorter run (the end-to-end test's)
    alert_margin: float = 0.03
    sizes: DemoSizes = DemoSizes(size=96, n=160, shift_n=128, epochs=10, annotate=48)

    def describe_data(self, n: int, shift_n: int) -> str:
        return (
            f"default-style shapes ({n}) in the COCO8-seg layout (data.yaml, images/, YOLO-seg polygon labels/), "
            f"converted to COCO JSON for versioning; shifted-style shapes ({shift_n}) in COCO JSON"
        )

    def generate(self, out: Path, n: int, seed: int, size: int, shift: bool) -> Path:
        from train.data.synth import generate_coco
        from train.data.yolo import yolo_to_coco

        if shift:
            return generate_coco(out, n=n, seed=seed, size=size, shift=True, fmt="coco")
        root = generate_coco(out, n=n, seed=seed, size=size, fmt="yolo")
        for split in ("train", "val"):  # what the dataset version and the annotation import read
            yolo_to_coco(root, split, root / "annotations" / f"instances_{split}.json")
        return root

    def images(self, root: Path, split: str) -> list[Path]:
        return sorted((root / "images" / split).glob("*.jpg"))

    def train_config(self, size: int, epochs: int, use_gpu: bool) -> dict[str, Any]:
        if use_gpu:  # the seed's model on a GPU
            return dict(
                task="instance", model="maskrcnn_resnet50_fpn_v2", model_kwargs={"min_size": 2 * size},
                image_size=size, epochs=epochs, batch_size=8, lr=0.0005, num_workers=1,
            )  # fmt: skip
        # the slim Mask R-CNN: on 2 cores about 5 s per 100 images (plain torch), 9 s inside Ray Train
        return dict(
            task="instance", model="maskrcnn_mobilenet_v3_large_fpn_slim", image_size=size, epochs=epochs,
            batch_size=4, lr=0.001, num_workers=1, cpus_per_worker=2, precise_bn_images=64,
        )  # fmt: skip

    def retrain_changes(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Fine-tune the champion (pinned when the job starts) for half the epochs at a third of the rate."""
        return {
            "init_checkpoint": f"models:/{self.registered_model}@champion",
            "epochs": max(2, cfg["epochs"] // 2),
            "lr": round(cfg["lr"] / 3, 6),
        }


TASKS: dict[str, DemoTask] = {t.name: t for t in (DemoTask(), CocoDemo())}


def demo_task(name: str) -> DemoTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown demo task {name!r}; expected one of {', '.join(TASKS)}") from None
