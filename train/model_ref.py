"""How a segloop model is named and described: model URIs and :class:`ModelMeta`.

Light (no torch): the Serve ingress and the control plane validate URIs with it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

WEIGHTS_FILE = "state_dict.pt"
META_FILE = "segloop_model.json"
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?$")


def is_registry_uri(uri: str | None) -> bool:
    """A ``models:`` URI (a registered model) rather than a checkpoint path."""
    return bool(uri) and uri.startswith("models:")


def parse_model_uri(uri: str) -> tuple[str, str, str | None]:
    """``models:/NAME@alias`` -> ("registry", NAME, alias); ``models:/NAME/3`` -> ("registry", NAME, "3");
    ``models:/NAME`` -> the champion; ``checkpoint:/path.pt`` -> ("checkpoint", path, None)."""
    if uri.startswith("checkpoint:"):
        path = uri[len("checkpoint:") :]
        if path.startswith("//"):  # checkpoint:///abs/path
            path = path[2:]
        if not path:
            raise ValueError(f"model_uri {uri!r} names no checkpoint file")
        return "checkpoint", path, None
    m = MODELS_URI.match(uri)
    if not m:
        raise ValueError(
            f"model_uri {uri!r} is not 'models:/NAME@ALIAS', 'models:/NAME/VERSION' or 'checkpoint:/path/to/file.pt'"
        )
    return "registry", m["name"], m["version"] or m["alias"] or "champion"


@dataclass
class ModelMeta:
    """What serving and evaluation need to rebuild and feed a model."""

    model: str
    task: str
    num_classes: int
    class_names: list[str]
    image_size: int
    model_kwargs: dict = field(default_factory=dict)
    metric: str = "val_miou"
    dataset: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> ModelMeta:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))
