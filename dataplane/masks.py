"""Mask codecs shared by every annotation format: label PNGs, COCO RLE and polygons, boxes.

One implementation, so a mask written by one format reads back identically through
another. Polygon coordinates follow COCO (pixel ``i``'s centre at ``i + 0.5``) so that
pycocotools rasterises them back onto the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from segloop.errors import DatasetError

LABEL_PNG_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def open_image(data: bytes, what: str):
    """The decoded PIL image of ``data``; DatasetError naming ``what`` when it is not an image."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        raise DatasetError(f"{what} cannot be decoded as an image: {err}") from None


def label_png(array: np.ndarray) -> bytes:
    """A 2-D array of label values (0..255) as a greyscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_label_png(data: bytes, what: str) -> np.ndarray:
    """A single-channel label PNG (L, P, I) as a 2-D int array; colour images are refused."""
    img = open_image(data, what)
    if img.mode not in LABEL_PNG_MODES:
        raise DatasetError(
            f"{what} has mode {img.mode}; expected a single-channel (grey or palette) PNG of label values"
        )
    return np.asarray(img).astype(np.int64)


def mask_polygons(mask: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Contours of a binary mask as ``(points [N,2] in pixel coordinates, signed area)``.

    Coordinates put pixel ``i``'s centre at ``i + 0.5`` (COCO's convention, so pycocotools
    rasterises them back to the same pixels). Positive area: outer boundary; negative: hole.
    Collinear points are dropped; largest first.
    """
    import contourpy

    m = np.pad(np.asarray(mask).astype(np.float64), 1)
    out = []
    for line in contourpy.contour_generator(z=m, line_type=contourpy.LineType.Separate).lines(0.5):
        pts = _simplified_ring(np.asarray(line, dtype=np.float64))
        if pts is None:
            continue
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        out.append((pts - 1.0 + 0.5, area))
    out.sort(key=lambda pa: -abs(pa[1]))
    return out


def _simplified_ring(pts: np.ndarray) -> np.ndarray | None:
    """A closed contour without its repeated end point and collinear points; None if degenerate."""
    if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(pts) < 3:
        return None
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    pts = pts[np.abs(cross) > 1e-9]
    return pts if len(pts) >= 3 else None


def rasterize_polygon(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """Binary mask of one polygon ``[x1, y1, x2, y2, ...]`` in pixel coordinates (pycocotools)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([list(map(float, points))], height, width)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask as COCO compressed RLE ``{"size": [h, w], "counts": str}`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    mask = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))  # no copy for an F-ordered bool/uint8 mask
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segm: Any, height: int, width: int, what: str) -> np.ndarray:
    """A COCO segmentation (polygons, RLE) as a bool mask, checked against the image size."""
    if isinstance(segm, list):
        return _decode_polygons(segm, height, width, what)
    if isinstance(segm, dict):
        return _decode_rle(segm, height, width, what)
    raise DatasetError(f"{what}: segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}")


def _decode_polygons(segm: list, height: int, width: int, what: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    polys = []
    for poly in segm:
        if not isinstance(poly, list) or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
            raise DatasetError(f"{what}: polygon segmentation must be lists of [x1, y1, x2, y2, ...] numbers")
        if len(poly) >= 6:
            polys.append([float(v) for v in poly])
    if not polys:
        return np.zeros((height, width), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width))).astype(bool)


def _decode_rle(segm: dict, height: int, width: int, what: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    counts, size = segm.get("counts"), segm.get("size")
    if counts is None or not isinstance(size, (list, tuple)) or len(size) != 2:
        raise DatasetError(f"{what}: RLE segmentation needs 'counts' and 'size' [height, width]")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise DatasetError(
            f"{what}: mask is {int(size[1])}x{int(size[0])} (RLE size {list(size)}) but the image is {width}x{height}"
        )
    try:
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise DatasetError(f"{what}: RLE counts sum to {sum(counts)}, expected {height * width}")
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, str):
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            raise DatasetError(f"{what}: RLE 'counts' must be a list of ints or a string")
        return mask_utils.decode(rle).astype(bool)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - malformed RLE strings crash deep in pycocotools
        raise DatasetError(f"{what}: RLE segmentation cannot be decoded: {err}") from None


def bbox_area(mask: np.ndarray) -> tuple[list[float], float]:
    """COCO ``bbox`` [x, y, w, h] and ``area`` (pixel count) of a binary mask; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0], 0.0
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0], float(mask.sum())


# ----------------------------------------------------------------------------- Label Studio brush RLE
# Label Studio stores a brush mask as the RGBA pixels of its canvas, run-length encoded and
# bit-packed (thi-ng's rle-pack): a 32-bit value count, a 5-bit word size - 1, four 4-bit
# run-length field sizes - 1, then runs of [repeat bit, 2-bit size selector, length - 1, value(s)].
# The painted pixels are those whose alpha is set.

BRUSH_RLE_SIZES = (3, 4, 8, 16)


def brush_rle_encode(mask: np.ndarray) -> list[int]:
    """A binary mask as Label Studio brush RLE (a list of bytes), every channel 255 where painted."""
    flat = np.repeat(np.asarray(mask, dtype=bool).ravel().view(np.uint8) * 255, 4)
    bits = [f"{len(flat):032b}", f"{8 - 1:05b}", "".join(f"{s - 1:04b}" for s in BRUSH_RLE_SIZES)]
    if len(flat):
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [len(flat)]]))
        for start, length in zip(starts.tolist(), lengths.tolist()):
            value = f"{int(flat[start]):08b}"
            while length > 0:
                n = min(length, 1 << BRUSH_RLE_SIZES[-1])
                sel = next(k for k, s in enumerate(BRUSH_RLE_SIZES) if n - 1 < (1 << s))
                bits.append(f"1{sel:02b}{n - 1:0{BRUSH_RLE_SIZES[sel]}b}{value}")
                length -= n
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    return list(int(s[i : i + 8], 2).to_bytes(1, "big")[0] for i in range(0, len(s), 8))


def brush_rle_decode(rle: Any, height: int, width: int, what: str) -> np.ndarray:
    """A Label Studio brush RLE as a bool mask of the image's size; DatasetError naming ``what``
    when it is not a list of bytes, is cut short, or was painted on an image of another size."""
    if not isinstance(rle, list) or not rle or not all(isinstance(v, int) and 0 <= v <= 255 for v in rle):
        raise DatasetError(f"{what}: brush value.rle must be a non-empty list of bytes (0-255)")
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    s = "".join("1" if b else "0" for b in bits.tolist())
    if len(s) < 53:
        raise DatasetError(f"{what}: brush RLE is cut short ({len(rle)} bytes, not even a header)")
    num, word = int(s[:32], 2), int(s[32:37], 2) + 1
    sizes = [int(s[37 + 4 * k : 41 + 4 * k], 2) + 1 for k in range(4)]
    if num != height * width * 4:
        raise DatasetError(
            f"{what}: brush mask holds {num // 4} pixels but the image is {width}x{height} ({height * width} pixels)"
        )
    out = np.zeros(num, dtype=np.uint32)
    i, pos = 0, 53
    try:
        while i < num:
            repeat, sel = s[pos] == "1", int(s[pos + 1 : pos + 3], 2)
            pos += 3
            j = i + 1 + int(s[pos : pos + sizes[sel]], 2)
            pos += sizes[sel]
            if j > num:
                raise DatasetError(f"{what}: brush RLE runs past the image's {num} values")
            if repeat:
                out[i:j] = _bits(s, pos, word)
                pos += word
            else:
                out[i:j] = [_bits(s, pos + k * word, word) for k in range(j - i)]
                pos += (j - i) * word
            i = j
    except ValueError:  # int('') past the end of the bits
        raise DatasetError(f"{what}: brush RLE is cut short after {i} of {num} values") from None
    return out.reshape(height, width, 4)[:, :, 3] > 127


def _bits(s: str, pos: int, n: int) -> int:
    if pos + n > len(s):
        raise ValueError("past the end")
    return int(s[pos : pos + n], 2)
