"""The training job's config (``segloop train --config X.yaml key=value ...``).

Loading, overrides and validation are :mod:`segloop.config`'s, shared by every entry point.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from train.model_ref import is_registry_uri, parse_model_uri

# --------------------------------------------------------------------------------------
# The training job's config (``python -m train --config X.yaml key=value ...``).
# --------------------------------------------------------------------------------------


# Held-out metrics a promotion may compare (higher is better); the first is the task's default.
PROMOTION_METRICS: dict[str, tuple[str, ...]] = {
    "semantic": ("val_miou", "val_mdice", "val_pixel_acc"),
    "instance": (
        "val_segm_mAP50-95",
        "val_fitness",
        "val_segm_mAP50",
        "val_segm_mAP75",
        "val_bbox_mAP50-95",
        "val_bbox_mAP50",
    ),
}


class TrainConfig(BaseModel):
    """Everything one training run needs; recorded whole as MLflow params."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    task: Literal["semantic", "instance"] = "semantic"
    dataset: Optional[str] = Field(None, description="local dataset directory (Oxford-Pet or COCO/YOLO-seg layout)")
    dataset_version: Optional[str] = Field(
        None, description="dataset version id (or unique prefix) in the object store"
    )
    dataset_name: str = Field("pets", description="dataset name in the object store / MLflow")
    border: Literal["class", "ignore"] = "class"
    val_fraction: float = Field(0.2, gt=0, lt=1, description="semantic: part of trainval held for validation")
    holdout_split: Optional[str] = Field(None, description="split used for promotion (default: test / val)")
    # model
    model: str = "lraspp_mobilenet_v3_large"
    weights: Optional[str] = None
    weights_backbone: Optional[str] = None
    init_checkpoint: Optional[str] = Field(
        None,
        description="start from these weights (fine-tuning): a registered model (models:/NAME@champion, "
        "models:/NAME/3; pinned to one version when the run starts) or a checkpoint file every worker can read",
    )
    model_kwargs: dict = Field(default_factory=dict)
    image_size: int = Field(128, ge=32, le=4096)
    bn_momentum: Optional[float] = Field(
        None, gt=0, le=1, description="override BatchNorm momentum of the running statistics during training"
    )
    precise_bn_images: int = Field(
        1024,
        ge=0,
        description="before each validation, recompute BatchNorm statistics over up to this many training "
        "images per worker (0 = off: keep the running averages, which lag the weights in short runs)",
    )
    # optimisation
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "poly", "step", "none"] = "cosine"
    ce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    patience: int = Field(5, ge=0, description="early stopping: epochs without improvement (0 = off)")
    seed: int = 0
    # scale
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes)")
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    amp: bool = Field(True, description="mixed precision (only on GPU)")
    cpus_per_worker: float = Field(1, gt=0)
    loader_workers: int = Field(0, ge=0)
    # tracking & registry
    experiment: str = "segloop"
    registered_model: str = "segloop-pets"
    run_name: Optional[str] = Field(None, description="re-running with the same name resumes")
    promote: bool = True
    promotion_margin: float = Field(0.0, ge=0, description="challenger must beat champion by this much")
    promotion_metric: Optional[str] = Field(
        None,
        description="held-out metric compared for promotion (default: val_miou for semantic, "
        "val_segm_mAP50-95 for instance; e.g. val_fitness to promote on the checkpoint score)",
    )
    # storage
    data_dir: str = Field(".segloop", description="local home of MLflow's SQLite file, artifacts, Ray results")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)
    # test hook: raise in the training loop at this epoch (only on a fresh, non-resumed attempt)
    fail_at_epoch: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("ce_weight and dice_weight cannot both be 0")
        if not self.dataset and not self.dataset_version:
            raise ValueError("set either `dataset` (a local directory) or `dataset_version` (an object-store version)")
        if is_registry_uri(self.init_checkpoint):
            parse_model_uri(self.init_checkpoint)  # its ValueError names the accepted forms
        allowed = PROMOTION_METRICS[self.task]
        if self.promotion_metric is not None and self.promotion_metric not in allowed:
            raise ValueError(
                f"promotion_metric {self.promotion_metric!r} is not a held-out metric of task {self.task!r}; "
                f"expected one of {', '.join(allowed)}"
            )
        return self

    @property
    def metric(self) -> str:
        """The validation metric that selects checkpoints, early-stops and promotes."""
        return "val_miou" if self.task == "semantic" else "val_fitness"

    @property
    def promotion_key(self) -> str:
        """The held-out metric a challenger must beat the champion on (same data, same code)."""
        return self.promotion_metric or PROMOTION_METRICS[self.task][0]
