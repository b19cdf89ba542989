"""Request bodies -> RGB uint8 images, with every rejection named.

Decoding is defensive: the header is read first (``Image.open`` does not decode pixels) so
an image whose width x height exceeds ``max_pixels`` is refused before a single pixel is
allocated (decompression bombs); only JPEG, PNG and WebP are accepted; EXIF orientation is
applied and grey, RGBA, palette, CMYK and 16-bit images become 8-bit RGB.

Every problem raises :class:`ImageRejected` with a ``reason`` tag (the
``segloop_rejections`` tags of the contracts) and the HTTP status to answer with.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Magic numbers of the supported formats: a body that starts like one but cannot be parsed is truncated.
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"RIFF", "WEBP"))

REASONS = (
    "empty_body",
    "not_an_image",
    "truncated",
    "unsupported_format",
    "too_many_pixels",
    "body_too_large",
    "bad_multipart",
    "bad_request",
    "body_timeout",
    "unauthorized",
    "overloaded",
    "model_unavailable",
    "internal",
)
STATUS = {
    "empty_body": 400,
    "not_an_image": 400,
    "truncated": 400,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "body_too_large": 413,
    "bad_multipart": 400,
    "bad_request": 400,
    "body_timeout": 408,
    "unauthorized": 401,
    "overloaded": 503,
    "model_unavailable": 503,
    "internal": 500,
}


class ImageRejected(ValueError):
    """A request body that is not an acceptable image; ``reason`` is the metric tag."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in STATUS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.status = STATUS[reason]
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"error": self.message, "reason": self.reason}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int
    mode: str


def check_body_size(n: int, limits: ImageLimits) -> None:
    if n == 0:
        raise ImageRejected(
            "empty_body",
            "the request body is empty; send the image bytes (JPEG, PNG or WebP) or a multipart field 'file'",
        )
    if n > limits.max_bytes:
        raise ImageRejected(
            "body_too_large", f"the request body has {n} bytes, more than the limit of {limits.max_bytes} bytes"
        )


def _sniff(data: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if data.startswith(magic) and (fmt != "WEBP" or data[8:12] in (b"WEBP", b"")):
            return fmt
    return None


def probe(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Read the header only: format, size, mode. Raises ImageRejected."""
    check_body_size(len(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                header = ImageHeader(str(img.format), int(img.width), int(img.height), str(img.mode))
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_many_pixels", f"the image is too large to decode: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        fmt = _sniff(data)
        if fmt is not None:
            raise ImageRejected(
                "truncated",
                f"the body starts like a {fmt} file but its header cannot be read (truncated or corrupt): {err}",
            ) from None
        raise ImageRejected("not_an_image", "the body is not an image (expected JPEG, PNG or WebP bytes)") from None
    if header.format not in SUPPORTED_FORMATS:
        raise ImageRejected(
            "unsupported_format", f"image format {header.format} is not supported; send JPEG, PNG or WebP"
        )
    if header.width < 1 or header.height < 1:
        raise ImageRejected("not_an_image", f"the image has no pixels ({header.width}x{header.height})")
    if header.width * header.height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"the image is {header.width}x{header.height} = {header.width * header.height} pixels, "
            f"more than the limit of {limits.max_pixels}",
        )
    return header


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: rescale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode == "P":  # palette (maybe with a transparent index) -> RGBA first, keeps colours right
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels: composite over white, like a browser shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Bytes -> RGB uint8 array [H, W, 3] (EXIF orientation applied). Raises ImageRejected."""
    header = probe(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
                array = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise ImageRejected("too_many_pixels", f"the image is too large to decode: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(
            "truncated", f"the {header.format} image cannot be decoded (truncated or corrupt): {err}"
        ) from None
    if array.ndim != 3 or array.shape[2] != 3:  # pragma: no cover - convert("RGB") guarantees it
        raise ImageRejected("not_an_image", f"decoded image has shape {array.shape}, expected [H, W, 3]")
    return np.ascontiguousarray(array)
