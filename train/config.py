"""Typed configs loadable from YAML and overridable from the command line.

Every entry point (``python -m train``, ``python -m tune``, the Serve app builder)
has exactly one pydantic model as its config. ``load_config`` reads a YAML file,
applies ``key=value`` / ``a.b=value`` overrides (values parsed as YAML, so
``lr=1e-3`` is a float and ``use_gpu=auto`` a string) and validates the result;
every problem comes back as one :class:`~train.errors.ConfigError` listing each
bad key with what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (or be empty)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b=value`` overrides applied."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lr=0.001)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate ``data`` as ``cls``, turning pydantic errors into one readable ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "(root)"
            if e["type"] == "extra_forbidden":
                valid = ", ".join(sorted(_field_names(cls, e["loc"][:-1])))
                lines.append(f"  {loc}: unknown key (valid keys: {valid})")
            else:
                got = e.get("input")
                lines.append(f"  {loc}: {e['msg']} (got {got!r})")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Load ``cls`` from an optional YAML file plus command-line overrides."""
    data = read_yaml_mapping(path) if path else {}
    data = apply_overrides(data, overrides)
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write a config back to YAML (used to record the exact config of a run)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _field_names(cls: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}).keys())


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------
# The training job's config (``python -m train --config X.yaml key=value ...``).
# --------------------------------------------------------------------------------------

class TrainConfig(BaseModel):
    """Everything one training run needs; recorded whole as MLflow params."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    task: Literal["semantic", "instance"] = "semantic"
    dataset: Optional[str] = Field(None, description="local dataset directory (Oxford-Pet or COCO/YOLO-seg layout)")
    dataset_version: Optional[str] = Field(None, description="dataset version id (or unique prefix) in the object store")
    dataset_name: str = Field("pets", description="dataset name in the object store / MLflow")
    border: Literal["class", "ignore"] = "class"
    val_fraction: float = Field(0.2, gt=0, lt=1, description="semantic: part of trainval held for validation")
    holdout_split: Optional[str] = Field(None, description="split used for promotion (default: test / val)")
    # model
    model: str = "lraspp_mobilenet_v3_large"
    weights: Optional[str] = None
    weights_backbone: Optional[str] = None
    init_checkpoint: Optional[str] = Field(None, description="start from these weights (fine-tuning)")
    model_kwargs: dict = Field(default_factory=dict)
    image_size: int = Field(128, ge=32, le=4096)
    bn_momentum: Optional[float] = Field(None, gt=0, le=1, description="override BatchNorm momentum (0.1 helps short runs)")
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
    # storage
    data_dir: str = Field(".segloop", description="local home of MLflow's SQLite file, artifacts, Ray results")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)
    # test hook: raise in the training loop at this epoch (only on a fresh, non-resumed attempt)
    fail_at_epoch: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("ce_weight and dice_weight cannot both be 0")
        if not self.dataset and not self.dataset_version:
            raise ValueError("set either `dataset` (a local directory) or `dataset_version` (an object-store version)")
        return self

    @property
    def metric(self) -> str:
        """The validation metric that selects checkpoints, early-stops and promotes."""
        return "val_miou" if self.task == "semantic" else "val_fitness"
