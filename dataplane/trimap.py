"""The Oxford-IIIT Pet trimap rule, shared by the annotation formats and the data generator.

A trimap holds 1 = pet, 2 = background, 3 = border: a band of ``band_radius`` pixels on
each side of the pet's outline. Annotations drawn as a plain pet mask get their border
from the same rule the generator (``train.data.synth``) uses, so imported and generated
labels agree pixel for pixel.
"""

from __future__ import annotations

import numpy as np

PET, BACKGROUND, BORDER = 1, 2, 3


def band_radius(height: int, width: int) -> int:
    """Half-width of the border band: about 1/64 of the shorter side, at least 1 pixel."""
    return max(1, round(min(height, width) / 64))


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation with a disc of radius ``r`` (numpy only)."""
    h, w = mask.shape
    pad = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r:
                out |= pad[r + dy : r + dy + h, r + dx : r + dx + w]
    return out


def pet_trimap(mask: np.ndarray) -> np.ndarray:
    """Oxford trimap (uint8 [H, W], values 1/2/3) of a binary pet mask."""
    mask = np.asarray(mask).astype(bool)
    if mask.size == 0:
        return np.full(mask.shape, BACKGROUND, np.uint8)
    r = band_radius(*mask.shape)
    band = dilate(mask, r) & dilate(~mask, r)  # dilation minus erosion
    trimap = np.where(mask, PET, BACKGROUND).astype(np.uint8)
    trimap[band] = BORDER
    return trimap
