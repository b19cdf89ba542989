"""Oxford trimaps, the semantic annotation format: ``trimaps/<id>.png`` with 1 pet,
2 background, 3 border. Export writes the model's prediction in it; import reads an
annotator's edited PNGs back (values must be exactly 1/2/3, size = image size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from dataplane.annotation.formats import ParsedAnnotation
from dataplane.capture import find_capture_id
from dataplane.masks import label_png, read_label_png
from dataplane.trimap import pet_trimap
from segloop.errors import DatasetError

# Oxford trimap values and the semantic class names they stand for.
TRIMAP_VALUES = {"pet": 1, "background": 2, "border": 3}


def trimap_from_pet_mask(mask: np.ndarray) -> np.ndarray:
    """Oxford trimap of a binary pet mask (the border band derived around its outline)."""
    return pet_trimap(mask)


def labels_to_trimap(labels: np.ndarray, class_names: Sequence[str], what: str) -> np.ndarray:
    """Class-index mask (indices into ``class_names`` = background/pet/border) -> trimap 1/2/3."""
    lut = np.full(256, 0, np.uint8)
    for i, name in enumerate(class_names):
        if name not in TRIMAP_VALUES:
            raise DatasetError(f"{what}: class {name!r} has no trimap value (known: {', '.join(TRIMAP_VALUES)})")
        lut[i] = TRIMAP_VALUES[name]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DatasetError(
            f"{what}: mask values {sorted(set(np.unique(labels).tolist()))[:10]} outside 0..{len(class_names) - 1}"
        )
    return lut[labels]


# ----------------------------------------------------------------------------- export


def predicted_trimap(
    labels: Optional[np.ndarray], class_names: Sequence[str], height: int, width: int, what: str
) -> np.ndarray:
    """The trimap of a predicted class-index mask; all background when the capture has none."""
    if labels is None:
        return np.full((height, width), 2, np.uint8)
    return labels_to_trimap(labels, class_names, what)


def write_trimap(trimap_dir: Path, capture_id: str, trimap: np.ndarray) -> None:
    (trimap_dir / f"{capture_id}.png").write_bytes(label_png(trimap))


# ----------------------------------------------------------------------------- import


def parse_trimaps(path: Path) -> list[ParsedAnnotation]:
    """One annotation per ``<capture id>.png`` in ``path`` (or ``path/trimaps/``)."""
    d = path / "trimaps" if (path / "trimaps").is_dir() else path
    anns = []
    for p in sorted(d.iterdir()):
        if p.suffix.lower() != ".png" or not p.is_file():
            continue
        cid = find_capture_id(p.stem) or p.stem
        anns.append(ParsedAnnotation(cid, f"sample {cid} ({p})", "trimap", p))
    if not anns:
        raise DatasetError(f"{d} holds no trimap PNGs named <capture id>.png")
    return anns


def read_trimap(file: Path, height: int, width: int, where: str) -> np.ndarray:
    """An annotator's trimap PNG, checked: single channel, the image's size, values 1/2/3."""
    try:
        raw = Path(file).read_bytes()
    except OSError as err:
        raise DatasetError(f"{where}: cannot read the file: {err.strerror or err}") from None
    arr = read_label_png(raw, where)
    if arr.shape != (height, width):
        raise DatasetError(f"{where}: mask is {arr.shape[1]}x{arr.shape[0]} but the image is {width}x{height}")
    bad = sorted(set(np.unique(arr).tolist()) - {1, 2, 3})
    if bad:
        raise DatasetError(f"{where}: trimap values {bad[:10]} are not 1 (pet), 2 (background) or 3 (border)")
    return arr.astype(np.uint8)
