"""Request-body decoding and validation (serve_app.imaging), no Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.imaging import ImageLimits, ImageRejected, decode_image, probe

LIMITS = ImageLimits(max_bytes=100_000, max_pixels=256 * 256)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 30) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(a)


def reason(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, limits)
    assert str(info.value)
    return info.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decode_supported_formats(fmt):
    arr = decode_image(encode(gradient(), fmt), LIMITS)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_modes_become_rgb(mode):
    img = gradient().convert("L").convert(mode) if mode in ("I;16", "LA") else gradient().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    arr = decode_image(encode(img, fmt), LIMITS)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def test_transparent_pixels_composited_on_white():
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert (decode_image(encode(img, "PNG"), LIMITS) == 255).all()


def test_palette_colours_kept():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert tuple(decode_image(encode(img, "PNG"), LIMITS)[0, 0]) == (200, 100, 50)


def test_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 270
    arr = decode_image(encode(gradient(40, 30), "JPEG", exif=exif.tobytes()), LIMITS)
    assert arr.shape == (40, 30, 3)


def test_rejections():
    jpeg = encode(gradient(), "JPEG")
    png = encode(gradient(), "PNG")
    assert reason(b"") == "empty_body"
    assert reason(b"GET / HTTP/1.1 hello") == "not_an_image"
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason(png[: len(png) - 30]) == "truncated"
    assert reason(jpeg[:10]) == "truncated"
    assert reason(encode(gradient(), "GIF")) == "unsupported_format"
    assert reason(encode(gradient(), "BMP")) == "unsupported_format"
    assert reason(encode(Image.new("L", (300, 300)), "PNG")) == "too_many_pixels"
    assert reason(b"\xff\xd8\xff" + bytes(LIMITS.max_bytes)) == "body_too_large"


def test_bomb_rejected_from_header_only():
    """A 20000x20000 PNG of zeros is a few hundred KB; refused before any pixel is decoded."""
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    limits = ImageLimits(max_bytes=10 * 2**20, max_pixels=4096 * 4096)
    header = None
    with pytest.raises(ImageRejected) as info:
        header = probe(bomb, limits)
    assert header is None and info.value.reason == "too_many_pixels" and info.value.status == 413


def test_status_codes():
    with pytest.raises(ImageRejected) as info:
        decode_image(encode(gradient(), "GIF"), LIMITS)
    assert info.value.status == 415 and info.value.to_json()["reason"] == "unsupported_format"
