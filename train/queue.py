"""The annotation queue: captured production samples -> annotators -> a new dataset version.

``python -m train.queue [--store URL] list|export|simulate|import`` (store from ``--store``,
else ``SEGLOOP_STORE``, else ``./.segloop/store``):

* ``list`` - captured samples (``captures/<day>/<id>.json``, written by
  :mod:`serve_app.capture`) sorted by entropy, highest first (ties: newest first), filtered
  by model version, task and time range;
* ``export --top N --out DIR`` - the N most uncertain samples, with the model's predictions as
  pre-annotations so annotators correct rather than draw::

      DIR/images/<id>.<ext>               the captured image (EXIF orientation applied, as served)
      DIR/label_studio_tasks.json         Label Studio tasks; predictions as ``polygonlabels``
      DIR/label_studio_config.xml         the matching labelling config (PolygonLabels "label" on "image")
      DIR/coco_preannotations.json        COCO instances; the predicted masks as RLE annotations
      DIR/trimaps/<id>.png                semantic only: predicted Oxford trimaps (1 pet, 2 bg, 3 border)
      DIR/export.json                     what was exported (ids, store keys, entropies)

  Semantic pre-annotations in Label Studio are polygons (brush RLE is Label Studio's own
  bit-packed format): outer contours of the predicted pet as ``pet`` regions and holes as
  ``background`` regions, largest first. The contour follows the middle of the predicted
  border band; on import, regions are painted in order and the border band is derived
  again with the Oxford/synth rule (``train.data.synth.pet_trimap``), unless ``border``
  regions are drawn explicitly. In COCO, semantic classes are categories ``pet`` (1) and
  ``border`` (2), each one RLE annotation per image (exact, no polygon loss);
* ``import DATASET PATH`` - reads corrected annotations (a Label Studio JSON export, a COCO
  JSON, or a directory of trimap PNGs named ``<id>.png``; ``auto`` picks by content),
  validates *every* sample (capture exists and its image matches its recorded sha256, mask
  size = image size, classes known, trimap values in {1,2,3}, JSON well-formed), reports all
  problems at once naming each sample, and only then writes a new dataset version = parent +
  the new samples (:func:`train.versions.add_samples`, manifest written last). Sample names
  are capture ids. Oxford layout: ``images/<id>.<ext>``, ``annotations/trimaps/<id>.png``,
  ``annotations/<split>.txt``; COCO layout: ``images/<split>/<id>.<ext>`` and a merged
  ``annotations/instances_<split>.json`` with new image/annotation ids, categories matched by name;
* ``simulate`` - a stand-in annotator for demos and tests: writes the ground truth of captured
  synthetic images (found by image sha256 in a generated dataset root) as corrected annotations.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from train.errors import ConfigError, DatasetError, SegloopError, StoreError, cli_error
from train.data.synth import dilate
from train.store import ObjectNotFound, ObjectStore, blob_key

logger = logging.getLogger(__name__)

METADATA_FORMAT = 1
EXPORT_FORMAT = 1
CAPTURE_PREFIX = "captures/"
CAPTURE_ID_RE = re.compile(r"(?<![0-9A-Za-z])(\d{8}T\d{12}Z-[0-9a-f]{32})(?![0-9a-f])")
# Oxford trimap values and the semantic class names they stand for.
TRIMAP_VALUES = {"pet": 1, "background": 2, "border": 3}
SEMANTIC_CATEGORIES = ({"id": 1, "name": "pet", "supercategory": "pets"}, {"id": 2, "name": "border", "supercategory": "pets"})
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG", "jpg", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "png", "image/png"),
    (b"GIF87a", "GIF", "gif", "image/gif"),
    (b"GIF89a", "GIF", "gif", "image/gif"),
    (b"BM", "BMP", "bmp", "image/bmp"),
    (b"II*\x00", "TIFF", "tif", "image/tiff"),
    (b"MM\x00*", "TIFF", "tif", "image/tiff"),
)
_MIME_EXT = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
             "image/bmp": "bmp", "image/tiff": "tif"}


# ----------------------------------------------------------------------------- ids and formats


def new_capture_id(when: Optional[_dt.datetime] = None) -> str:
    """``<yyyymmdd>T<hhmmss><micro>Z-<uuid4 hex>``: sorts by time, unique, day folder derivable."""
    when = (when or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    return f"{when:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex}"


def find_capture_id(text: str) -> Optional[str]:
    """The capture id inside a file name or URL (Label Studio prefixes uploads), or None."""
    m = CAPTURE_ID_RE.search(text or "")
    return m.group(1) if m else None


def capture_day(capture_id: str) -> Optional[str]:
    """``yyyy-mm-dd`` folder of a capture id (None when the id is not in the standard form)."""
    m = re.match(r"^(\d{4})(\d{2})(\d{2})T", capture_id)
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def image_format(data: bytes, content_type: Optional[str] = None) -> tuple[str, str, str]:
    """``(format, extension, mime type)`` of image bytes, by magic number, else the content type."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", "webp", "image/webp"
    for magic, fmt, ext, mime in _IMAGE_MAGIC:
        if head.startswith(magic):
            return fmt, ext, mime
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime in _MIME_EXT:
        return _MIME_EXT[mime].upper(), _MIME_EXT[mime], mime
    return "UNKNOWN", "bin", "application/octet-stream"


# ----------------------------------------------------------------------------- records and listing


@dataclass
class CaptureRecord:
    """One captured sample, as read from its metadata JSON."""

    id: str
    time: _dt.datetime
    entropy: Optional[float]
    confidence: Optional[float]
    task: Optional[str]
    model_name: Optional[str]
    model_version: Optional[str]
    image_key: str
    json_key: str
    width: Optional[int]
    height: Optional[int]
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def from_meta(cls, meta: Any, json_key: str) -> "CaptureRecord":
        if not isinstance(meta, dict):
            raise DatasetError(f"capture {json_key}: metadata is not a JSON object")
        missing = [k for k in ("id", "time", "image_key") if not meta.get(k)]
        if missing:
            raise DatasetError(f"capture {json_key}: metadata lacks {', '.join(missing)}")
        try:
            t = _parse_time(meta["time"])
        except ValueError:
            raise DatasetError(f"capture {json_key}: invalid time {meta['time']!r}") from None
        model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        ent, conf = meta.get("entropy"), meta.get("confidence")
        return cls(
            id=str(meta["id"]),
            time=t,
            entropy=float(ent) if isinstance(ent, (int, float)) else None,
            confidence=float(conf) if isinstance(conf, (int, float)) else None,
            task=meta.get("task"),
            model_name=model.get("name"),
            model_version=str(meta["model_version"]) if meta.get("model_version") is not None else model.get("version"),
            image_key=str(meta["image_key"]),
            json_key=json_key,
            width=meta.get("width") if isinstance(meta.get("width"), int) else None,
            height=meta.get("height") if isinstance(meta.get("height"), int) else None,
            meta=meta,
        )

    @property
    def class_names(self) -> list[str]:
        pred = self.meta.get("prediction") or {}
        return [str(c) for c in pred.get("class_names") or []]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "time": _iso(self.time), "entropy": self.entropy, "confidence": self.confidence,
            "task": self.task, "model_name": self.model_name, "model_version": self.model_version,
            "width": self.width, "height": self.height, "image_key": self.image_key, "json_key": self.json_key,
        }


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(value: Any, *, end_of_day: bool = False) -> _dt.datetime:
    """datetime/date/ISO string -> aware UTC datetime; a bare date with ``end_of_day`` -> next midnight."""
    if isinstance(value, _dt.datetime):
        t = value
    elif isinstance(value, _dt.date):
        t = _dt.datetime(value.year, value.month, value.day) + (_dt.timedelta(days=1) if end_of_day else _dt.timedelta())
    elif isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
            return _parse_time(_dt.date.fromisoformat(s), end_of_day=end_of_day)
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    else:
        raise ValueError(f"not a time: {value!r}")
    return t.replace(tzinfo=_dt.timezone.utc) if t.tzinfo is None else t.astimezone(_dt.timezone.utc)


def _time_arg(value: Any, what: str, end_of_day: bool = False) -> Optional[_dt.datetime]:
    if value is None or value == "":
        return None
    try:
        return _parse_time(value, end_of_day=end_of_day)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not a date or ISO time (e.g. 2025-01-31 or 2025-01-31T12:00:00Z)") from None


def _sample_names(manifest: Any) -> set[str]:
    names: set[str] = set()
    for split_names in manifest.splits.values():
        for n in split_names:
            names.add(n)
            names.add(Path(n).stem)
    return names


def list_captures(
    store: ObjectStore,
    since: Any = None,
    until: Any = None,
    model_version: Optional[str] = None,
    *,
    task: Optional[str] = None,
    exclude: Any = None,
    limit: Optional[int] = None,
    strict: bool = False,
    workers: int = 8,
) -> list[CaptureRecord]:
    """Captured samples sorted by entropy, highest first (no entropy last; ties newest first).

    ``since`` is inclusive and ``until`` exclusive (a bare date ``until`` includes that day);
    ``exclude`` (a dataset Manifest) leaves out captures already annotated into it.
    Unreadable capture JSONs are skipped with a warning (``strict``: DatasetError).
    """
    t0 = _time_arg(since, "since")
    t1 = _time_arg(until, "until", end_of_day=True)
    day0 = t0.strftime("%Y-%m-%d") if t0 else None
    day1 = t1.strftime("%Y-%m-%d") if t1 else None
    keys = []
    for key in store.list(CAPTURE_PREFIX):
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].endswith(".json"):
            continue
        day = parts[1]
        if (day0 and day < day0) or (day1 and day > day1):
            continue
        keys.append(key)
    skip = _sample_names(exclude) if exclude is not None else set()

    def load(key: str) -> Optional[CaptureRecord]:
        try:
            return _read_record(store, key)
        except ObjectNotFound:
            return None  # deleted while listing
        except DatasetError as err:
            if strict:
                raise
            logger.warning("skipping capture %s", err)
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys) or 1))) as pool:
        records = [r for r in pool.map(load, keys) if r is not None]
    out = []
    for r in records:
        if t0 and r.time < t0 or t1 and r.time >= t1:
            continue
        if model_version is not None and r.model_version != str(model_version):
            continue
        if task is not None and r.task != task:
            continue
        if r.id in skip:
            continue
        out.append(r)
    out.sort(key=lambda r: (r.entropy if r.entropy is not None else -math.inf, r.time, r.id), reverse=True)
    return out[:limit] if limit is not None else out


def _read_record(store: ObjectStore, key: str) -> CaptureRecord:
    """The record of one capture JSON; DatasetError naming it when it is not valid JSON."""
    raw = store.get_bytes(key)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"capture {key}: metadata is not valid JSON: {err}") from None
    return CaptureRecord.from_meta(meta, key)


def get_capture(store: ObjectStore, capture_id: str) -> CaptureRecord:
    """The capture with this id (DatasetError naming it when there is none)."""
    if not isinstance(capture_id, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", capture_id):
        raise DatasetError(f"invalid capture id {capture_id!r}")
    day = capture_day(capture_id)
    keys = [f"{CAPTURE_PREFIX}{day}/{capture_id}.json"] if day else []
    for key in keys:
        try:
            return _read_record(store, key)
        except ObjectNotFound:
            pass
    for key in store.list(CAPTURE_PREFIX):  # non-standard id or moved day folder
        if key.endswith(f"/{capture_id}.json"):
            return _read_record(store, key)
    raise DatasetError(f"no capture {capture_id!r} in {store.describe()}")


# ----------------------------------------------------------------------------- images and masks


def _open_image(data: bytes, what: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        raise DatasetError(f"{what} cannot be decoded as an image: {err}") from None


def served_image(data: bytes, what: str = "image") -> tuple[bytes, str, int, int]:
    """``(bytes, ext, width, height)`` of the image as the model saw it.

    The server applies EXIF orientation before predicting, so a rotated JPEG is stored
    transposed (as PNG) for pixel-aligned annotations; formats the dataset readers do not
    all take (WebP, GIF, BMP, TIFF) become PNG; JPEG/PNG bytes are kept as they are.
    """
    from PIL import ImageOps

    img = _open_image(data, what)
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


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_label_png(data: bytes, what: str) -> np.ndarray:
    """A single-channel label PNG (L, P, I) as a 2-D int array; colour images are refused."""
    img = _open_image(data, what)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DatasetError(f"{what} has mode {img.mode}; expected a single-channel (grey or palette) PNG of label values")
    return np.asarray(img).astype(np.int64)


def band_radius(height: int, width: int) -> int:
    """Half-width of the trimap border band: the rule ``train.data.synth.pet_trimap`` uses."""
    return max(1, round(min(height, width) / 64))


def trimap_from_pet_mask(mask: np.ndarray) -> np.ndarray:
    """Oxford trimap of a binary pet mask (the border band derived around its outline)."""
    from train.data.synth import pet_trimap

    mask = np.asarray(mask).astype(bool)
    h, w = mask.shape
    return pet_trimap(mask, min(h, w)) if min(h, w) >= 1 else np.full(mask.shape, 2, np.uint8)


def labels_to_trimap(labels: np.ndarray, class_names: Sequence[str], what: str) -> np.ndarray:
    """Class-index mask (indices into ``class_names`` = background/pet/border) -> trimap 1/2/3."""
    lut = np.full(256, 0, np.uint8)
    for i, name in enumerate(class_names):
        if name not in TRIMAP_VALUES:
            raise DatasetError(f"{what}: class {name!r} has no trimap value (known: {', '.join(TRIMAP_VALUES)})")
        lut[i] = TRIMAP_VALUES[name]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DatasetError(f"{what}: mask values {sorted(set(np.unique(labels).tolist()))[:10]} outside 0..{len(class_names) - 1}")
    return lut[labels]


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
        pts = np.asarray(line, dtype=np.float64)
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) < 3:
            continue
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
        pts = pts[np.abs(cross) > 1e-9]
        if len(pts) < 3:
            continue
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        out.append((pts - 1.0 + 0.5, area))
    out.sort(key=lambda pa: -abs(pa[1]))
    return out


def rasterize_polygon(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """Binary mask of one polygon ``[x1, y1, x2, y2, ...]`` in pixel coordinates (pycocotools)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([list(map(float, points))], height, width)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _decode_segmentation(segm: Any, height: int, width: int, what: str) -> np.ndarray:
    """A COCO segmentation (polygons, RLE) as a bool mask, checked against the image size."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        polys = []
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
                raise DatasetError(f"{what}: polygon segmentation must be lists of [x1, y1, x2, y2, ...] numbers")
            if len(poly) >= 6:
                polys.append([float(v) for v in poly])
        if not polys:
            return np.zeros((height, width), bool)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width))).astype(bool)
    if isinstance(segm, dict):
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
    raise DatasetError(f"{what}: segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}")


def _bbox_area(mask: np.ndarray) -> tuple[list[float], float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0], 0.0
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0], float(mask.sum())


# ----------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    out_dir: Path
    task: str
    records: list[CaptureRecord]
    label_studio: Path
    coco: Path
    trimaps: Optional[Path]
    problems: list[str]


def _load_capture_image(store: ObjectStore, rec: CaptureRecord) -> bytes:
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


def _predicted_labels(store: ObjectStore, rec: CaptureRecord, h: int, w: int) -> Optional[np.ndarray]:
    pre = rec.meta.get("preannotation") or {}
    if pre.get("kind") != "mask_png" or not pre.get("key"):
        return None
    try:
        labels = read_label_png(store.get_bytes(pre["key"]), f"capture {rec.id}: predicted mask {pre['key']}")
    except ObjectNotFound:
        raise DatasetError(f"capture {rec.id}: predicted mask {pre['key']} is missing") from None
    if labels.shape != (h, w):
        raise DatasetError(f"capture {rec.id}: predicted mask is {labels.shape[1]}x{labels.shape[0]}, image is {w}x{h}")
    return labels


def _prepare_export_dir(out: Path) -> Path:
    """Create ``out``; a non-empty one is refused (it may hold an annotator's edited trimaps,
    and stale files from an older export would be imported with the new ones)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"export directory {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise DatasetError(f"export directory {out} is not empty; export into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _ls_region(points: np.ndarray, label: str, w: int, h: int, n: int, score: Optional[float]) -> dict[str, Any]:
    region = {
        "id": f"r{n}",
        "from_name": "label",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "points": [[round(float(x) / w * 100, 4), round(float(y) / h * 100, 4)] for x, y in points],
            "polygonlabels": [label],
            "closed": True,
        },
    }
    if score is not None:
        region["score"] = score
    return region


def label_studio_config(labels: Sequence[str]) -> str:
    """The Label Studio labelling config matching the exported tasks."""
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    rows = "\n".join(
        f'    <Label value="{_xml(lab)}" background="{colours[i % len(colours)]}"/>' for i, lab in enumerate(labels)
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <PolygonLabels name="label" toName="image" strokeWidth="2" pointSize="small" opacity="0.4">\n'
        f"{rows}\n"
        "  </PolygonLabels>\n"
        "</View>\n"
    )


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def export(
    store: ObjectStore,
    out_dir: Union[str, os.PathLike],
    top: int = 50,
    task: Optional[str] = None,
    *,
    since: Any = None,
    until: Any = None,
    model_version: Optional[str] = None,
    exclude: Any = None,
    records: Optional[Sequence[CaptureRecord]] = None,
    image_url_prefix: str = "images/",
) -> ExportResult:
    """Write the ``top`` most uncertain captures with pre-annotations for annotators (see module doc).

    ``records`` overrides the selection. All selected captures must share one task (pass
    ``task`` to pick one when traffic mixes them). Captures that cannot be exported (image
    missing or modified, unreadable mask) are left out and listed in ``problems``.
    ``image_url_prefix`` prefixes ``data.image`` in the Label Studio tasks (e.g. a URL your
    Label Studio can fetch, or ``/data/local-files/?d=...``).
    """
    if records is None:
        if not isinstance(top, int) or top < 1:
            raise ConfigError(f"--top must be a positive integer, got {top!r}")
        records = list_captures(store, since, until, model_version, task=task, exclude=exclude, limit=top)
    records = list(records)
    if not records:
        raise DatasetError(f"no captures to export from {store.describe()} (filters: task={task}, model_version={model_version})")
    tasks = sorted({str(r.task) for r in records})
    if len(tasks) > 1:
        raise DatasetError(f"captures mix tasks {tasks}; pass task= (--task) to export one of them")
    task = tasks[0]
    if task not in ("semantic", "instance"):
        raise DatasetError(f"captures have unknown task {task!r}")
    class_names = records[0].class_names
    for r in records:
        if r.class_names != class_names:
            raise DatasetError(
                f"captures disagree on class names ({class_names} vs {r.class_names} in {r.id}); "
                "filter by --model-version"
            )
    out = _prepare_export_dir(Path(out_dir))
    (out / "images").mkdir()
    trimap_dir = out / "trimaps" if task == "semantic" else None
    if trimap_dir is not None:
        trimap_dir.mkdir()

    if task == "semantic":
        categories = [dict(c) for c in SEMANTIC_CATEGORIES]
        ls_labels = ["pet", "background", "border"]
    else:
        categories = [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]
        ls_labels = [c["name"] for c in categories]

    def one(rec: CaptureRecord) -> dict[str, Any]:
        data, ext, w, h = served_image(_load_capture_image(store, rec), f"capture {rec.id}: image {rec.image_key}")
        if (rec.width, rec.height) not in ((w, h), (None, None)):
            raise DatasetError(f"capture {rec.id}: image is {w}x{h} but the prediction was {rec.width}x{rec.height}")
        item: dict[str, Any] = {"rec": rec, "data": data, "file": f"{rec.id}.{ext}", "w": w, "h": h}
        if task == "semantic":
            labels = _predicted_labels(store, rec, h, w)
            item["trimap"] = (
                labels_to_trimap(labels, class_names, f"capture {rec.id}") if labels is not None else np.full((h, w), 2, np.uint8)
            )
        else:
            pre = rec.meta.get("preannotation") or {}
            insts = []
            for k, inst in enumerate(pre.get("instances") or []):
                mask = _decode_segmentation(inst.get("segmentation"), h, w, f"capture {rec.id}: instance {k}")
                insts.append((inst, mask))
            item["instances"] = insts
        return item

    items, problems = [], []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for rec, fut in [(r, pool.submit(one, r)) for r in records]:
            try:
                items.append(fut.result())
            except DatasetError as err:
                problems.append(str(err))
    if not items:
        raise DatasetError(f"none of the {len(records)} selected captures can be exported:\n  " + "\n  ".join(problems))

    tasks_json, coco = [], {"info": {"description": "segloop pre-annotations (model predictions)"},
                            "images": [], "annotations": [], "categories": categories}
    ann_id = 0
    for n, item in enumerate(items, 1):
        rec, w, h = item["rec"], item["w"], item["h"]
        (out / "images" / item["file"]).write_bytes(item["data"])
        score = rec.confidence
        results: list[dict[str, Any]] = []
        coco["images"].append({"id": n, "file_name": item["file"], "width": w, "height": h, "capture_id": rec.id})
        if task == "semantic":
            trimap = item["trimap"]
            (trimap_dir / f"{rec.id}.png").write_bytes(_png(trimap))
            r = band_radius(h, w)
            pet = trimap == 1
            outline = dilate(pet, r) & (trimap != 2) if pet.any() else (trimap == 3)
            for pts, area in mask_polygons(outline):
                results.append(_ls_region(pts, "pet" if area > 0 else "background", w, h, len(results), None))
            for cat in categories:
                m = trimap == TRIMAP_VALUES[cat["name"]]
                if m.any():
                    ann_id += 1
                    bbox, area_px = _bbox_area(m)
                    coco["annotations"].append({"id": ann_id, "image_id": n, "category_id": cat["id"], "segmentation": _rle(m),
                                                "area": area_px, "bbox": bbox, "iscrowd": 0, "score": score})
        else:
            for inst, mask in item["instances"]:
                cid = inst.get("category_id")
                name = inst.get("category_name") or (class_names[cid] if isinstance(cid, int) and 0 < cid < len(class_names) else None)
                if name not in ls_labels or not mask.any():
                    continue
                polys = [pa for pa in mask_polygons(mask) if pa[1] > 0]
                if polys:
                    results.append(_ls_region(polys[0][0], name, w, h, len(results), inst.get("score")))
                ann_id += 1
                bbox, area_px = _bbox_area(mask)
                coco["annotations"].append({"id": ann_id, "image_id": n, "category_id": ls_labels.index(name) + 1,
                                            "segmentation": _rle(mask), "area": area_px, "bbox": bbox, "iscrowd": 0,
                                            "score": inst.get("score")})
        tasks_json.append({
            "id": n,
            "data": {"image": f"{image_url_prefix}{item['file']}", "capture_id": rec.id, "entropy": rec.entropy,
                     "confidence": rec.confidence, "model_version": rec.model_version},
            "predictions": [{"model_version": str(rec.model_version), "score": score, "result": results}],
        })
    ls_path, coco_path = out / "label_studio_tasks.json", out / "coco_preannotations.json"
    ls_path.write_text(json.dumps(tasks_json, indent=1))
    coco_path.write_text(json.dumps(coco))
    (out / "label_studio_config.xml").write_text(label_studio_config(ls_labels))
    exported = [item["rec"] for item in items]
    (out / "export.json").write_text(json.dumps({
        "format": EXPORT_FORMAT, "store": store.describe(), "task": task, "class_names": class_names,
        "created": _iso(_dt.datetime.now(_dt.timezone.utc)), "problems": problems,
        "captures": [dict(r.summary(), file=item["file"]) for r, item in zip(exported, items)],
    }, indent=1))
    return ExportResult(out, task, exported, ls_path, coco_path, trimap_dir, problems)


# ----------------------------------------------------------------------------- import: parsing


@dataclass
class _Ann:
    """One sample's corrected annotation, not yet checked against its image."""

    capture_id: str
    where: str
    kind: str  # "trimap" | "regions" (LS polygons) | "coco"
    payload: Any
    size: Optional[tuple[int, int]] = None  # (width, height) the annotation claims


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"annotation file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
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
    data = _read_json(path)
    if isinstance(data, list):
        return "labelstudio"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    raise DatasetError(f"{path}: not a Label Studio export (a JSON list of tasks) nor COCO JSON (images/annotations/categories)")


def _parse_trimaps(path: Path, problems: list[str]) -> list[_Ann]:
    d = path / "trimaps" if (path / "trimaps").is_dir() else path
    anns = []
    for p in sorted(d.iterdir()):
        if p.suffix.lower() != ".png" or not p.is_file():
            continue
        cid = find_capture_id(p.stem) or p.stem
        anns.append(_Ann(cid, f"sample {cid} ({p})", "trimap", p))
    if not anns:
        raise DatasetError(f"{d} holds no trimap PNGs named <capture id>.png")
    return anns


def _parse_labelstudio(path: Path, problems: list[str]) -> tuple[list[_Ann], list[str]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a Label Studio export is a JSON list of tasks, got {type(data).__name__}")
    anns, skipped = [], []
    for i, t in enumerate(data):
        where = f"{path} task[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
            problems.append(f"{where}: not a Label Studio task (needs a 'data' object)")
            continue
        d = t["data"]
        cid = d.get("capture_id") if isinstance(d.get("capture_id"), str) else None
        cid = cid or find_capture_id(str(d.get("image", "")))
        if not cid:
            problems.append(f"{where}: cannot tell which capture it is (no data.capture_id, no capture id in data.image)")
            continue
        where = f"sample {cid} ({path} task[{i}])"
        done = [a for a in t.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            skipped.append(cid)
            continue
        result = done[-1].get("result")
        if not isinstance(result, list):
            problems.append(f"{where}: annotation 'result' must be a list of regions")
            continue
        anns.append(_Ann(cid, where, "regions", result))
    return anns, skipped


def _parse_coco(path: Path, problems: list[str]) -> list[_Ann]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: COCO JSON must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: COCO JSON needs a list {key!r}")
    cats = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: categories[{i}] needs an 'id' and a 'name'")
        cats[c["id"]] = c["name"]
    by_image: dict[Any, list[dict]] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DatasetError(f"{path}: annotations[{i}] needs an 'image_id'")
        by_image.setdefault(a["image_id"], []).append(a)
    anns = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise DatasetError(f"{path}: images[{i}] needs an 'id'")
        cid = img.get("capture_id") if isinstance(img.get("capture_id"), str) else None
        cid = cid or find_capture_id(str(img.get("file_name", "")))
        if not cid:
            problems.append(f"{path} images[{i}] ({img.get('file_name')}): no capture id in file_name or capture_id")
            continue
        size = (img.get("width"), img.get("height"))
        size = (int(size[0]), int(size[1])) if all(isinstance(v, int) for v in size) else None
        anns.append(_Ann(cid, f"sample {cid} ({path} image id {img['id']})", "coco",
                         {"annotations": by_image.get(img["id"], []), "categories": cats}, size))
    unknown = set(by_image) - {img.get("id") for img in data["images"] if isinstance(img, dict)}
    if unknown:
        problems.append(f"{path}: annotations reference unknown image ids {sorted(unknown, key=str)[:10]}")
    return anns


# ----------------------------------------------------------------------------- import: per-sample conversion


def _regions_to_pet(result: list, h: int, w: int, where: str) -> np.ndarray:
    """Label Studio polygon regions painted in order -> trimap (see module doc)."""
    pet = np.zeros((h, w), bool)
    border = np.zeros((h, w), bool)
    for k, region in enumerate(result):
        if not isinstance(region, dict):
            raise DatasetError(f"{where}: result[{k}] is not a region object")
        rtype = str(region.get("type", ""))
        if rtype != "polygonlabels":
            if rtype.endswith("labels"):
                raise DatasetError(f"{where}: result[{k}] is a {rtype} region; only polygonlabels can be imported")
            continue  # choices, textarea, ratings: not regions
        label, mask = _ls_polygon(region, h, w, f"{where}: result[{k}]")
        if label == "pet":
            pet |= mask
        elif label == "background":
            pet &= ~mask
        elif label == "border":
            border |= mask
        else:
            raise DatasetError(f"{where}: result[{k}] has unknown class {label!r} (known: pet, background, border)")
    trimap = trimap_from_pet_mask(pet)
    trimap[border] = 3
    return trimap


def _ls_polygon(region: dict, h: int, w: int, where: str) -> tuple[str, np.ndarray]:
    ow, oh = region.get("original_width"), region.get("original_height")
    if isinstance(ow, (int, float)) and isinstance(oh, (int, float)) and (int(ow), int(oh)) != (w, h):
        raise DatasetError(f"{where}: drawn on a {int(ow)}x{int(oh)} image but the captured image is {w}x{h}")
    value = region.get("value")
    labels = value.get("polygonlabels") if isinstance(value, dict) else None
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise DatasetError(f"{where}: a polygon needs exactly one label in value.polygonlabels")
    pts = value.get("points")
    if (not isinstance(pts, list) or len(pts) < 3
            or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in pts)):
        raise DatasetError(f"{where}: value.points must be at least 3 [x, y] pairs (percent of the image size)")
    arr = np.asarray(pts, dtype=np.float64)
    if arr.min() < -1 or arr.max() > 101:
        raise DatasetError(f"{where}: polygon points must be percentages in [0, 100], got range {arr.min():.1f}..{arr.max():.1f}")
    arr = np.clip(arr, 0, 100) / 100.0 * np.array([w, h])
    return labels[0], rasterize_polygon(arr.reshape(-1).tolist(), h, w)


def _coco_to_trimap(payload: dict, h: int, w: int, where: str) -> np.ndarray:
    trimap = np.full((h, w), 2, np.uint8)
    pet = np.zeros((h, w), bool)
    has_border = False
    layers = []
    for a in payload["annotations"]:
        name = payload["categories"].get(a.get("category_id"))
        if name not in TRIMAP_VALUES:
            raise DatasetError(f"{where}: annotation {a.get('id')} has unknown class {name or a.get('category_id')!r} (known: pet, border, background)")
        m = _decode_segmentation(a.get("segmentation"), h, w, f"{where}: annotation {a.get('id')}")
        layers.append((name, m))
        has_border |= name == "border"
    if not has_border:  # derive the band around the pet, as for polygons
        for name, m in layers:
            pet = (pet | m) if name == "pet" else (pet & ~m)
        return trimap_from_pet_mask(pet)
    for name, m in layers:
        trimap[m] = TRIMAP_VALUES[name]
    return trimap


def _coco_to_instances(payload: dict, h: int, w: int, where: str, known: Mapping[str, int]) -> list[dict[str, Any]]:
    out = []
    for a in payload["annotations"]:
        name = payload["categories"].get(a.get("category_id"))
        if name not in known:
            raise DatasetError(f"{where}: annotation {a.get('id')} has unknown class {name or a.get('category_id')!r} (known: {', '.join(known)})")
        m = _decode_segmentation(a.get("segmentation"), h, w, f"{where}: annotation {a.get('id')}")
        out.append({"category": name, "mask": m, "iscrowd": int(a.get("iscrowd", 0) or 0)})
    return out


def _regions_to_instances(result: list, h: int, w: int, where: str, known: Mapping[str, int]) -> list[dict[str, Any]]:
    out = []
    for k, region in enumerate(result):
        if not isinstance(region, dict):
            raise DatasetError(f"{where}: result[{k}] is not a region object")
        rtype = str(region.get("type", ""))
        if rtype != "polygonlabels":
            if rtype.endswith("labels"):
                raise DatasetError(f"{where}: result[{k}] is a {rtype} region; only polygonlabels can be imported")
            continue
        label, mask = _ls_polygon(region, h, w, f"{where}: result[{k}]")
        if label not in known:
            raise DatasetError(f"{where}: result[{k}] has unknown class {label!r} (known: {', '.join(known)})")
        out.append({"category": label, "mask": mask, "iscrowd": 0})
    return out


# ----------------------------------------------------------------------------- import


def _manifest_file(store: ObjectStore, manifest: Any, path: str) -> Optional[bytes]:
    entry = manifest.file_map.get(path)
    if entry is None:
        return None
    try:
        data = store.get_bytes(blob_key(entry.sha256))
    except ObjectNotFound:
        raise StoreError(f"{manifest.ref}: file {path} is missing from {store.describe()}") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise StoreError(f"{manifest.ref}: file {path} is corrupt in {store.describe()} (sha256 mismatch)")
    return data


def _parent_coco(store: ObjectStore, parent: Any, split: str) -> dict[str, Any]:
    path = f"annotations/instances_{split}.json"
    raw = _manifest_file(store, parent, path)
    if raw is None:
        others = sorted(p for p in parent.file_map if re.fullmatch(r"annotations/instances_[^/]+\.json", p))
        if not others:
            raise DatasetError(f"{parent.ref} has no annotations/instances_*.json; import needs a COCO-layout parent")
        base = json.loads(_manifest_file(store, parent, others[0]) or b"{}")
        return {"images": [], "annotations": [], "categories": base.get("categories", [])}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise DatasetError(f"{parent.ref}: {path} is not valid JSON: {err}") from None


def import_annotations(
    store: ObjectStore,
    dataset_name: str,
    parent_version: Any,
    annotations_path: Union[str, os.PathLike],
    fmt: str = "auto",
    split: Optional[str] = None,
    *,
    replace: bool = False,
    notes: Optional[Mapping[str, Any]] = None,
    workers: int = 8,
) -> Any:
    """Validate corrected annotations and create a new version of ``dataset_name`` (see module doc).

    ``split`` defaults to ``trainval`` (semantic) / ``train`` (instance). Samples already in
    the parent are refused unless ``replace`` (then their files are replaced in the child;
    the parent stays as it was). Returns the new :class:`train.versions.Manifest`. Every
    problem is collected and raised together as one DatasetError naming each sample; in that
    case nothing is written to the store.
    """
    from train.versions import add_samples, get_version

    path = Path(annotations_path)
    if fmt not in ("auto", "coco", "labelstudio", "trimaps"):
        raise ConfigError(f"format {fmt!r} is not one of auto, coco, labelstudio, trimaps")
    parent = parent_version if hasattr(parent_version, "files") else get_version(store, dataset_name, parent_version or "latest")
    task = parent.task
    split = split or ("trainval" if task == "semantic" else "train")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", split):
        raise ConfigError(f"invalid split name {split!r}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "trimaps" and task != "semantic":
        raise DatasetError(f"trimap PNGs only annotate semantic datasets; {parent.ref} is {task}")
    problems: list[str] = []
    skipped: list[str] = []
    if fmt == "trimaps":
        if not path.is_dir():
            raise DatasetError(f"trimap import needs a directory of <id>.png files, got {path}")
        anns = _parse_trimaps(path, problems)
    elif fmt == "labelstudio":
        anns, skipped = _parse_labelstudio(path, problems)
    else:
        anns = _parse_coco(path, problems)
    seen: dict[str, str] = {}
    for a in anns:
        if a.capture_id in seen:
            problems.append(f"{a.where}: capture annotated twice (also {seen[a.capture_id]})")
        seen.setdefault(a.capture_id, a.where)
    if not anns and not problems:
        raise DatasetError(f"{path}: no annotated samples to import" + (f" ({len(skipped)} tasks without annotations)" if skipped else ""))

    coco_parent: Optional[dict[str, Any]] = None
    known: dict[str, int] = {}
    if task == "instance":
        coco_parent = _parent_coco(store, parent, split)
        known = {str(c["name"]): int(c["id"]) for c in coco_parent.get("categories", [])}
    existing = _sample_names(parent)
    parent_files = parent.file_map

    def check(a: _Ann) -> dict[str, Any]:
        cid = a.capture_id
        rec = get_capture(store, cid)
        if rec.task not in (None, task):
            raise DatasetError(f"{a.where}: capture is a {rec.task} prediction but {parent.ref} is a {task} dataset")
        data, ext, w, h = served_image(_load_capture_image(store, rec), f"{a.where}: captured image {rec.image_key}")
        if a.size is not None and a.size != (w, h):
            raise DatasetError(f"{a.where}: annotated image size {a.size[0]}x{a.size[1]} but the captured image is {w}x{h}")
        if cid in existing and not replace:
            raise DatasetError(f"{a.where}: already in {parent.ref}; pass replace=True (--replace) to re-annotate it")
        out: dict[str, Any] = {"id": cid, "data": data, "ext": ext, "w": w, "h": h}
        if task == "semantic":
            if a.kind == "trimap":
                try:
                    raw = Path(a.payload).read_bytes()
                except OSError as err:
                    raise DatasetError(f"{a.where}: cannot read the file: {err.strerror or err}") from None
                arr = read_label_png(raw, a.where)
                if arr.shape != (h, w):
                    raise DatasetError(f"{a.where}: mask is {arr.shape[1]}x{arr.shape[0]} but the image is {w}x{h}")
                bad = sorted(set(np.unique(arr).tolist()) - {1, 2, 3})
                if bad:
                    raise DatasetError(f"{a.where}: trimap values {bad[:10]} are not 1 (pet), 2 (background) or 3 (border)")
                out["trimap"] = arr.astype(np.uint8)
            elif a.kind == "regions":
                out["trimap"] = _regions_to_pet(a.payload, h, w, a.where)
            else:
                out["trimap"] = _coco_to_trimap(a.payload, h, w, a.where)
        else:
            if a.kind == "regions":
                out["instances"] = _regions_to_instances(a.payload, h, w, a.where, known)
            else:
                out["instances"] = _coco_to_instances(a.payload, h, w, a.where, known)
        return out

    def safe(a: _Ann) -> Union[dict[str, Any], str]:
        try:
            return check(a)
        except DatasetError as err:
            msg = str(err)
            return msg if msg.startswith(a.where) else f"{a.where}: {msg}"

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(anns) or 1))) as pool:
        results = list(pool.map(safe, anns))
    problems += [r for r in results if isinstance(r, str)]
    good = [r for r in results if isinstance(r, dict)]
    if problems:
        raise DatasetError(
            f"import of {path} into {parent.ref} refused: {len(problems)} problem(s), nothing was written:\n  "
            + "\n  ".join(problems)
        )

    new_files: dict[str, bytes] = {}
    names: list[str] = []
    if task == "semantic":
        for s in good:
            for p in (f"images/{s['id']}.jpg", f"images/{s['id']}.jpeg", f"images/{s['id']}.png"):
                if p in parent_files and p != f"images/{s['id']}.{s['ext']}":
                    raise DatasetError(f"sample {s['id']}: {parent.ref} has {p}; cannot replace it with a .{s['ext']} image")
            new_files[f"images/{s['id']}.{s['ext']}"] = s["data"]
            new_files[f"annotations/trimaps/{s['id']}.png"] = _png(s["trimap"])
            names.append(s["id"])
    else:
        assert coco_parent is not None
        coco = coco_parent
        images = [im for im in coco.get("images", []) if Path(str(im.get("file_name", ""))).stem not in {s["id"] for s in good}]
        dropped_ids = {im["id"] for im in coco.get("images", [])} - {im["id"] for im in images}
        anns_out = [a for a in coco.get("annotations", []) if a.get("image_id") not in dropped_ids]
        next_img = max([int(im["id"]) for im in coco.get("images", [])] + [0]) + 1
        next_ann = max([int(a["id"]) for a in coco.get("annotations", [])] + [0]) + 1
        for s in good:
            file_name = f"{s['id']}.{s['ext']}"
            images.append({"id": next_img, "file_name": file_name, "width": s["w"], "height": s["h"], "capture_id": s["id"]})
            for inst in s["instances"]:
                if not inst["mask"].any():
                    continue
                bbox, area = _bbox_area(inst["mask"])
                anns_out.append({"id": next_ann, "image_id": next_img, "category_id": known[inst["category"]],
                                 "segmentation": _rle(inst["mask"]), "area": area, "bbox": bbox, "iscrowd": inst["iscrowd"]})
                next_ann += 1
            next_img += 1
            new_files[f"images/{split}/{file_name}"] = s["data"]
            names.append(file_name)
        coco = dict(coco, images=images, annotations=anns_out)
        new_files[f"annotations/instances_{split}.json"] = json.dumps(coco).encode("utf-8")
    info = {"import": {"from": path.name, "format": fmt, "split": split, "captures": [s["id"] for s in good],
                       "skipped_unannotated": skipped, "store": store.describe()}}
    return add_samples(store, dataset_name, parent, new_files, {split: names}, notes={**info, **dict(notes or {})},
                       workers=workers)


# ----------------------------------------------------------------------------- simulated annotator


Truth = Union[Mapping[str, Any], Callable[[CaptureRecord], Any]]


def truth_from_dataset(root: Union[str, os.PathLike]) -> Callable[[CaptureRecord], Any]:
    """Ground truth of captures whose image bytes are files of a generated (or any) dataset root.

    Matches a capture to a file by the sha256 its metadata records. Pets layout: returns the
    trimap ``annotations/trimaps/<name>.png`` as an array; COCO layout: the image's
    annotations as ``[{"category": name, "segmentation": ..., "iscrowd": 0|1}]``. None when no
    file matches.
    """
    root = Path(root)
    index: dict[str, Any] = {}
    tri_dir = root / "annotations" / "trimaps"
    if tri_dir.is_dir():
        for p in sorted((root / "images").glob("*")):
            if p.is_file():
                index[hashlib.sha256(p.read_bytes()).hexdigest()] = ("pets", tri_dir / f"{p.stem}.png")
    for ann_file in sorted((root / "annotations").glob("instances_*.json")):
        split = ann_file.stem[len("instances_"):]
        data = json.loads(ann_file.read_text())
        cats = {c["id"]: c["name"] for c in data["categories"]}
        by_img: dict[int, list] = {}
        for a in data["annotations"]:
            by_img.setdefault(a["image_id"], []).append(
                {"category": cats[a["category_id"]], "segmentation": a["segmentation"], "iscrowd": a.get("iscrowd", 0)}
            )
        for im in data["images"]:
            p = root / "images" / split / im["file_name"]
            if p.is_file():
                index[hashlib.sha256(p.read_bytes()).hexdigest()] = ("coco", by_img.get(im["id"], []))
    if not index:
        raise DatasetError(f"{root} has no images/ with annotations to take ground truth from")

    def truth(rec: CaptureRecord) -> Any:
        hit = index.get(str(rec.meta.get("image_sha256")))
        if hit is None:
            return None
        kind, value = hit
        if kind == "pets":
            return read_label_png(value.read_bytes(), str(value)).astype(np.uint8)
        return value

    return truth


def simulate_annotation(
    store: ObjectStore,
    records: Iterable[CaptureRecord],
    truth: Truth,
    out_dir: Union[str, os.PathLike],
    *,
    skip_missing: bool = False,
) -> Path:
    """A stand-in annotator: writes the true annotation of each record, returns what to import.

    ``truth``: capture id -> value, or a callable(record) -> value (e.g. :func:`truth_from_dataset`);
    a semantic value is a trimap array (1/2/3), written as ``out_dir/trimaps/<id>.png``;
    an instance value is a list of ``{"category", "segmentation", "iscrowd"}``, written to
    ``out_dir/annotations.coco.json``. Returns the path to pass to :func:`import_annotations`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trimaps, coco_items = [], []
    for rec in records:
        value = truth(rec) if callable(truth) else truth.get(rec.id)
        if value is None:
            if skip_missing:
                continue
            raise DatasetError(f"no ground truth for capture {rec.id} ({rec.image_key})")
        if isinstance(value, np.ndarray):
            trimaps.append((rec, value))
        else:
            coco_items.append((rec, list(value)))
    if trimaps and coco_items:
        raise DatasetError("ground truth mixes trimaps and instances; simulate one task at a time")
    if trimaps:
        (out / "trimaps").mkdir(exist_ok=True)
        for rec, value in trimaps:
            (out / "trimaps" / f"{rec.id}.png").write_bytes(_png(np.asarray(value)))
        return out / "trimaps"
    names = sorted({inst["category"] for _, insts in coco_items for inst in insts})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}
    for n, (rec, insts) in enumerate(coco_items, 1):
        coco["images"].append({"id": n, "file_name": f"{rec.id}.jpg", "capture_id": rec.id})
        for inst in insts:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": n, "category_id": cat_ids[inst["category"]],
                                        "segmentation": inst["segmentation"], "iscrowd": int(inst.get("iscrowd", 0))})
    path = out / "annotations.coco.json"
    path.write_text(json.dumps(coco))
    return path


# ----------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=argparse.SUPPRESS,
                        help="store URL: a local directory or s3://BUCKET (endpoint from SEGLOOP_S3_ENDPOINT); "
                             "default $SEGLOOP_STORE or ./.segloop/store")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", help="captured at or after (date or ISO time, UTC)")
    filters.add_argument("--until", help="captured before (a bare date includes that day)")
    filters.add_argument("--model-version", help="only captures predicted by this model version")
    filters.add_argument("--task", choices=("semantic", "instance"))
    filters.add_argument("--exclude-dataset", metavar="NAME[@VERSION]",
                         help="leave out captures already annotated into this dataset (default version: latest)")
    parser = argparse.ArgumentParser(prog="python -m train.queue", parents=[common],
                                     description="Captured samples -> annotation -> new dataset versions.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("list", parents=[common, filters], help="captured samples, most uncertain first")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("export", parents=[common, filters], help="top-N samples with pre-annotations (Label Studio, COCO, trimaps)")
    p.add_argument("--top", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--image-url-prefix", default="images/", help="prefix of data.image in the Label Studio tasks")
    p = sub.add_parser("simulate", parents=[common], help="write ground-truth annotations for an export (demo annotator)")
    p.add_argument("export_dir")
    p.add_argument("--truth-root", required=True, help="the generated dataset root the served images came from")
    p.add_argument("--out", help="default: EXPORT_DIR/annotated")
    p = sub.add_parser("import", parents=[common], help="validate corrected annotations and create a new dataset version")
    p.add_argument("dataset")
    p.add_argument("annotations", help="Label Studio JSON export, COCO JSON, or a directory of <id>.png trimaps")
    p.add_argument("--parent", default="latest", help="parent version (id prefix or 'latest')")
    p.add_argument("--format", default="auto", choices=("auto", "coco", "labelstudio", "trimaps"))
    p.add_argument("--split", help="default: trainval (semantic) / train (instance)")
    p.add_argument("--replace", action="store_true", help="allow re-annotating samples already in the parent")
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _exclude(store: ObjectStore, spec: Optional[str]) -> Any:
    if not spec:
        return None
    from train.versions import get_version

    name, _, version = spec.partition("@")
    return get_version(store, name, version or "latest")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point. Exit codes: 0 ok, 1 store failure, 2 bad input."""
    from train.store import open_store, store_config_from_url
    from train.versions import parse_notes

    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        url = getattr(args, "store", None) or os.environ.get("SEGLOOP_STORE", "")
        store = open_store(store_config_from_url(url))
        if args.cmd == "list":
            recs = list_captures(store, args.since, args.until, args.model_version, task=args.task,
                                 exclude=_exclude(store, args.exclude_dataset), limit=args.limit)
            if args.json:
                print(json.dumps([r.summary() for r in recs], indent=1))
            else:
                for r in recs:
                    ent = f"{r.entropy:.4f}" if r.entropy is not None else "-"
                    conf = f"{r.confidence:.4f}" if r.confidence is not None else "-"
                    print(f"{r.id}  {_iso(r.time)}  entropy={ent}  confidence={conf}  "
                          f"model={r.model_name}@{r.model_version}  task={r.task}  {r.width}x{r.height}")
                print(f"{len(recs)} capture(s) in {store.describe()}", file=sys.stderr)
        elif args.cmd == "export":
            res = export(store, args.out, top=args.top, task=args.task, since=args.since, until=args.until,
                         model_version=args.model_version, exclude=_exclude(store, args.exclude_dataset),
                         image_url_prefix=args.image_url_prefix)
            for prob in res.problems:
                print(f"warning: left out: {prob}", file=sys.stderr)
            print(f"exported {len(res.records)} {res.task} sample(s) to {res.out_dir}: {res.label_studio.name}, "
                  f"{res.coco.name}" + (", trimaps/" if res.trimaps else ""))
        elif args.cmd == "simulate":
            exp = Path(args.export_dir)
            info = _read_json(exp / "export.json")
            recs = [get_capture(store, c["id"]) for c in info.get("captures", [])]
            path = simulate_annotation(store, recs, truth_from_dataset(args.truth_root), args.out or exp / "annotated")
            print(path)
        elif args.cmd == "import":
            m = import_annotations(store, args.dataset, args.parent, args.annotations, fmt=args.format, split=args.split,
                                   replace=args.replace, notes=parse_notes(args.note))
            added = m.notes.get("import", {}).get("captures", [])
            print(f"{m.ref}  parent={m.parent}  +{len(added)} sample(s)  files={len(m.files)}")
    except (ConfigError, DatasetError) as err:
        return cli_error(err, 2)
    except SegloopError as err:
        return cli_error(err, 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
