"""Typed configs loadable from YAML and overridable from the command line.

Every entry point (``python -m train``, ``python -m tune``, the Serve app builder)
has exactly one pydantic model as its config. ``load_config`` reads a YAML file,
applies ``key=value`` / ``a.b=value`` overrides (values parsed as YAML, so
``lr=1e-3`` is a float and ``use_gpu=auto`` a string — except for fields typed as
strings, which keep the text as written, so ``dataset_version=0123`` stays
``"0123"``) and validates the result;
every problem comes back as one :class:`~segloop.errors.ConfigError` listing each
bad key with what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from segloop.errors import ConfigError

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
        raise ConfigError(f"config file {p} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], schema: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b=value`` overrides applied.

    With ``schema``, a value for a string-typed field is kept as written: YAML would
    read a content id such as ``7197602178452887`` as an int (and ``0123`` as 123).
    """
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lr=0.001)")
        parts = key.split(".")
        value = _parse_value(raw, as_text=schema is not None and _is_text_field(schema, parts))
        node = out
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
    data = apply_overrides(data, overrides, cls)
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write a config back to YAML (used to record the exact config of a run)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _parse_value(raw: str, *, as_text: bool) -> Any:
    """YAML scalar parsing for an override value; ``as_text`` keeps anything but null as the text."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if as_text and value is not None:
        return raw.strip()
    return value


def _is_text_field(cls: type[BaseModel], parts: Sequence[str]) -> bool:
    """Whether ``a.b.c`` in ``cls`` is a field whose only non-None type is ``str``."""
    model: Any = cls
    for i, part in enumerate(parts):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        types = _non_none_types(field.annotation)
        if i == len(parts) - 1:
            return types == [str]
        models = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        if len(models) != 1:
            return False
        model = models[0]
    return False


def _non_none_types(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, UnionType):
        return [t for t in get_args(annotation) if t is not NoneType]
    return [annotation]


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
