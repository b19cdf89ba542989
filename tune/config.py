"""The search's config: a base training config, a search space over its fields, ASHA settings.

``python -m tune --config configs/tune_pets.yaml [key=value ...]`` reads one YAML file::

    base: pets.yaml              # a TrainConfig mapping, or a path to a train YAML
    space:                       # TrainConfig field -> distribution
      lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      batch_size: {type: choice, values: [8, 16]}
    num_samples: 8
    grace_period: 1

Every problem (an empty or malformed space, a name that is not a tunable TrainConfig
field, a range the training config would reject, ``num_samples < 1``) is one
:class:`~segloop.errors.ConfigError` raised here, before Ray or MLflow is touched.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segloop.config import apply_overrides, read_yaml_mapping, validate
from segloop.errors import ConfigError
from train.config import TrainConfig

SPACE_TYPES = ("loguniform", "uniform", "choice", "randint", "quniform")

# TrainConfig fields a search may vary. Everything else (data, scale, tracking, storage) is
# fixed by the base config: trials must be comparable and fit the same resources, and
# ``epochs`` is ASHA's ``max_t``.
TUNABLE = (
    "model",
    "image_size",
    "bn_momentum",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "scheduler",
    "ce_weight",
    "dice_weight",
    "seed",
)


def tunable_fields() -> list[str]:
    """The tunable names this TrainConfig actually has."""
    return [n for n in TUNABLE if n in TrainConfig.model_fields]


class ParamSpec(BaseModel):
    """One hyperparameter's distribution (``randint`` excludes ``high``, like ``ray.tune.randint``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["loguniform", "uniform", "choice", "randint", "quniform"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Any]] = None
    q: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("type choice needs a non-empty list `values`")
            if self.low is not None or self.high is not None or self.q is not None:
                raise ValueError("type choice takes only `values` (no low/high/q)")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type} takes low/high, not `values`")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs both `low` and `high`")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.type == "quniform" and self.q is None:
            raise ValueError("quniform needs `q` (the step)")
        if self.type != "quniform" and self.q is not None:
            raise ValueError(f"`q` only applies to quniform, not {self.type}")
        if self.type == "randint" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"randint needs integer low/high (got {self.low}, {self.high})")
        return self

    def edge_values(self, kind: str) -> list[Any]:
        """Values a sample can take at the edges of the range (checked against TrainConfig)."""
        if self.type == "choice":
            return list(self.values or [])
        assert self.low is not None and self.high is not None
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [int(self.low), int(self.high)] if kind == "int" else [self.low, self.high]

    def can_be_zero(self) -> bool:
        if self.type == "choice":
            return any(v == 0 for v in self.values or [])
        assert self.low is not None and self.high is not None
        return self.low <= 0 <= self.high


class SearchConfig(BaseModel):
    """Everything one hyperparameter search needs (``python -m tune``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base: Union[dict, str] = Field(description="TrainConfig mapping, or path to a train YAML")
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    num_samples: int = Field(8, ge=1, description="trials to sample")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="default: as many as the cluster fits")
    metric: Optional[str] = Field(None, description="default: the base config's validation metric")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor of trials per rung")
    max_t: Optional[int] = Field(None, ge=1, description="ASHA: epochs of a full trial (default: base epochs)")
    name: Optional[str] = Field(None, description="experiment name; re-running a name resumes it")
    seed: Optional[int] = Field(None, description="seed of the random search (reproducible samples)")
    register_best: bool = Field(False, description="register the best trial's model and run promotion")
    trial_max_failures: int = Field(0, ge=-1, description="Tune-level retries of a trial whose driver died")
    resume: bool = Field(False, description="require an existing experiment `name` to resume")


@dataclass
class ResolvedSearch:
    """A validated search: the base TrainConfig object plus the checked space."""

    search: SearchConfig
    base: TrainConfig
    metric: str
    max_t: int


def _field_kind(name: str) -> str:
    """``int`` / ``float`` / ``categorical`` from the TrainConfig annotation."""
    ann = TrainConfig.model_fields[name].annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is Union and len(args) == 1:
        ann = args[0]
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    return "categorical"


def _check_space(space: dict[str, ParamSpec], base: dict[str, Any]) -> None:
    if not space:
        raise ConfigError(
            "search space is empty: give at least one hyperparameter under `space`, e.g. "
            "`lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}`"
        )
    valid = tunable_fields()
    problems = []
    for name, spec in space.items():
        if name not in TrainConfig.model_fields:
            problems.append(f"  space.{name}: unknown hyperparameter (tunable: {', '.join(valid)})")
            continue
        if name not in valid:
            why = " (it is ASHA's max_t; set it in `base`)" if name == "epochs" else ""
            problems.append(f"  space.{name}: not tunable{why}; fix it in `base` (tunable: {', '.join(valid)})")
            continue
        kind = _field_kind(name)
        if kind == "categorical" and spec.type != "choice":
            problems.append(f"  space.{name}: {spec.type} does not fit a categorical field, use type choice")
            continue
        if kind == "int" and spec.type in ("loguniform", "uniform"):
            problems.append(f"  space.{name}: integer field, use randint, quniform or choice (not {spec.type})")
            continue
        if (
            kind == "int"
            and spec.type == "quniform"
            and not all(float(v).is_integer() for v in (spec.low, spec.high, spec.q))
        ):
            problems.append(f"  space.{name}: integer field, quniform needs integer low/high/q")
            continue
        for value in spec.edge_values(kind):
            try:
                TrainConfig.model_validate({**base, name: value})
            except ValidationError as err:  # report the first message
                msg = err.errors()[0]["msg"]
                problems.append(f"  space.{name}: value {value!r} is not a valid {name}: {msg}")
                break
    if problems:
        raise ConfigError("invalid search space:\n" + "\n".join(problems))
    ce_zero = space["ce_weight"].can_be_zero() if "ce_weight" in space else base.get("ce_weight", 1.0) == 0
    dice_zero = space["dice_weight"].can_be_zero() if "dice_weight" in space else base.get("dice_weight", 0.5) == 0
    if ce_zero and dice_zero:
        raise ConfigError("invalid search space: ce_weight and dice_weight can both be 0 in one trial")


def _check_models(space: dict[str, ParamSpec], task: str) -> None:
    if "model" not in space:
        return
    from train.models import list_models

    names = list_models(task)
    bad = [v for v in space["model"].values or [] if v not in names]
    if bad:
        raise ConfigError(
            f"invalid search space:\n  space.model: {bad} are not {task} models (choose from {', '.join(names)})"
        )


def resolve(search: SearchConfig) -> ResolvedSearch:
    """Check the space against the base TrainConfig; fill metric and max_t defaults."""
    if not isinstance(search.base, dict):
        raise ConfigError("`base` must be a TrainConfig mapping here (load_search_config reads a path)")
    base = validate(TrainConfig, search.base, source="base config")
    base_dict = base.model_dump(mode="json")
    _check_space(search.space, base_dict)
    _check_models(search.space, base.task)
    max_t = search.max_t or base.epochs
    if max_t > base.epochs:
        raise ConfigError(f"max_t={max_t} is larger than the base config's epochs={base.epochs}")
    if search.grace_period > max_t:
        raise ConfigError(f"grace_period={search.grace_period} must be <= max_t={max_t} (epochs)")
    metric = search.metric or base.metric
    return ResolvedSearch(search=search, base=base, metric=metric, max_t=max_t)


def _resolve_base_path(raw: str, config_path: Path | None) -> Path:
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([config_path.parent / p] if config_path else [])
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"base config {raw!r} not found (looked at {', '.join(str(c) for c in candidates)})")


def _override_key(item: str) -> str:
    return item.partition("=")[0].strip().lstrip("-").replace("-", "_")


def load_search_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ResolvedSearch:
    """YAML file + ``key=value`` overrides -> a checked search.

    A ``base`` given as a path is read first, so ``base.lr=...`` overrides work either way.
    """
    config_path = Path(path) if path else None
    data = read_yaml_mapping(config_path) if config_path else {}
    whole_base = [o for o in overrides if _override_key(o) == "base"]
    data = apply_overrides(data, whole_base)
    if isinstance(data.get("base"), str):
        data["base"] = read_yaml_mapping(_resolve_base_path(data["base"], config_path))
    rest = [o for o in overrides if o not in whole_base]
    base_overrides = [o.removeprefix("base.") for o in rest if _override_key(o).startswith("base.")]
    if base_overrides:  # typed as TrainConfig, so a string field such as dataset_version stays text
        base = data.get("base")
        data["base"] = apply_overrides(base if isinstance(base, dict) else {}, base_overrides, TrainConfig)
    data = apply_overrides(data, [o for o in rest if not _override_key(o).startswith("base.")], SearchConfig)
    if "base" not in data:
        raise ConfigError(f"invalid {path or 'config'}:\n  base: missing (a TrainConfig mapping or a train YAML path)")
    if not isinstance(data.get("space", {}), dict):
        raise ConfigError(
            f"invalid {path or 'config'}:\n  space: must be a mapping of hyperparameter -> distribution "
            f"(got {type(data['space']).__name__})"
        )
    search = validate(SearchConfig, data, source=str(path) if path else "config")
    return resolve(search)


def to_tune_space(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """ParamSpecs -> ``ray.tune`` sample domains (integer fields sample integers)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, s in space.items():
        integer = _field_kind(name) == "int"
        if s.type == "choice":
            out[name] = tune.choice(list(s.values or []))
        elif s.type == "loguniform":
            out[name] = tune.loguniform(s.low, s.high)
        elif s.type == "uniform":
            out[name] = tune.uniform(s.low, s.high)
        elif s.type == "randint":
            out[name] = tune.randint(int(s.low), int(s.high))
        elif integer:
            out[name] = tune.qrandint(int(s.low), int(s.high), int(s.q))
        else:
            out[name] = tune.quniform(s.low, s.high, s.q)
    return out


def in_space(space: dict[str, ParamSpec], params: dict[str, Any]) -> bool:
    """Whether sampled ``params`` lie in ``space`` (used by tests and as a sanity check)."""
    if set(params) != set(space):
        return False
    for name, s in space.items():
        v = params[name]
        if s.type == "choice":
            if v not in (s.values or []):
                return False
        elif not (s.low - 1e-12 <= v <= s.high + 1e-12) or (s.type == "randint" and v >= s.high):
            return False
    return True


def space_summary(space: dict[str, ParamSpec]) -> dict[str, str]:
    """``{name: compact JSON of the spec}``: MLflow params of the parent run."""
    return {k: json.dumps(v.model_dump(exclude_none=True)) for k, v in space.items()}
