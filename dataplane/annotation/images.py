"""Captured images as annotators see them: checked against their recorded sha256, and
oriented as the model saw them so annotations line up pixel for pixel.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from dataplane.annotation.records import CaptureRecord
from dataplane.masks import open_image
from dataplane.store import ObjectNotFound, ObjectStore
from segloop.errors import DatasetError


@dataclass(frozen=True)
class CapturedImage:
    """A captured image as exported/imported: its bytes, file extension and size."""

    data: bytes
    ext: str
    width: int
    height: int


def served_image(data: bytes, what: str = "image") -> tuple[bytes, str, int, int]:
    """``(bytes, ext, width, height)`` of the image as the model saw it.

    The server applies EXIF orientation before predicting, so a rotated JPEG is stored
    transposed (as PNG) for pixel-aligned annotations; formats the dataset readers do not
    all take (WebP, GIF, BMP, TIFF) become PNG; JPEG/PNG bytes are kept as they are.
    """
    from PIL import ImageOps

    img = open_image(data, what)
    fmt = img.format
    orientation = img.getexif().get(0x0112, 1) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else 1
    if orientation in (2, 3, 4, 5, 6, 7, 8) or fmt not in ("JPEG", "PNG"):
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), "png", img.width, img.height
    return data, ("jpg" if fmt == "JPEG" else "png"), img.width, img.height


def load_capture_image(store: ObjectStore, rec: CaptureRecord) -> bytes:
    """The stored image bytes of a capture; DatasetError when missing or not the recorded bytes."""
    try:
        data = store.get_bytes(rec.image_key)
    except ObjectNotFound:
        raise DatasetError(f"capture {rec.id}: image {rec.image_key} is missing from {store.describe()}") from None
    sha = rec.meta.get("image_sha256")
    if sha and hashlib.sha256(data).hexdigest() != sha:
        raise DatasetError(
            f"capture {rec.id}: image {rec.image_key} does not match its recorded sha256 {sha} (modified or corrupt)"
        )
    return data


def captured_image(store: ObjectStore, rec: CaptureRecord, what: str) -> CapturedImage:
    """:func:`load_capture_image` then :func:`served_image`; ``what`` names it in decode errors."""
    return CapturedImage(*served_image(load_capture_image(store, rec), what))
