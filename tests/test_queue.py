"""Annotation queue: list -> export -> (simulated) annotation -> import -> new dataset version.

Captures are written by the real Capturer from responses built with the serving code's
postprocess functions; stores are LocalStore and S3Store on a real moto server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import dataplane.annotation as q
from dataplane.capture import new_capture_id
from dataplane.store import LocalStore, blob_key
from dataplane.versions import (
    HeadMoved,
    create_version,
    get_version,
    latest_version,
    list_versions,
    materialize,
    verify_version,
)
from segloop.errors import ConfigError, DatasetError, StoreError
from serve_app.capture import Capturer
from serve_app.postprocess import semantic_fields
from train.data.synth import generate_coco, generate_pets

try:
    from tests.s3server import make_s3_store
except ImportError:  # tests/ on sys.path instead of the repo root
    from s3server import make_s3_store

CLASSES = ("background", "pet", "border")


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return generate_pets(tmp_path_factory.mktemp("q") / "pets", n=10, seed=3, size=64)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_coco(tmp_path_factory.mktemp("q") / "shapes", n=6, seed=3, size=64)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return make_s3_store(request.getfixturevalue("s3_server"))


def trimap_of(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "annotations" / "trimaps" / f"{name}.png"))


def capture_pets(store, root: Path, entropies: dict[str, float], version: str = "1") -> dict[str, str]:
    """Serve-like records for the named pets (prediction = ground truth shifted by 3 px); -> {name: capture id}."""
    with Capturer(store, "all") as cap:
        for name, entropy in entropies.items():
            labels = np.select([trimap_of(root, name) == 1, trimap_of(root, name) == 3], [1, 2], 0).astype(np.uint8)
            labels = np.roll(labels, 3, axis=1)
            probs = np.full((3, *labels.shape), 0.1)
            for c in range(3):
                probs[c][labels == c] = 0.8
            rec = semantic_fields(labels, probs, CLASSES)
            rec.update(
                entropy=entropy, model={"name": "segloop-pets", "version": version, "uri": "u"}, model_version=version
            )
            assert cap.offer((root / "images" / f"{name}.jpg").read_bytes(), "image/jpeg", rec)
        assert cap.flush(30) and cap.stats()["stored"] == len(entropies)
    by_sha = {hashlib.sha256((root / "images" / f"{n}.jpg").read_bytes()).hexdigest(): n for n in entropies}
    newest = sorted(q.list_captures(store), key=lambda r: r.time)  # later captures of a name win
    return {by_sha[r.meta["image_sha256"]]: r.id for r in newest if r.meta["image_sha256"] in by_sha}


def pet_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "images").glob("*.jpg"))


# ----------------------------------------------------------------------------- list


def test_list_sorted_by_entropy_with_filters(tmp_path, pets):
    store = LocalStore(tmp_path / "s")
    names = pet_names(pets)
    ids = capture_pets(store, pets, {names[0]: 0.2, names[1]: 0.9, names[2]: 0.5}, version="1")
    ids.update(capture_pets(store, pets, {names[3]: 0.7, names[4]: 0.5}, version="2"))
    recs = q.list_captures(store)
    assert [r.entropy for r in recs] == [0.9, 0.7, 0.5, 0.5, 0.2]
    assert recs[2].id == ids[names[4]] and recs[3].id == ids[names[2]]  # tie: newest first
    assert [r.entropy for r in q.list_captures(store, model_version="2")] == [0.7, 0.5]
    assert [r.entropy for r in q.list_captures(store, limit=2)] == [0.9, 0.7]
    now = dt.datetime.now(dt.UTC)
    assert q.list_captures(store, since=now + dt.timedelta(hours=1)) == []
    assert len(q.list_captures(store, since=now - dt.timedelta(hours=1), until=now + dt.timedelta(hours=1))) == 5
    assert len(q.list_captures(store, until=now.date().isoformat())) == 5  # a bare date includes the day
    assert q.list_captures(store, until=now - dt.timedelta(days=2)) == []
    assert q.list_captures(store, task="instance") == []
    with pytest.raises(ConfigError, match="not a date"):
        q.list_captures(store, since="yesterday-ish")
    # A corrupt capture JSON is skipped (strict: an error naming it).
    bad = f"captures/{now:%Y-%m-%d}/{new_capture_id()}.json"
    store.put_bytes(bad, b"{oops")
    assert len(q.list_captures(store)) == 5
    with pytest.raises(DatasetError, match="not valid JSON"):
        q.list_captures(store, strict=True)


# ----------------------------------------------------------------------------- export


def test_export_writes_valid_label_studio_coco_and_trimaps(tmp_path, pets):
    store = LocalStore(tmp_path / "s")
    names = pet_names(pets)
    ids = capture_pets(store, pets, {n: 0.1 * (i + 1) for i, n in enumerate(names[:5])})
    res = q.export(store, tmp_path / "out", top=3)
    assert res.task == "semantic" and res.problems == []
    assert [r.id for r in res.records] == [ids[names[4]], ids[names[3]], ids[names[2]]]

    tasks = json.loads(res.label_studio.read_text())
    config = ET.fromstring((tmp_path / "out" / "label_studio_config.xml").read_text())
    labels = {e.get("value") for e in config.iter("Label")}
    assert config.find("PolygonLabels").get("name") == "label" and labels == {"pet", "background", "border"}
    assert len(tasks) == 3
    for t, rec in zip(tasks, res.records):
        assert t["data"]["capture_id"] == rec.id and (tmp_path / "out" / t["data"]["image"]).is_file()
        pred = t["predictions"][0]
        assert pred["model_version"] == "1" and 0 < pred["score"] <= 1
        assert pred["result"], "a predicted pet should give at least one polygon"
        for region in pred["result"]:
            assert region["type"] == "polygonlabels" and region["from_name"] == "label" and region["to_name"] == "image"
            assert (region["original_width"], region["original_height"]) == (64, 64)
            assert region["value"]["polygonlabels"][0] in labels and region["value"]["closed"]
            pts = np.asarray(region["value"]["points"])
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3 and 0 <= pts.min() and pts.max() <= 100
        assert len({r["id"] for r in pred["result"]}) == len(pred["result"])

    coco = json.loads(res.coco.read_text())
    assert [c["name"] for c in coco["categories"]] == ["pet", "border"]
    assert len(coco["images"]) == 3 and {a["image_id"] for a in coco["annotations"]} == {1, 2, 3}
    for ann in coco["annotations"]:
        m = mask_utils.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        assert m.shape == (64, 64) and m.sum() == ann["area"] > 0

    for rec in res.records:
        trimap = np.asarray(Image.open(tmp_path / "out" / "trimaps" / f"{rec.id}.png"))
        assert trimap.shape == (64, 64) and set(np.unique(trimap)) <= {1, 2, 3}
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert [c["id"] for c in info["captures"]] == [r.id for r in res.records]

    # A capture whose image was modified after capture is left out and reported.
    store.put_bytes(res.records[0].image_key, b"\xff\xd8\xff not the original")
    res2 = q.export(store, tmp_path / "out2", top=3)
    assert len(res2.records) == 2 and res.records[0].id in res2.problems[0] and "sha256" in res2.problems[0]
    with pytest.raises(DatasetError, match="no captures"):
        q.export(store, tmp_path / "out3", top=3, model_version="nope")
    # A non-empty directory (maybe holding edited trimaps) is never overwritten.
    with pytest.raises(DatasetError, match="not empty"):
        q.export(store, tmp_path / "out", top=2)
    assert len(list((tmp_path / "out" / "trimaps").iterdir())) == 3


# ----------------------------------------------------------------------------- round trip


def test_round_trip_creates_a_verified_child_version(store, tmp_path, pets):
    parent = create_version(store, "pets", pets, "semantic")
    names = pet_names(pets)
    ids = capture_pets(store, pets, {n: 0.1 * (i + 1) for i, n in enumerate(names[:4])})
    res = q.export(store, tmp_path / "out", top=3, exclude=parent)
    annotated = q.simulate_annotation(store, res.records, q.truth_from_dataset(pets), tmp_path / "ann")
    child = q.import_annotations(store, "pets", parent.version, annotated)

    assert child.parent == parent.version and child.version != parent.version
    verify_version(store, child)
    new = [r.id for r in res.records]
    assert child.splits["trainval"][: len(parent.splits["trainval"])] == parent.splits["trainval"]
    assert sorted(child.splits["trainval"][len(parent.splits["trainval"]) :]) == sorted(new)
    assert sorted(child.notes["import"]["captures"]) == sorted(new)
    # The parent is untouched and still verifies.
    again = get_version(store, "pets", parent.version)
    assert again.digest == parent.digest and verify_version(store, again) == []

    out = materialize(store, child, tmp_path / "child")
    truth = {r.id: n for n, r_id in ids.items() for r in res.records if r.id == r_id}
    for cid, name in truth.items():
        assert np.array_equal(trimap_of(out, cid), trimap_of(pets, name))  # the annotator's (true) trimap
        assert (out / "images" / f"{cid}.jpg").read_bytes() == (pets / "images" / f"{name}.jpg").read_bytes()
    assert sorted((out / "annotations" / "trainval.txt").read_text().split()[-3:]) == sorted(new)
    from train.data.pets import OxfordPetDataset

    ds = OxfordPetDataset(out, "trainval")
    image, target = ds[ds.names.index(new[0])]
    assert tuple(image.shape) == (3, 64, 64) and set(target.unique().tolist()) <= {0, 1, 2}

    # Already-imported captures are excluded from the next export, and refused on re-import.
    assert {r.id for r in q.list_captures(store, exclude=child)} == {ids[names[0]]}
    with pytest.raises(DatasetError, match="already in"):
        q.import_annotations(store, "pets", child.version, annotated)

    # A tampered blob of the new version is detected, naming the file.
    entry = child.file_map[f"annotations/trimaps/{new[0]}.png"]
    store.put_bytes(blob_key(entry.sha256), b"tampered")
    with pytest.raises(StoreError, match=f"annotations/trimaps/{new[0]}.png"):
        verify_version(store, child)


def test_coco_and_label_studio_pre_annotations_import_back(tmp_path, pets):
    store = LocalStore(tmp_path / "s")
    parent = create_version(store, "pets", pets, "semantic")
    names = pet_names(pets)
    capture_pets(store, pets, {n: 0.5 for n in names[:3]})
    res = q.export(store, tmp_path / "out", top=3)
    predicted = {r.id: np.asarray(Image.open(res.trimaps / f"{r.id}.png")) for r in res.records}

    # COCO pre-annotations accepted as they are -> exactly the predicted trimaps.
    m = q.import_annotations(store, "pets", parent.version, res.coco, fmt="coco")
    out = materialize(store, m, tmp_path / "coco")
    for cid, tri in predicted.items():
        assert np.array_equal(trimap_of(out, cid), tri)

    # Label Studio: predictions copied to annotations (what "accept" does) -> the same trimaps up to
    # the polygon conversion.
    tasks = json.loads(res.label_studio.read_text())
    for t in tasks:
        t["annotations"] = [{"id": 1, "result": t["predictions"][0]["result"], "was_cancelled": False}]
        t["data"]["image"] = "/data/upload/1/" + "abc123-" + Path(t["data"]["image"]).name
        del t["data"]["capture_id"]  # found in the upload name instead
    ls_path = tmp_path / "ls_export.json"
    ls_path.write_text(json.dumps(tasks))
    with pytest.raises(HeadMoved, match="is not the head"):  # parent is behind: never a silent fork
        q.import_annotations(store, "pets", parent.version, ls_path)
    m2 = q.import_annotations(store, "pets", parent.version, ls_path, branch=True)  # an alternative, on purpose
    assert m2.version != m.version and latest_version(store, "pets").version == m.version
    out2 = materialize(store, m2, tmp_path / "ls")
    for cid, tri in predicted.items():
        got = trimap_of(out2, cid)
        pet_a, pet_b = got != 2, tri != 2
        assert (pet_a & pet_b).sum() / (pet_a | pet_b).sum() > 0.9
        assert (got == tri).mean() > 0.95


def test_bad_imports_name_every_sample_and_write_nothing(tmp_path, pets):
    store = LocalStore(tmp_path / "s")
    parent = create_version(store, "pets", pets, "semantic")
    names = pet_names(pets)
    ids = list(capture_pets(store, pets, {n: 0.5 for n in names[:4]}).values())
    blobs_before = set(store.list("blobs/"))

    d = tmp_path / "trimaps"
    d.mkdir()
    (d / f"{ids[0]}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt PNG
    Image.fromarray(np.full((32, 64), 2, np.uint8)).save(d / f"{ids[1]}.png")  # wrong size
    bad_values = np.full((64, 64), 2, np.uint8)
    bad_values[5, 5] = 7
    Image.fromarray(bad_values).save(d / f"{ids[2]}.png")  # trimap value 7
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / f"{ids[3]}.png")  # colour image, not a label map
    Image.fromarray(np.full((64, 64), 2, np.uint8)).save(d / f"{new_capture_id()}.png")  # no such capture
    with pytest.raises(DatasetError) as err:
        q.import_annotations(store, "pets", parent.version, d)
    msg = str(err.value)
    assert "5 problem(s)" in msg and "nothing was written" in msg
    assert f"sample {ids[0]}" in msg and "cannot be decoded" in msg
    assert f"sample {ids[1]}" in msg and "64x32" in msg
    assert f"sample {ids[2]}" in msg and "[7]" in msg
    assert f"sample {ids[3]}" in msg and "mode RGB" in msg and "no capture" in msg

    # Label Studio: unknown class, unsupported brush region, a task for no known capture.
    region = {
        "type": "polygonlabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": 64,
        "original_height": 64,
        "value": {"points": [[10, 10], [50, 10], [50, 50]], "polygonlabels": ["cat"]},
    }
    tasks = [
        {"data": {"capture_id": ids[0]}, "annotations": [{"result": [region]}]},
        {"data": {"capture_id": ids[1]}, "annotations": [{"result": [{"type": "brushlabels", "value": {}}]}]},
        {"data": {"capture_id": ids[2]}, "annotations": [{"result": [dict(region, original_width=128)]}]},
        {"data": {"image": "x.jpg"}, "annotations": [{"result": []}]},
    ]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    with pytest.raises(DatasetError) as err:
        q.import_annotations(store, "pets", parent.version, tmp_path / "ls.json")
    msg = str(err.value)
    assert f"sample {ids[0]}" in msg and "unknown class 'cat'" in msg
    assert f"sample {ids[1]}" in msg and "brushlabels" in msg
    assert f"sample {ids[2]}" in msg and "128x64" in msg
    assert "task[3]" in msg and "cannot tell which capture" in msg

    # COCO: unknown category, RLE of the wrong size.
    rle = mask_utils.encode(np.asfortranarray(np.ones((32, 32), np.uint8)))
    coco = {
        "images": [
            {"id": 1, "file_name": f"{ids[0]}.jpg", "width": 64, "height": 64},
            {"id": 2, "file_name": f"{ids[1]}.jpg", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 9, "segmentation": [[1, 1, 20, 1, 20, 20]]},
            {
                "id": 2,
                "image_id": 2,
                "category_id": 1,
                "segmentation": {"size": [32, 32], "counts": rle["counts"].decode()},
            },
        ],
        "categories": [{"id": 1, "name": "pet"}, {"id": 9, "name": "dog"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as err:
        q.import_annotations(store, "pets", parent.version, tmp_path / "coco.json")
    msg = str(err.value)
    assert f"sample {ids[0]}" in msg and "unknown class 'dog'" in msg
    assert f"sample {ids[1]}" in msg and "32x32" in msg

    # Malformed JSON names the file.
    (tmp_path / "broken.json").write_text('[{"data": ')
    with pytest.raises(DatasetError, match=r"broken.json is not valid JSON"):
        q.import_annotations(store, "pets", parent.version, tmp_path / "broken.json")

    # A captured image modified after capture is caught on import.
    rec = q.get_capture(store, ids[3])
    store.put_bytes(rec.image_key, (pets / "images" / f"{names[5]}.jpg").read_bytes())
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.full((64, 64), 2, np.uint8)).save(good / f"{ids[3]}.png")
    with pytest.raises(DatasetError, match=f"sample {ids[3]}.*does not match its recorded sha256"):
        q.import_annotations(store, "pets", parent.version, good)

    assert [m.version for m in list_versions(store, "pets")] == [parent.version]
    assert set(store.list("blobs/")) == blobs_before


def test_import_failing_part_way_leaves_no_version(tmp_path, pets):
    class FailingStore(LocalStore):
        fail_after = None
        puts = 0

        def put_bytes(self, key, data, content_type=None):
            if self.fail_after is not None and key.startswith("blobs/"):
                self.puts += 1
                if self.puts > self.fail_after:
                    raise StoreError(f"S3 went away while writing {key}")
            super().put_bytes(key, data, content_type)

    store = FailingStore(tmp_path / "s")
    parent = create_version(store, "pets", pets, "semantic")
    ids = capture_pets(store, pets, {n: 0.5 for n in pet_names(pets)[:3]})
    # Corrected trimaps differ from the parent's, so the import uploads 3 trimaps + the split list.
    truth = {
        cid: np.where(trimap_of(pets, name) == 3, 1, trimap_of(pets, name)).astype(np.uint8)
        for name, cid in ids.items()
    }
    ann = q.simulate_annotation(store, [q.get_capture(store, i) for i in ids.values()], truth, tmp_path / "a")
    store.fail_after = 2
    with pytest.raises(StoreError, match="went away"):
        q.import_annotations(store, "pets", parent.version, ann)
    assert [m.version for m in list_versions(store, "pets")] == [parent.version]
    store.fail_after = None
    child = q.import_annotations(store, "pets", parent.version, ann)  # retry after the outage works
    assert verify_version(store, child) == []


def capture_shapes(store, shapes: Path, n: int) -> dict:
    """Serve-like instance records (prediction = the ground truth, score 0.6) of the first ``n``
    training images; -> the dataset's COCO JSON."""
    ann = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    class_names = ["background"] + [cats[i] for i in sorted(cats)]
    with Capturer(store, "all") as cap:
        for k, im in enumerate(ann["images"][:n]):
            insts = []
            for a in ann["annotations"]:
                if a["image_id"] != im["id"] or a["iscrowd"]:
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 64, 64))
                insts.append(
                    {
                        "category_id": class_names.index(cats[a["category_id"]]),
                        "category_name": cats[a["category_id"]],
                        "score": 0.6,
                        "bbox": a["bbox"],
                        "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()},
                    }
                )
            rec = {
                "task": "instance",
                "width": 64,
                "height": 64,
                "class_names": class_names,
                "instances": insts,
                "num_instances": len(insts),
                "confidence": 0.6,
                "entropy": 0.3 + 0.1 * k,
                "model": {"name": "segloop-shapes", "version": "4"},
                "model_version": "4",
            }
            cap.offer((shapes / "images" / "train" / im["file_name"]).read_bytes(), None, rec)
        assert cap.flush(20)
    return ann


def test_instance_round_trip_through_coco(tmp_path, shapes):
    store = LocalStore(tmp_path / "s")
    parent = create_version(store, "shapes", shapes, "instance")
    ann = capture_shapes(store, shapes, 3)
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    res = q.export(store, tmp_path / "out", top=3)
    assert res.task == "instance" and res.trimaps is None
    tasks = json.loads(res.label_studio.read_text())
    assert all(r["value"]["polygonlabels"][0] in cats.values() for t in tasks for r in t["predictions"][0]["result"])

    child = q.import_annotations(store, "shapes", parent.version, res.coco)
    verify_version(store, child)
    out = materialize(store, child, tmp_path / "child")
    merged = json.loads((out / "annotations" / "instances_train.json").read_text())
    new_imgs = [im for im in merged["images"] if "capture_id" in im]
    assert len(new_imgs) == 3 and len(merged["images"]) == len(ann["images"]) + 3
    assert len({im["id"] for im in merged["images"]}) == len(merged["images"])
    assert len({a["id"] for a in merged["annotations"]}) == len(merged["annotations"])
    assert merged["categories"] == ann["categories"]
    for im in new_imgs:
        assert (out / "images" / "train" / im["file_name"]).is_file()
        assert im["file_name"] in child.splits["train"]
    new_anns = [a for a in merged["annotations"] if a["image_id"] in {im["id"] for im in new_imgs}]
    assert new_anns and {a["category_id"] for a in new_anns} <= set(cats)

    # LS import of an instance dataset: polygon labels must be dataset categories.
    for t in tasks:
        t["annotations"] = [{"result": t["predictions"][0]["result"]}]
        for r in t["annotations"][0]["result"]:
            r["value"]["polygonlabels"] = ["blob"]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    with pytest.raises(DatasetError, match="unknown class 'blob'"):
        q.import_annotations(store, "shapes", parent.version, tmp_path / "ls.json")
    with pytest.raises(DatasetError, match="only annotate semantic"):
        q.import_annotations(store, "shapes", parent.version, res.out_dir, fmt="trimaps")


# ----------------------------------------------------------------------------- CLI


def test_cli_list_export_simulate_import(tmp_path, pets, monkeypatch, capsys):
    store_dir = tmp_path / "s"
    store = LocalStore(store_dir)
    parent = create_version(store, "pets", pets, "semantic")
    capture_pets(store, pets, {n: 0.1 * (i + 1) for i, n in enumerate(pet_names(pets)[:3])})
    monkeypatch.setenv("SEGLOOP_STORE", str(store_dir))

    assert q.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [round(r["entropy"], 1) for r in listed] == [0.3, 0.2, 0.1]
    assert q.main(["export", "--top", "2", "--out", str(tmp_path / "exp")]) == 0
    assert "exported 2 semantic" in capsys.readouterr().out
    assert q.main(["simulate", str(tmp_path / "exp"), "--truth-root", str(pets)]) == 0
    annotated = capsys.readouterr().out.strip()
    assert q.main(["import", "pets", annotated, "--note", "who=sim"]) == 0
    out = capsys.readouterr().out
    child = get_version(store, "pets", "latest")
    assert child.parent == parent.version and child.ref in out and "+2 sample(s)" in out
    assert child.notes["who"] == "sim"
    assert q.main(["list", "--exclude-dataset", "pets"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1

    assert q.main(["import", "pets", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert q.main(["export", "--top", "0", "--out", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------- retention


def test_retention_deletes_old_unused_captures_and_keeps_what_is_exported_or_versioned(tmp_path, pets):
    import datetime as dt

    from dataplane.retention import prune_captures
    from dataplane.versions import add_samples

    store = LocalStore(tmp_path / "s")
    parent = create_version(store, "pets", pets, "semantic")
    names = pet_names(pets)
    ids = capture_pets(store, pets, {names[0]: 0.9, names[1]: 0.5, names[2]: 0.3, names[3]: 0.2})
    q.export(store, tmp_path / "out", top=1)  # the most uncertain one went to annotators
    add_samples(store, "pets", parent, {}, {"trainval": [ids[names[1]]]})  # one became a sample
    before = set(store.list("captures/"))

    assert prune_captures(store, 7).deleted == []  # all are recent
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=40)
    dry = prune_captures(store, 7, now=later, dry_run=True)
    assert sorted(dry.deleted) == sorted([ids[names[2]], ids[names[3]]]) and set(store.list("captures/")) == before
    done = prune_captures(store, 7, now=later)
    assert sorted(done.deleted) == sorted(dry.deleted) and done.kept_in_use == 2
    left = {k.split("/")[2].split(".")[0] for k in store.list("captures/")}
    assert left == {ids[names[0]], ids[names[1]]}
    assert len(q.list_captures(store)) == 2  # no record points at a deleted image
    with pytest.raises(ConfigError, match="at least 1 day"):
        prune_captures(store, 0)
