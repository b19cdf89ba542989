"""What the format parsers share: the format names, how a path's format is told apart, and
the values they yield (a parsed annotation, not yet checked against its captured image;
a checked instance mask).

Parsers only read and shape; checking against the captured image happens once, in
:mod:`dataplane.annotation.importer`, for every format alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import numpy as np

from segloop.errors import DatasetError

if TYPE_CHECKING:
    from dataplane.annotation.coco import CocoImage

FORMATS = ("auto", "coco", "labelstudio", "trimaps")


@dataclass(frozen=True)
class ParsedAnnotation:
    """One sample's corrected annotation, not yet checked against its image."""

    capture_id: str
    where: str  # names the sample and where it came from, prefixes every problem
    kind: Literal["trimap", "regions", "coco"]  # trimap PNG, Label Studio polygons, COCO annotations
    payload: Union[Path, list, CocoImage]
    size: Optional[tuple[int, int]] = None  # (width, height) the annotation claims


@dataclass(frozen=True, eq=False)
class Instance:
    """One checked instance mask of an instance-task sample."""

    category: str
    mask: np.ndarray
    iscrowd: int = 0


def read_json(path: Path) -> Any:
    """The JSON in ``path``; DatasetError naming the file (and the position) otherwise."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"annotation file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"annotation file {path} cannot be read: {err}") from None


def detect_format(path: Path) -> str:
    """``trimaps`` (a directory of PNGs, or one with ``trimaps/``), ``labelstudio`` or ``coco``."""
    if path.is_dir():
        if (path / "trimaps").is_dir() or any(p.suffix.lower() == ".png" for p in path.iterdir()):
            return "trimaps"
        raise DatasetError(f"{path} is a directory without trimap PNGs (<id>.png) or a trimaps/ folder")
    if not path.is_file():
        raise DatasetError(f"annotation path {path} does not exist")
    data = read_json(path)
    if isinstance(data, list):
        return "labelstudio"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    raise DatasetError(
        f"{path}: not a Label Studio export (a JSON list of tasks) nor COCO JSON (images/annotations/categories)"
    )
