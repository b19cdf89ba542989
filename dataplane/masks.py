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
