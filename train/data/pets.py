"""Oxford-IIIT Pet reader (semantic segmentation).

Layout (as shipped by the Oxford VGG group, and as ``train.data.synth`` writes it)::

    ROOT/images/<name>.jpg
    ROOT/annotations/trimaps/<name>.png      1=pet, 2=background, 3=border
    ROOT/annotations/trainval.txt, test.txt  "<name> <class_id> <species> <breed_id>"

Trimap values are remapped so that 0 is background (what losses, metrics and the
serving colour map expect): 0=background, 1=pet, 2=border, or 255 (ignored by the
loss) with ``border="ignore"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segloop.errors import DatasetError

SEMANTIC_CLASSES = ("background", "pet", "border")
IGNORE_INDEX = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

Transform = Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]


def trimap_lut(border: Literal["class", "ignore"] = "class") -> np.ndarray:
    """Lookup table from raw trimap values to labels; invalid values map to -1."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[1], lut[2], lut[3] = 1, 0, (2 if border == "class" else IGNORE_INDEX)
    return lut


def read_split_list(path: Path) -> list[str]:
    """Names in an Oxford split list (first token of each non-comment line)."""
    if not path.is_file():
        raise DatasetError(
            f"split list {path} does not exist (expected the Oxford-IIIT Pet layout: "
            f"ROOT/annotations/<split>.txt with lines '<name> <class_id> <species> <breed_id>')"
        )
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.split()[0])
    if not names:
        raise DatasetError(f"split list {path} is empty: expected one sample name per line")
    return names


def load_rgb(path: Path) -> torch.Tensor:
    """Read an image file as a uint8 [3,H,W] RGB tensor (grey/CMYK/RGBA are converted)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"image {path} cannot be read: {err}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_trimap(path: Path) -> np.ndarray:
    """Raw trimap values as a [H,W] array; colour PNGs are rejected rather than guessed at."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"trimap {path} has mode {im.mode}; expected a single-channel PNG "
                    f"with values 1 (pet), 2 (background), 3 (border)"
                )
            return np.asarray(im).astype(np.int64)
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"trimap {path} cannot be read: {err}") from None


class OxfordPetDataset(Dataset):
    """Oxford-IIIT Pet trimaps as ``(uint8 image [3,H,W], int64 mask [H,W])`` pairs.

    Cheap checks (split list present and non-empty, every listed image and trimap
    present) run at construction so a broken dataset fails before training starts;
    per-pixel checks run when an item is read.
    """

    class_names = SEMANTIC_CLASSES
    num_classes = len(SEMANTIC_CLASSES)
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        transforms: Transform | None = None,
        border: Literal["class", "ignore"] = "class",
    ) -> None:
        self.root = Path(root)
        if border not in ("class", "ignore"):
            raise DatasetError(f"border must be 'class' or 'ignore', got {border!r}")
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist")
        self.split = split
        self.transforms = transforms
        self.border = border
        self._lut = trimap_lut(border)
        self.image_dir = self.root / "images"
        self.trimap_dir = self.root / "annotations" / "trimaps"
        self.names = read_split_list(self.root / "annotations" / f"{split}.txt")
        self.images = [self._find_image(n) for n in self.names]
        self.trimaps = []
        for name in self.names:
            t = self.trimap_dir / f"{name}.png"
            if not t.is_file():
                raise DatasetError(f"image {name} (listed in {split}.txt) has no trimap: {t} does not exist")
            self.trimaps.append(t)

    def _find_image(self, name: str) -> Path:
        for ext in IMAGE_EXTS:
            p = self.image_dir / f"{name}{ext}"
            if p.is_file():
                return p
        raise DatasetError(
            f"sample {name} (listed in {self.split}.txt) has no image: "
            f"{self.image_dir / (name + '.jpg')} does not exist"
        )

    def __len__(self) -> int:
        return len(self.names)

    def load_target(self, index: int) -> torch.Tensor:
        """The label mask of sample ``index`` (no transforms), validated."""
        path = self.trimaps[index]
        raw = read_trimap(path)
        bad = (raw < 0) | (raw > 255)
        raw = np.where(bad, 0, raw)
        labels = self._lut[raw]
        if bad.any() or (labels < 0).any():
            values = sorted(set(np.unique(np.where(bad, -1, raw)).tolist()) - {1, 2, 3})
            raise DatasetError(
                f"trimap {path} has values {values[:10]}; expected only 1 (pet), 2 (background), 3 (border)"
            )
        return torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb(self.images[index])
        target = self.load_target(index)
        if tuple(image.shape[-2:]) != tuple(target.shape):
            raise DatasetError(
                f"trimap {self.trimaps[index]} is {target.shape[1]}x{target.shape[0]} but image "
                f"{self.images[index]} is {image.shape[2]}x{image.shape[1]}; they must have the same size"
            )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"OxfordPetDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, border={self.border!r})"
