"""Dataset readers, the synthetic generator and its CLI, on tiny generated data."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segloop.errors import ConfigError, DatasetError
from train.data import (
    CocoInstanceDataset,
    OxfordPetDataset,
    YoloSegDataset,
    build_dataset,
    collate_fn,
    yolo_to_coco,
)
from train.data.synth import generate_coco, generate_pets, render_pet, reproduce_sample

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return generate_pets(tmp_path_factory.mktemp("pets") / "pets", n=8, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_coco(tmp_path_factory.mktemp("shapes") / "shapes", n=8, seed=0, size=SIZE, fmt="both")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


# ----------------------------------------------------------------------------- pets


def test_pets_layout_reads_back_exactly(pets):
    lut = {1: 1, 2: 0, 3: 2}
    seen = 0
    for split in ("trainval", "test"):
        ds = OxfordPetDataset(pets, split)
        assert ds.num_classes == 3 and ds.class_names == ("background", "pet", "border") and ds.ignore_index == 255
        for i, name in enumerate(ds.names):
            image, target = ds[i]
            raw = _png(pets / "annotations" / "trimaps" / f"{name}.png")
            assert set(np.unique(raw)) <= {1, 2, 3}
            expected = np.vectorize(lut.get)(raw)
            assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
            assert target.dtype == torch.int64 and torch.equal(target, torch.from_numpy(expected))
            jpg = np.asarray(Image.open(pets / "images" / f"{name}.jpg").convert("RGB"))
            assert torch.equal(image, torch.from_numpy(jpg.copy()).permute(2, 0, 1))
            seen += 1
    assert seen == 8
    assert len(OxfordPetDataset(pets, "test")) == 2  # round(8 * 0.2)


def test_pets_border_ignore(pets):
    ds = OxfordPetDataset(pets, "trainval", border="ignore")
    _, target = ds[0]
    raw = _png(pets / "annotations" / "trimaps" / f"{ds.names[0]}.png")
    assert (raw == 3).any()
    assert torch.equal(target == 255, torch.from_numpy(raw == 3))
    assert set(target.unique().tolist()) == {0, 1, 255}


def test_pets_split_lines_are_oxford_format(pets):
    for line in (pets / "annotations" / "trainval.txt").read_text().splitlines():
        name, class_id, species, breed_id = line.split()
        assert int(class_id) >= 1 and species in ("1", "2") and int(breed_id) >= 1
        assert (species == "1") == name[0].isupper()  # Oxford: cats capitalised


def test_reproduce_sample_gives_ground_truth(pets):
    name = OxfordPetDataset(pets, "test").names[0]
    image, trimap = reproduce_sample(pets, name)
    assert np.array_equal(trimap, _png(pets / "annotations" / "trimaps" / f"{name}.png"))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)  # the generator's encoding
    assert buf.getvalue() == (pets / "images" / f"{name}.jpg").read_bytes()


def test_generator_is_deterministic(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(generate_pets(tmp_path / "a", n=4, seed=3, size=48))
    b = files(generate_pets(tmp_path / "b", n=4, seed=3, size=48))
    c = files(generate_pets(tmp_path / "c", n=4, seed=4, size=48))
    assert a == b and a != c
    a = files(generate_coco(tmp_path / "ca", n=4, seed=3, size=48))
    b = files(generate_coco(tmp_path / "cb", n=4, seed=3, size=48))
    assert a == b


def test_shift_keeps_geometry_and_changes_statistics():
    contrast, means = {}, {}
    for shift in (False, True):
        cs, ms = [], []
        for seed in range(12):
            image, trimap = render_pet(seed, SIZE, shift)
            a = np.asarray(image, dtype=np.float64) / 255
            cs.append(np.linalg.norm(a[trimap == 1].mean(0) - a[trimap == 2].mean(0)))
            ms.append(a.reshape(-1, 3).mean(0))
        contrast[shift], means[shift] = np.mean(cs), np.mean(ms, 0)
    assert np.array_equal(render_pet(5, SIZE, False)[1], render_pet(5, SIZE, True)[1])
    assert contrast[True] < 0.7 * contrast[False]  # pet harder to tell from background
    assert np.abs(means[True] - means[False]).max() > 0.05  # palette moved


def test_regenerating_into_foreign_dir_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        generate_pets(tmp_path, n=2, size=32)
    with pytest.raises(ConfigError, match="n must be"):
        generate_pets(tmp_path / "x", n=0)
    with pytest.raises(ConfigError, match="size must be"):
        generate_coco(tmp_path / "x", size=16)
    with pytest.raises(ConfigError, match="val_fraction must be a number"):
        generate_coco(tmp_path / "x", 4, 0, 64, False, "yolo")


# pets: bad inputs


def test_pets_image_missing_its_trimap(pets, tmp_path):
    root = _copy(pets, tmp_path)
    name = OxfordPetDataset(root, "trainval").names[1]
    (root / "annotations" / "trimaps" / f"{name}.png").unlink()
    with pytest.raises(DatasetError, match=f"{name}.png"):
        OxfordPetDataset(root, "trainval")


def test_pets_listed_image_missing(pets, tmp_path):
    root = _copy(pets, tmp_path)
    name = OxfordPetDataset(root, "trainval").names[0]
    (root / "images" / f"{name}.jpg").unlink()
    with pytest.raises(DatasetError, match=f"{name}.jpg"):
        OxfordPetDataset(root, "trainval")


def test_pets_trimap_value_4(pets, tmp_path):
    root = _copy(pets, tmp_path)
    ds = OxfordPetDataset(root, "trainval")
    path = root / "annotations" / "trimaps" / f"{ds.names[2]}.png"
    raw = np.asarray(Image.open(path)).copy()
    raw[0, 0] = 4
    Image.fromarray(raw).save(path)
    with pytest.raises(DatasetError, match=rf"{path.name}.*\[4\]"):
        ds[2]
    ds[0]  # other items still load


def test_pets_trimap_size_mismatch(pets, tmp_path):
    root = _copy(pets, tmp_path)
    ds = OxfordPetDataset(root, "trainval")
    path = root / "annotations" / "trimaps" / f"{ds.names[0]}.png"
    Image.fromarray(np.full((SIZE, SIZE + 3), 2, np.uint8)).save(path)
    with pytest.raises(DatasetError, match=f"{path.name}.*same size"):
        ds[0]


def test_pets_empty_or_missing_split_list(pets, tmp_path):
    root = _copy(pets, tmp_path)
    (root / "annotations" / "test.txt").write_text("\n")
    with pytest.raises(DatasetError, match="test.txt is empty"):
        OxfordPetDataset(root, "test")
    with pytest.raises(DatasetError, match="val.txt does not exist"):
        OxfordPetDataset(root, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        OxfordPetDataset(tmp_path / "nowhere", "test")


# ----------------------------------------------------------------------------- COCO


def test_coco_masks_match_pycocotools(shapes):
    for split in ("train", "val"):
        ann_file = shapes / "annotations" / f"instances_{split}.json"
        ref = COCO(str(ann_file))
        ds = CocoInstanceDataset(shapes, split)
        assert len(ds) == len(ref.imgs)
        for i in range(len(ds)):
            image, target = ds[i]
            anns = ref.loadAnns(ref.getAnnIds(imgIds=target["image_id"]))
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
            assert target["masks"].shape == (len(anns), SIZE, SIZE) and target["masks"].dtype == torch.uint8
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            for k, ann in enumerate(anns):
                assert np.array_equal(target["masks"][k].numpy(), ref.annToMask(ann))
                x, y, w, h = ann["bbox"]
                assert target["boxes"][k].tolist() == pytest.approx([x, y, x + w, y + h])
                assert ds.label_to_cat_id[int(target["labels"][k])] == ann["category_id"]
                assert int(target["iscrowd"][k]) == ann["iscrowd"]
                assert float(target["area"][k]) == pytest.approx(ann["area"])


def test_coco_index_is_evaluable(shapes):
    """Ground truth scored against itself gives AP 1 (fields COCOeval needs are present)."""
    from pycocotools.cocoeval import COCOeval

    ds = CocoInstanceDataset(shapes, "train")
    results = []
    for i in range(len(ds)):
        target = ds[i][1]
        for k in torch.nonzero(target["iscrowd"] == 0).flatten().tolist():
            rle = mask_utils.encode(np.asfortranarray(target["masks"][k].numpy()))
            results.append(
                {
                    "image_id": target["image_id"],
                    "category_id": ds.label_to_cat_id[int(target["labels"][k])],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "score": 1.0,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ds.coco, ds.coco.loadRes(results), "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_datasets_pickle(pets, shapes):
    """DataLoader workers and Ray ship datasets by pickle."""
    for ds in (OxfordPetDataset(pets, "test"), CocoInstanceDataset(shapes, "val"), YoloSegDataset(shapes, "val")):
        clone = pickle.loads(pickle.dumps(ds))
        a, b = ds[0], clone[0]
        assert torch.equal(a[0], b[0])


def test_coco_generator_writes_crowd_rle(shapes):
    data = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    data_val = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    crowd = [a for a in data["annotations"] + data_val["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert all(isinstance(a["segmentation"], list) for a in data["annotations"] if not a["iscrowd"])


def _write_coco(root: Path, anns: list[dict], categories=None, images=None, size=(32, 40)) -> Path:
    h, w = size
    (root / "images" / "val").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    Image.new("RGB", (w, h), (10, 20, 30)).save(root / "images" / "val" / "a.jpg")
    Image.new("RGB", (w, h), (10, 20, 30)).save(root / "images" / "val" / "b.jpg")
    data = {
        "images": images
        or [
            {"id": 5, "file_name": "a.jpg", "height": h, "width": w},
            {"id": 9, "file_name": "b.jpg", "height": h, "width": w},
        ],
        "annotations": anns,
        "categories": categories or [{"id": 7, "name": "tri"}, {"id": 1, "name": "ball"}, {"id": 3, "name": "box"}],
    }
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_rle_compressed_and_uncompressed(tmp_path):
    h, w = 32, 40
    m = np.zeros((h, w), np.uint8, order="F")
    m[4:20, 10:30] = 1
    m[25:28, 0:3] = 1
    comp = mask_utils.encode(np.asfortranarray(m))
    flat = m.flatten(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
    uncomp = {"counts": ([0] if flat[0] else []) + runs, "size": [h, w]}
    _write_coco(
        tmp_path,
        [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": {"counts": comp["counts"].decode(), "size": [h, w]},
            },
            {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 1, "segmentation": uncomp},
        ],
    )
    ds = CocoInstanceDataset(tmp_path, "val")
    _, target = ds[0]
    assert target["image_id"] == 5
    for k in range(2):
        assert np.array_equal(target["masks"][k].numpy(), m)
    # missing bbox/area were derived from the mask (COCO convention: x, y, w, h -> xyxy)
    assert target["boxes"][0].tolist() == [0.0, 4.0, 30.0, 28.0]
    assert target["area"].tolist() == [float(m.sum())] * 2
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["labels"].tolist() == [2, 1]


def test_coco_category_mapping_round_trip(tmp_path):
    poly = [[2, 2, 20, 2, 20, 20, 2, 20]]
    _write_coco(
        tmp_path,
        [{"id": i + 1, "image_id": 5, "category_id": cid, "segmentation": poly} for i, cid in enumerate((7, 1, 3))],
    )
    ds = CocoInstanceDataset(
        ann_file=tmp_path / "annotations" / "instances_val.json", img_dir=tmp_path / "images" / "val"
    )
    assert ds.cat_id_to_label == {1: 1, 3: 2, 7: 3}
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 7}
    assert ds.class_names == ("background", "ball", "box", "tri") and ds.num_classes == 4
    _, target = ds[0]
    assert [ds.label_to_cat_id[int(v)] for v in target["labels"]] == [7, 1, 3]


def test_coco_keeps_images_without_annotations(tmp_path):
    _write_coco(tmp_path, [{"id": 1, "image_id": 5, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]}])
    ds = CocoInstanceDataset(tmp_path, "val")
    assert len(ds) == 2
    _, target = ds[1]
    assert target["image_id"] == 9
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, 32, 40)


def test_coco_missing_image_file(tmp_path):
    images = [{"id": 1, "file_name": "ghost.jpg", "height": 32, "width": 40}]
    _write_coco(tmp_path, [], images=images)
    with pytest.raises(DatasetError, match=r"instances_val\.json.*ghost\.jpg"):
        CocoInstanceDataset(tmp_path, "val")


def test_coco_unknown_category(tmp_path):
    _write_coco(tmp_path, [{"id": 4, "image_id": 5, "category_id": 42, "segmentation": [[1, 1, 9, 1, 9, 9]]}])
    with pytest.raises(DatasetError, match=r"instances_val\.json.*unknown category id 42"):
        CocoInstanceDataset(tmp_path, "val")


def test_coco_malformed_json(tmp_path):
    path = _write_coco(tmp_path, [])
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError, match=r"instances_val\.json is not valid JSON.*line 2 column"):
        CocoInstanceDataset(tmp_path, "val")


def test_coco_missing_keys(tmp_path):
    path = _write_coco(tmp_path, [{"id": 1, "image_id": 5, "segmentation": [[1, 1, 9, 1, 9, 9]]}])
    with pytest.raises(DatasetError, match=r"instances_val\.json.*annotations\[0\].*category_id"):
        CocoInstanceDataset(tmp_path, "val")
    data = json.loads(path.read_text())
    del data["categories"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_val\.json.*'categories'"):
        CocoInstanceDataset(tmp_path, "val")


def test_coco_image_size_disagrees_with_json(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "height": 50, "width": 40}]
    _write_coco(tmp_path, [], images=images)
    ds = CocoInstanceDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match="a.jpg"):
        ds[0]


# ----------------------------------------------------------------------------- YOLO-seg


def _write_yolo(root: Path, lines: str, names="names: [cat, dog]\n") -> Path:
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "images" / "val" / "one.jpg")
    Image.new("RGB", (64, 48)).save(root / "images" / "val" / "two.jpg")  # no label file: no instances
    (root / "labels" / "val" / "one.txt").write_text(lines)
    (root / "data.yaml").write_text(names)
    return root / "labels" / "val" / "one.txt"


def test_yolo_polygon_to_mask_and_box(tmp_path):
    _write_yolo(tmp_path, "1 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75\n\n", names="names:\n  0: cat\n  1: dog\n")
    ds = YoloSegDataset(tmp_path, "val")
    assert ds.class_names == ("background", "cat", "dog")
    image, target = ds[0]
    assert image.shape == (3, 48, 64)
    assert target["boxes"].tolist() == [[16.0, 12.0, 48.0, 36.0]]
    assert target["labels"].tolist() == [2] and ds.label_to_cat_id[2] == 2
    expected = mask_utils.decode(mask_utils.frPyObjects([[16, 12, 48, 12, 48, 36, 16, 36]], 48, 64)[0])
    assert np.array_equal(target["masks"][0].numpy(), expected)
    assert target["masks"][0, 12:36, 16:48].all() and target["masks"].sum() == 32 * 24
    assert ds[1][1]["masks"].shape == (0, 48, 64)

    out = yolo_to_coco(tmp_path, "val", tmp_path / "coco.json")
    coco_ds = CocoInstanceDataset(ann_file=out, img_dir=tmp_path / "images" / "val")
    _, coco_target = coco_ds[0]
    for key in ("boxes", "labels", "masks", "area", "iscrowd"):
        assert torch.equal(coco_target[key], target[key])
    assert coco_ds.cat_id_to_label == ds.cat_id_to_label


def test_generated_yolo_matches_generated_coco(shapes):
    coco_ds, yolo_ds = CocoInstanceDataset(shapes, "train"), YoloSegDataset(shapes, "train")
    assert coco_ds.class_names == yolo_ds.class_names and coco_ds.names == yolo_ds.names
    for i in range(len(coco_ds)):
        c, y = coco_ds[i][1], yolo_ds[i][1]
        keep = c["iscrowd"] == 0  # YOLO cannot express crowd regions
        assert torch.equal(c["labels"][keep], y["labels"])
        inter = (c["masks"][keep].bool() & y["masks"].bool()).sum((1, 2)).float()
        union = (c["masks"][keep].bool() | y["masks"].bool()).sum((1, 2)).float()
        assert (inter / union).min() > 0.95


@pytest.mark.parametrize(
    "line, problem",
    [
        ("0 0.1 0.1 0.5 0.1 0.5", "odd number"),
        ("0 0.1 0.1 1.5 0.1 0.5 0.5", "outside"),
        ("5 0.1 0.1 0.5 0.1 0.5 0.5", "unknown class 5"),
        ("0 0.5 0.5 0.2 0.2", "at least 3 points"),
        ("zero 0.1 0.1 0.5 0.1 0.5 0.5", "integer class"),
    ],
)
def test_yolo_bad_line(tmp_path, line, problem):
    label = _write_yolo(tmp_path, f"0 0.1 0.1 0.5 0.1 0.5 0.5\n{line}\n")
    with pytest.raises(DatasetError, match=rf"{label.name}:2: .*{problem}"):
        YoloSegDataset(tmp_path, "val")


def test_yolo_missing_data_yaml(tmp_path):
    _write_yolo(tmp_path, "0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (tmp_path / "data.yaml").unlink()
    with pytest.raises(DatasetError, match="data.yaml"):
        YoloSegDataset(tmp_path, "val")


# ----------------------------------------------------------------------------- build_dataset / collate


def test_build_dataset_detects_layouts(pets, shapes, tmp_path):
    assert isinstance(build_dataset("semantic", pets, "train"), OxfordPetDataset)  # alias of trainval
    assert build_dataset("semantic", pets, "val").split == "test"
    assert build_dataset("semantic", pets, "trainval", border="ignore").border == "ignore"
    ds = build_dataset("instance", shapes, "val")
    assert type(ds) is CocoInstanceDataset
    yolo_only = _copy(shapes, tmp_path)
    shutil.rmtree(yolo_only / "annotations")
    assert isinstance(build_dataset("instance", yolo_only, "val"), YoloSegDataset)
    with pytest.raises(ConfigError, match="task"):
        build_dataset("panoptic", pets, "train")
    with pytest.raises(DatasetError, match="neither a COCO layout"):
        build_dataset("instance", pets, "train")


def test_collate_fn(shapes):
    ds = CocoInstanceDataset(shapes, "train")
    images, targets = collate_fn([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == ds.ids[1]


def test_transforms_are_applied(pets):
    from train.transforms import eval_transforms

    image, target = OxfordPetDataset(pets, "test", transforms=eval_transforms("semantic", 48))[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and target.shape == (48, 48)


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.data", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_synth_pets_and_coco(tmp_path):
    r = _cli("synth", "--task", "pets", "--out", str(tmp_path / "p"), "--n", "3", "--size", "48", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote 3 synthetic pets" in r.stdout and "trainval.txt (2 samples)" in r.stdout
    assert len(OxfordPetDataset(tmp_path / "p", "trainval")) == 2
    r = _cli(
        "synth",
        "--task",
        "coco",
        "--out",
        str(tmp_path / "c"),
        "--n",
        "3",
        "--size",
        "48",
        "--shift",
        "--format",
        "yolo",
    )
    assert r.returncode == 0, r.stderr
    assert "data.yaml" in r.stdout and (tmp_path / "c" / "labels" / "train").is_dir()
    assert json.loads((tmp_path / "c" / "synth.json").read_text())["shift"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--size", "16"], "--size must be >= 32"),
        (["--n", "two"], "--n must be an integer"),
        (["--val-fraction", "1.5"], "must be in [0, 1)"),
        (["--format", "yolo"], "--format applies only to --task coco"),
        (["--task", "dogs"], "invalid choice"),
    ],
)
def test_cli_bad_flags(tmp_path, args, message):
    base = {"--task": "pets", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = _cli("synth", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_reports_dataset_errors_without_traceback(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    r = _cli("synth", "--task", "pets", "--out", str(tmp_path), "--n", "2")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = _cli("check", "--task", "semantic", "--root", str(tmp_path), "--split", "trainval")
    assert r.returncode == 1 and "trainval.txt does not exist" in r.stderr


def test_pet_mixes_balanced_and_production_like(tmp_path: Path) -> None:
    """``balanced`` covers every texture family x breed equally; ``production`` is a redundant stream:
    two common sub-styles of near-copies (same trimap, different pixels), the rest rare; both reproducible."""
    from train.data.synth import read_meta

    root = generate_pets(tmp_path / "b", n=16, seed=1, size=48, shift=True, test_fraction=0, mix="balanced")
    meta = read_meta(root)["samples"]
    assert Counter((s["family"], s["breed"]) for s in meta.values()) == {
        (f, b): 2 for f in ("checker", "blotches") for b in range(4)
    }
    root = generate_pets(tmp_path / "p", n=40, seed=2, size=48, shift=True, test_fraction=0, mix="production")
    meta = read_meta(root)["samples"]
    styles = Counter((s["family"], s["breed"]) for s in meta.values())
    assert sum(n for _, n in styles.most_common(2)) == 34 and len(styles) == 8  # 85 % common, every style seen
    copies = [name for name, s in meta.items() if s["seed"] == meta[next(iter(meta))]["seed"]]
    assert len(copies) == 4
    a, b = (np.asarray(Image.open(root / "images" / f"{n}.jpg"), dtype=np.float32) for n in copies[:2])
    assert 0 < np.abs(a - b).mean() < 20  # near-copies: not the same bytes, nearly the same picture
    trimaps = [np.asarray(Image.open(root / "annotations" / "trimaps" / f"{n}.png")) for n in copies]
    assert all(np.array_equal(trimaps[0], t) for t in trimaps)
    image, trimap = reproduce_sample(root, copies[1])
    assert np.array_equal(trimap, trimaps[1])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)  # the generator's encoding
    assert buf.getvalue() == (root / "images" / f"{copies[1]}.jpg").read_bytes()
    with pytest.raises(ConfigError, match="mix must be one of"):
        generate_pets(tmp_path / "x", n=4, mix="skewed")
