"""Synthetic datasets in the real on-disk layouts, small enough to learn on a CPU.

``generate_pets`` writes the Oxford-IIIT Pet layout (pet-like blobs with ears, a
border band, textured backgrounds); ``generate_coco`` writes COCO instances (and/or
YOLO-seg) of balls, boxes and triangles with non-contiguous category ids 1, 3, 7.
``shift=True`` renders the *same geometry* in a different style (swapped palette,
other texture families, lower contrast), which is how the demo simulates drift.

Every sample is rendered from its own seed, recorded in ``ROOT/synth.json``, so
ground truth can be reproduced later (``reproduce_sample``), e.g. by a simulated
annotator. Geometry and style use separate random streams of that seed.
"""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from dataplane.trimap import pet_trimap
from segloop.errors import ConfigError, DatasetError

# (name, species) — Oxford convention: cat breeds capitalised (species 1), dogs lowercase (species 2).
PET_BREEDS = (("Roundcat", 1), ("Boxcat", 1), ("floppy_dog", 2), ("long_dog", 2))
COCO_CATEGORIES = (
    {"id": 1, "name": "ball", "supercategory": "shape"},
    {"id": 3, "name": "box", "supercategory": "shape"},
    {"id": 7, "name": "tri", "supercategory": "shape"},
)
SYNTH_META = "synth.json"
_GENERATED = ("images", "annotations", "labels", "data.yaml", SYNTH_META)


# ----------------------------------------------------------------------------- helpers


def _check_args(n: int, size: int, fraction: float, what: str) -> None:
    for name, v in (("n", n), ("size", size), (what, fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{name} must be a number, got {v!r}")
    if int(n) < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if int(size) < 32:
        raise ConfigError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 <= float(fraction) < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {fraction}")


def _prepare_out(out: str | Path) -> Path:
    """Create ``out``; clear a previous generator run there, refuse to clobber anything else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / SYNTH_META).is_file():
            raise DatasetError(
                f"output directory {out} is not empty and was not written by the generator; choose another --out"
            )
        for name in _GENERATED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _sample_seeds(seed: int, n: int) -> list[int]:
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 1, size=n)]


def _split_indices(seed: int, n: int, fraction: float) -> set[int]:
    """Indices of the held-out split: round(n*fraction), at least 1 when n >= 2 and fraction > 0."""
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    k = min(k, n - 1)
    perm = np.random.default_rng([seed, 7]).permutation(n)
    return set(int(i) for i in perm[:k])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Value noise in [0,1]: a random ``cells``x``cells`` grid upsampled bilinearly."""
    grid = rng.random((cells, cells, channels)).astype(np.float32)
    planes = [
        np.asarray(Image.fromarray(grid[..., c]).resize((size, size), Image.BILINEAR), dtype=np.float32)
        for c in range(channels)
    ]
    return np.clip(np.stack(planes, -1), 0, 1)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _texture(rng: np.random.Generator, size: int, c1: np.ndarray, c2: np.ndarray, family: str) -> np.ndarray:
    """An HxWx3 float image mixing two colours with a texture of the given family."""
    xx, yy = _coords(size)
    theta = rng.uniform(0, np.pi)
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / size
    if family == "noise":
        t = _smooth_noise(rng, size, int(rng.integers(4, 10)))[..., 0]
    elif family == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 8) * u + rng.uniform(0, 2 * np.pi))
    elif family == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif family == "checker":
        k = size / rng.uniform(6, 12)
        t = ((np.floor(xx / k) + np.floor(yy / k)) % 2).astype(np.float32)
    elif family == "blotches":
        t = (_smooth_noise(rng, size, int(rng.integers(12, 20)))[..., 0] > 0.5).astype(np.float32)
    else:  # pragma: no cover - internal
        raise ValueError(family)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------- pets


def _pet_geometry(seed: int, size: int, breed: int | None = None) -> tuple[np.ndarray, int]:
    """Binary pet mask and breed index; depends only on the seed, size and ``breed`` (drawn if None)."""
    rng = np.random.default_rng([seed, 0])
    drawn = int(rng.integers(len(PET_BREEDS)))
    breed = drawn if breed is None else int(breed)
    cx, cy = rng.uniform(0.38, 0.62, 2) * size
    a = rng.uniform(0.18, 0.28) * size
    b = a * rng.uniform(0.75, 1.0)
    p = 2.0
    if breed == 1:
        p = rng.uniform(3.0, 4.5)
    elif breed == 3:
        a, b, p = a * 1.3, b * 0.6, 2.5
    theta = rng.uniform(-0.4, 0.4)
    xx, yy = _coords(size)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(theta), np.sin(theta)
    u, v = dx * c + dy * s, -dx * s + dy * c
    mask = (np.abs(u / a) ** p + np.abs(v / b) ** p) <= 1.0

    def to_img(pu: float, pv: float) -> tuple[float, float]:
        return (cx + pu * c - pv * s, cy + pu * s + pv * c)

    ears = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ears)
    spread = rng.uniform(0.35, 0.7)
    for side in (-1, 1):
        phi = -np.pi / 2 + side * spread  # around "up" in the body frame
        ux, uy = np.cos(phi), np.sin(phi)
        if PET_BREEDS[breed][1] == 1:  # cats: pointy triangles
            half = rng.uniform(0.18, 0.3)
            base = [to_img(a * np.cos(phi + d) * 0.9, b * np.sin(phi + d) * 0.9) for d in (-half, half)]
            reach = rng.uniform(1.3, 1.6)
            apex = to_img(a * ux * reach, b * uy * reach)
            draw.polygon([base[0], apex, base[1]], fill=1)
        else:  # dogs: round floppy ears
            rad = rng.uniform(0.22, 0.32) * b
            ex, ey = to_img(a * ux * 1.1, b * uy * 1.1)
            draw.ellipse([ex - rad, ey - rad, ex + rad, ey + rad], fill=1)
    mask |= np.asarray(ears, dtype=bool)
    return mask, breed


DEFAULT_FAMILIES = ("noise", "stripes", "gradient")
SHIFT_FAMILIES = ("checker", "blotches")


def _pet_style(
    seed: int, size: int, mask: np.ndarray, shift: bool, family: str | None = None, variant: int = 0
) -> Image.Image:
    """The image of a pet mask; ``family`` overrides the drawn texture family, ``variant`` > 0
    renders a near-copy (another noise draw, brightness within 4 %: a re-sent frame)."""
    rng = np.random.default_rng([seed, 1])
    if not shift:  # cool, saturated backgrounds; warm, furry pets
        bg_h, pet_h = rng.uniform(0.25, 0.7), rng.uniform(-0.03, 0.12)
        bg1 = _hsv(bg_h, rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.9))
        bg2 = _hsv(bg_h + rng.uniform(-0.1, 0.1), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.8))
        pet1 = _hsv(pet_h, rng.uniform(0.45, 0.9), rng.uniform(0.35, 0.95))
        pet2 = pet1 * rng.uniform(0.55, 0.8)
        drawn = DEFAULT_FAMILIES[int(rng.integers(3))]
        noise = 0.02
    else:  # palette swapped (warm backgrounds, cool pets), other textures, low contrast
        bg_h, pet_h = rng.uniform(-0.05, 0.15), rng.uniform(0.5, 0.8)
        v = rng.uniform(0.45, 0.7)
        bg1 = _hsv(bg_h, rng.uniform(0.2, 0.45), v)
        bg2 = _hsv(bg_h + 0.05, rng.uniform(0.1, 0.35), v * rng.uniform(0.7, 0.95))
        pet1 = _hsv(pet_h, rng.uniform(0.2, 0.45), v * rng.uniform(0.85, 1.1))
        pet2 = pet1 * rng.uniform(0.75, 0.9)
        drawn = SHIFT_FAMILIES[int(rng.integers(2))]
        noise = 0.05
    family = family or drawn
    bg = _texture(rng, size, bg1, bg2, family)
    fur = _smooth_noise(rng, size, int(rng.integers(6, 14)))
    pet = pet1 * (1 - fur) + pet2 * fur
    alpha = (
        np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32
        )[..., None]
        / 255.0
    )
    img = bg * (1 - alpha) + pet * alpha
    if variant:
        rng = np.random.default_rng([seed, 2, variant])
        img = img * rng.uniform(0.96, 1.04)
    return _finish(img, rng, noise)


def render_pet(
    seed: int,
    size: int = 128,
    shift: bool = False,
    breed: int | None = None,
    family: str | None = None,
    variant: int = 0,
) -> tuple[Image.Image, np.ndarray]:
    """One pet image and its Oxford trimap (uint8 [H,W], values 1/2/3); pure function of its args."""
    mask, _ = _pet_geometry(int(seed), int(size), breed)
    return _pet_style(int(seed), int(size), mask, bool(shift), family, int(variant)), pet_trimap(mask)


MIXES = ("random", "balanced", "production")


def pet_substyles(shift: bool) -> list[tuple[str, int]]:
    """Every (texture family, breed index) of a style: the sub-styles a pool is made of."""
    families = SHIFT_FAMILIES if shift else DEFAULT_FAMILIES
    return [(f, b) for f in families for b in range(len(PET_BREEDS))]


def _pet_plan(seed: int, n: int, shift: bool, mix: str, common: int, common_share: float, copies: int) -> list[dict]:
    """Per image: its seed and, for ``balanced``/``production``, sub-style and variant.

    ``balanced``: every sub-style in turn, all distinct. ``production``: what real traffic
    looks like: ``common`` sub-styles (chosen by the seed) make ``common_share`` of the
    images, each scene sent ``copies`` times (near-copies); the other sub-styles share the
    rest, one image per scene, so some are rare.
    """
    seeds = _sample_seeds(seed, n)
    if mix == "random":
        return [{"seed": s} for s in seeds]
    styles = pet_substyles(shift)
    if mix == "balanced":
        return [
            {"seed": s, "family": styles[i % len(styles)][0], "breed": styles[i % len(styles)][1]}
            for i, s in enumerate(seeds)
        ]
    order = [styles[i] for i in np.random.default_rng([seed, 3]).permutation(len(styles))]
    head, tail = order[:common], order[common:]
    n_common = min(n, int(round(n * common_share)))
    plan = []
    for i in range(n_common):
        scene = i // copies
        fam, breed = head[scene % len(head)]
        plan.append({"seed": seeds[scene * copies], "family": fam, "breed": breed, "variant": i % copies})
    for j, i in enumerate(range(n_common, n)):
        fam, breed = tail[j % len(tail)] if tail else head[j % len(head)]
        plan.append({"seed": seeds[i], "family": fam, "breed": breed, "variant": 0})
    return plan


def generate_pets(
    out: str | Path,
    n: int = 200,
    seed: int = 0,
    size: int = 128,
    shift: bool = False,
    test_fraction: float = 0.2,
    mix: str = "random",
    common: int = 2,
    common_share: float = 0.85,
    copies: int = 4,
) -> Path:
    """Write ``n`` synthetic pets in the Oxford-IIIT Pet layout under ``out``; returns ``out``.

    ``mix``: ``random`` (each image draws its sub-style), ``balanced`` (every texture family x
    breed in turn) or ``production`` (a redundant stream, see :func:`_pet_plan`).
    """
    _check_args(n, size, test_fraction, "test_fraction")
    if mix not in MIXES or not 1 <= int(common) <= 8 or not 0 < common_share <= 1 or int(copies) < 1:
        raise ConfigError(
            f"mix must be one of {MIXES}, common in 1..8, common_share in (0, 1], copies >= 1; "
            f"got {mix!r}, {common}, {common_share}, {copies}"
        )
    out = _prepare_out(out)
    (out / "images").mkdir()
    (out / "annotations" / "trimaps").mkdir(parents=True)
    test_idx = _split_indices(seed, n, test_fraction)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    samples = {}
    for i, spec in enumerate(_pet_plan(seed, n, shift, mix, int(common), float(common_share), int(copies))):
        image, trimap = render_pet(
            spec["seed"], size, shift, spec.get("breed"), spec.get("family"), spec.get("variant", 0)
        )
        breed = _pet_geometry(spec["seed"], 32, spec.get("breed"))[1]
        name = f"{PET_BREEDS[breed][0]}_{i + 1}"
        image.save(out / "images" / f"{name}.jpg", quality=92)
        Image.fromarray(trimap).save(out / "annotations" / "trimaps" / f"{name}.png")
        species = PET_BREEDS[breed][1]
        breed_id = 1 + sum(1 for b in PET_BREEDS[:breed] if b[1] == species)
        split = "test" if i in test_idx else "trainval"
        lines[split].append(f"{name} {breed + 1} {species} {breed_id}")
        samples[name] = {**spec, "breed": breed, "split": split}
    for split, ls in lines.items():
        (out / "annotations" / f"{split}.txt").write_text("".join(x + "\n" for x in ls))
    _write_meta(out, "pets", seed, size, shift, samples)
    return out


# ----------------------------------------------------------------------------- shapes (COCO / YOLO)


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    n = {"ball": 32, "box": 4, "tri": 3}[kind]
    rad = r if kind != "box" else r * 0.95
    pts = []
    for k in range(n):
        t = angle + 2 * np.pi * k / n
        pts += [round(float(cx + rad * np.cos(t)), 2), round(float(cy + rad * np.sin(t)), 2)]
    return pts


def _mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's JSON ``iscrowd`` encoding: column-major run lengths starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _shapes_geometry(seed: int, size: int, crowd: bool) -> list[dict[str, Any]]:
    """Non-overlapping instances ``{category_id, segmentation, iscrowd}``; geometry only."""
    rng = np.random.default_rng([seed, 0])
    placed: list[tuple[float, float, float]] = []

    def place(r: float) -> tuple[float, float] | None:
        for _ in range(60):
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in placed):
                placed.append((cx, cy, r))
                return float(cx), float(cy)
        return None

    insts = []
    if crowd:  # a cluster of small balls annotated as one iscrowd RLE region
        cr = 0.16 * size
        spot = place(cr)
        if spot is not None:
            m = Image.new("L", (size, size), 0)
            d = ImageDraw.Draw(m)
            for _ in range(int(rng.integers(4, 8))):
                rr = rng.uniform(0.03, 0.05) * size
                rho, phi = rng.uniform(0, cr - rr), rng.uniform(0, 2 * np.pi)
                x, y = spot[0] + rho * np.cos(phi), spot[1] + rho * np.sin(phi)
                d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=1)
            insts.append(
                {
                    "category_id": 1,
                    "segmentation": _mask_to_uncompressed_rle(np.asarray(m, dtype=np.uint8)),
                    "iscrowd": 1,
                }
            )
    for _ in range(int(rng.integers(1, 5))):
        kind_i = int(rng.integers(3))
        r = rng.uniform(0.1, 0.2) * size
        angle = rng.uniform(0, 2 * np.pi)
        spot = place(r)
        if spot is None:
            continue
        cat = COCO_CATEGORIES[kind_i]
        poly = _shape_polygon(cat["name"], spot[0], spot[1], r, angle)
        insts.append({"category_id": cat["id"], "segmentation": [poly], "iscrowd": 0})
    if not any(i["iscrowd"] == 0 for i in insts):  # always at least one real instance
        r = 0.12 * size
        insts.append(
            {"category_id": 1, "segmentation": [_shape_polygon("ball", size / 2, size / 2, r, 0.0)], "iscrowd": 0}
        )
        insts = [i for i in insts if i["iscrowd"] == 0]
    return insts


def _shapes_style(seed: int, size: int, insts: list[dict], shift: bool) -> Image.Image:
    rng = np.random.default_rng([seed, 1])
    if not shift:
        h = rng.uniform(0, 1)
        bg = _texture(
            rng,
            size,
            _hsv(h, 0.15, 0.35),
            _hsv(h + 0.1, 0.2, 0.5),
            ("noise", "stripes", "gradient")[int(rng.integers(3))],
        )
        noise = 0.02
    else:
        h = rng.uniform(0, 1)
        bg = _texture(
            rng, size, _hsv(h, 0.5, 0.55), _hsv(h + 0.5, 0.5, 0.75), ("checker", "blotches")[int(rng.integers(2))]
        )
        noise = 0.05
    canvas = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for inst in insts:
        if shift:
            col = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.45), rng.uniform(0.5, 0.8))
        else:
            col = _hsv(rng.uniform(0, 1), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        fill = tuple(int(c * 255) for c in col)
        if inst["iscrowd"]:
            m = mask_utils.decode(mask_utils.frPyObjects(inst["segmentation"], size, size))
            canvas.paste(Image.new("RGB", (size, size), fill), mask=Image.fromarray(m * 255))
        else:
            pts = inst["segmentation"][0]
            draw.polygon(list(zip(pts[0::2], pts[1::2])), fill=fill)
    return _finish(np.asarray(canvas, dtype=np.float32) / 255.0, rng, noise)


def render_shapes(
    seed: int, size: int = 128, shift: bool = False, crowd: bool = False
) -> tuple[Image.Image, list[dict]]:
    """One shapes image and its COCO-style instances (``category_id``, ``segmentation``, ``iscrowd``)."""
    insts = _shapes_geometry(int(seed), int(size), bool(crowd))
    return _shapes_style(int(seed), int(size), insts, bool(shift)), insts


def generate_coco(
    out: str | Path,
    n: int = 200,
    seed: int = 0,
    size: int = 128,
    shift: bool = False,
    val_fraction: float = 0.2,
    fmt: str = "coco",
) -> Path:
    """Write ``n`` shape images as COCO instances (``fmt`` "coco", "yolo" or "both"); returns ``out``.

    Every 5th image (index 2, 7, ...) also gets an ``iscrowd`` RLE region; YOLO labels
    cannot express crowds, so they are left out of the YOLO files.
    """
    _check_args(n, size, val_fraction, "val_fraction")
    if fmt not in ("coco", "yolo", "both"):
        raise ConfigError(f"fmt must be 'coco', 'yolo' or 'both', got {fmt!r}")
    out = _prepare_out(out)
    val_idx = _split_indices(seed, n, val_fraction)
    coco = {
        s: {"images": [], "annotations": [], "categories": [dict(c) for c in COCO_CATEGORIES]} for s in ("train", "val")
    }
    yolo_cls = {c["id"]: k for k, c in enumerate(COCO_CATEGORIES)}
    for s in ("train", "val"):
        (out / "images" / s).mkdir(parents=True)
        if fmt != "coco":
            (out / "labels" / s).mkdir(parents=True)
    samples = {}
    ann_id = 0
    for i, s in enumerate(_sample_seeds(seed, n)):
        crowd = i % 5 == 2
        split = "val" if i in val_idx else "train"
        name = f"{i + 1:06d}"
        image, insts = render_shapes(s, size, shift, crowd)
        image.save(out / "images" / split / f"{name}.jpg", quality=92)
        coco[split]["images"].append({"id": i + 1, "file_name": f"{name}.jpg", "height": size, "width": size})
        for inst in insts:
            ann_id += 1
            rle = mask_utils.frPyObjects(inst["segmentation"], size, size)
            rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
            coco[split]["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": inst["category_id"],
                    "segmentation": inst["segmentation"],
                    "area": float(mask_utils.area(rle)),
                    "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                    "iscrowd": inst["iscrowd"],
                }
            )
        if fmt != "coco":
            rows = []
            for inst in insts:
                if inst["iscrowd"]:
                    continue
                pts = inst["segmentation"][0]
                norm = [min(max(v / size, 0.0), 1.0) for v in pts]
                rows.append(f"{yolo_cls[inst['category_id']]} " + " ".join(f"{v:.6f}" for v in norm))
            (out / "labels" / split / f"{name}.txt").write_text("".join(r + "\n" for r in rows))
        samples[name] = {"seed": s, "split": split, "crowd": crowd}
    if fmt != "yolo":
        (out / "annotations").mkdir()
        for split, data in coco.items():
            (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    if fmt != "coco":
        names = "".join(f"  {k}: {c['name']}\n" for k, c in enumerate(COCO_CATEGORIES))
        (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}")
    _write_meta(out, "coco", seed, size, shift, samples)
    return out


# ----------------------------------------------------------------------------- metadata


def _write_meta(out: Path, task: str, seed: int, size: int, shift: bool, samples: dict) -> None:
    meta = {"task": task, "seed": int(seed), "size": int(size), "shift": bool(shift), "samples": samples}
    (out / SYNTH_META).write_text(json.dumps(meta, indent=1))


def read_meta(root: str | Path) -> dict[str, Any]:
    """The generator's ``synth.json`` of a dataset root."""
    path = Path(root) / SYNTH_META
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; {root} was not written by train.data.synth")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from None


def reproduce_sample(root: str | Path, name: str) -> tuple[Image.Image, Any]:
    """Re-render sample ``name`` of a generated dataset with its ground truth.

    Pets: ``(image, trimap uint8 [H,W] with 1/2/3)``; COCO: ``(image, instances)``.
    ``name`` may carry an extension (``Roundcat_3.jpg``).
    """
    meta = read_meta(root)
    key = Path(name).stem if Path(name).suffix else name
    sample = meta["samples"].get(key)
    if sample is None:
        raise DatasetError(f"sample {name!r} is not in {Path(root) / SYNTH_META}")
    if meta["task"] == "pets":
        extra = (sample.get("breed"), sample.get("family"), sample.get("variant", 0))
        return render_pet(sample["seed"], meta["size"], meta["shift"], *extra)
    return render_shapes(sample["seed"], meta["size"], meta["shift"], sample.get("crowd", False))
