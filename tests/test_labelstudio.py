"""Label Studio in the loop, against a real Label Studio server (PyPI's, in .venv-labelstudio)
and a real S3 server (moto): push a batch with predictions, annotate through the API as an
annotator would, pull the finished annotations into a new dataset version.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import encode_rle as sdk_encode_rle
from PIL import Image

import dataplane.annotation as q
from dataplane.annotation import labelstudio as lsfmt
from dataplane.annotation.ls_project import LabelStudioTarget, project_tasks, pull, push
from dataplane.masks import brush_rle_decode
from dataplane.store import LocalStore
from dataplane.versions import create_version, latest_version, materialize
from segloop.errors import DatasetError
from tests.s3server import make_s3_store
from tests.test_queue import capture_pets, pet_names, trimap_of

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    from train.data.synth import generate_pets

    return generate_pets(tmp_path_factory.mktemp("ls") / "pets", n=8, seed=5, size=48)


def target_for(server, **kw) -> LabelStudioTarget:
    return LabelStudioTarget(server.url, f"test {uuid.uuid4().hex[:8]}", api_key=server.api_key, **kw)


def annotate(ls, task_id: int, trimap: np.ndarray, *, sdk_codec: bool = False) -> None:
    """Submit a trimap as an annotator would: pet and border brush masks (Label Studio's RLE)."""
    h, w = trimap.shape
    result = lsfmt.semantic_brush_regions(trimap, w, h)
    if sdk_codec:  # Label Studio's own encoder (label_studio_sdk.converter.brush), as its tools write it
        for r in result:
            mask = trimap == (1 if r["value"]["brushlabels"] == ["pet"] else 3)
            r["value"]["rle"] = sdk_encode_rle(np.repeat(mask.ravel().astype(np.uint8) * 255, 4))
    ls.annotations.create(id=task_id, result=result, was_cancelled=False, lead_time=3.0)


def version_trimaps(store, manifest, tmp_path) -> dict[str, np.ndarray]:
    out = materialize(store, manifest, tmp_path / f"m-{manifest.version}")
    return {p.stem: np.asarray(Image.open(p)) for p in (out / "annotations" / "trimaps").glob("*.png")}


def test_push_annotate_pull_through_a_real_label_studio(label_studio, s3_server, pets, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGLOOP_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("SEGLOOP_S3_SECRET_KEY", s3_server.secret_key)
    store = make_s3_store(s3_server)
    parent = create_version(store, "pets", pets, "semantic")
    names = pet_names(pets)[:5]
    ids = capture_pets(store, pets, {n: 0.1 * (i + 1) for i, n in enumerate(names)})
    truth = {cid: trimap_of(pets, name) for name, cid in ids.items()}
    records = q.list_captures(store)  # most uncertain first: the priority order
    target = target_for(label_studio)

    # Push: tasks in priority order, the prediction (exact brush masks) scored by its uncertainty.
    res = push(store, target, records, {r.id: r.entropy for r in records})
    assert res.added == [r.id for r in records] and res.already == [] and res.problems == []
    again = push(store, target, records)
    assert again.added == [] and again.already == [r.id for r in records]
    ls = target.client()
    tasks = project_tasks(ls, res.project_id)
    assert [t["data"]["capture_id"] for t in tasks] == [r.id for r in records]
    assert [t["data"]["priority"] for t in tasks] == [1, 2, 3, 4, 5]
    project = ls.projects.get(id=res.project_id)
    assert project.sampling == "Sequential sampling" and "<BrushLabels" in project.label_config
    headers = {"Authorization": f"Token {label_studio.api_key}"}
    for task, rec in zip(tasks, records):
        (pred,) = task["predictions"]
        assert pred["model_version"] == "1" and pred["score"] == pytest.approx(rec.entropy)
        # the pre-annotation is the model's prediction, pixel for pixel (capture_pets: truth shifted 3 px)
        masks = {r["value"]["brushlabels"][0]: brush_rle_decode(r["value"]["rle"], 48, 48, "t") for r in pred["result"]}
        predicted = q.trimap_from_pet_mask(np.zeros((48, 48), bool))
        predicted[:] = 2
        predicted[masks["pet"]] = 1
        predicted[masks.get("border", np.zeros((48, 48), bool))] = 3
        expected = np.roll(np.where(truth[rec.id] == 2, 2, truth[rec.id]), 3, axis=1)
        assert (predicted == expected).all()
        # the image is read from the object store through Label Studio (presigned URL), not copied
        image = requests.get(label_studio.url + task["data"]["image"], headers=headers, timeout=10)
        assert image.status_code == 200 and image.content == store.get_bytes(rec.image_key)

    # Annotate: three finished (one with Label Studio's own RLE encoder), one skipped, one untouched.
    finished, skipped, untouched = tasks[:3], tasks[3], tasks[4]
    for k, t in enumerate(finished):
        annotate(ls, t["id"], truth[t["data"]["capture_id"]], sdk_codec=k == 0)
    ls.annotations.create(id=skipped["id"], result=[], was_cancelled=True)

    v1, status = pull(store, target, "pets")
    assert v1 is not None and v1.parent == parent.version and status.finished == 3 and status.waiting == 2
    assert sorted(v1.notes["import"]["captures"]) == sorted(t["data"]["capture_id"] for t in finished)
    got = version_trimaps(store, v1, tmp_path)
    for t in finished:
        cid = t["data"]["capture_id"]
        assert (got[cid] == truth[cid]).all(), f"task {t['id']}: pulled trimap differs from the ground truth"
    assert skipped["data"]["capture_id"] not in got and untouched["data"]["capture_id"] not in got

    # Pulling again without new annotations creates nothing.
    again_v, again_status = pull(store, target, "pets")
    assert again_v is None and again_status.finished == 0 and again_status.waiting == 2
    assert latest_version(store, "pets").version == v1.version

    # Second round: the skipped task with a cut-off brush mask (malformed), the untouched one with
    # only its border painted (partial): both named by task id, nothing written.
    bad = lsfmt.semantic_brush_regions(truth[skipped["data"]["capture_id"]], 48, 48)
    bad[0]["value"]["rle"] = bad[0]["value"]["rle"][:20]
    ls.annotations.create(id=skipped["id"], result=bad, was_cancelled=False)
    partial = [r for r in lsfmt.semantic_brush_regions(truth[untouched["data"]["capture_id"]], 48, 48)]
    partial = [r for r in partial if r["value"]["brushlabels"] == ["border"]]
    ls.annotations.create(id=untouched["id"], result=partial, was_cancelled=False)
    with pytest.raises(DatasetError) as err:
        pull(store, target, "pets")
    msg = str(err.value)
    assert "2 problem(s), nothing was written" in msg
    assert f"task {skipped['id']}): result[0]: brush RLE is cut short" in msg
    assert f"task {untouched['id']}): no pet painted" in msg
    assert latest_version(store, "pets").version == v1.version

    # Third round: both corrected (the last annotation counts) -> the next version, exact.
    for t in (skipped, untouched):
        annotate(ls, t["id"], truth[t["data"]["capture_id"]])
    v2, status = pull(store, target, "pets")
    assert v2 is not None and v2.parent == v1.version and status.finished == 2 and status.waiting == 0
    got = version_trimaps(store, v2, tmp_path)
    assert set(truth) <= set(got) and all((got[cid] == truth[cid]).all() for cid in truth)


def test_cli_push_pull_with_the_local_store(label_studio, pets, tmp_path, monkeypatch, capsys):
    """The embedded default: images served by Label Studio's local-files storage from the store's directory."""
    store = LocalStore(tmp_path / "store")
    create_version(store, "pets", pets, "semantic")
    names = pet_names(pets)
    ids = capture_pets(store, pets, {n: 0.1 * (i + 1) for i, n in enumerate(names)})
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    title = f"cli {uuid.uuid4().hex[:8]}"
    argv = ["--store", str(store.root), "push", "--label-studio", label_studio.url, "--project", title]
    assert q.main([*argv, "--top", "3"]) == 0
    assert "pushed 3 task(s)" in capsys.readouterr().out
    assert q.main([*argv, "--top", "2"]) == 0  # the next batch: not the same captures
    assert "pushed 2 task(s)" in capsys.readouterr().out
    target = LabelStudioTarget(label_studio.url, title, api_key=label_studio.api_key)
    ls = target.client()
    (project,) = [p for p in ls.projects.list() if p.title == title]
    tasks = project_tasks(ls, project.id)
    assert len({t["data"]["capture_id"] for t in tasks}) == 5
    entropies = [q.get_capture(store, t["data"]["capture_id"]).entropy for t in tasks]
    assert entropies == sorted(entropies, reverse=True)  # each batch the most uncertain left
    image = requests.get(
        label_studio.url + tasks[0]["data"]["image"],
        headers={"Authorization": f"Token {label_studio.api_key}"},
        timeout=10,
    )
    rec = q.get_capture(store, tasks[0]["data"]["capture_id"])
    assert image.status_code == 200 and image.content == store.get_bytes(rec.image_key)

    truth = {cid: trimap_of(pets, name) for name, cid in ids.items()}
    annotate(ls, tasks[0]["id"], truth[tasks[0]["data"]["capture_id"]])
    pull_argv = ["--store", str(store.root), "pull", "pets", "--label-studio", label_studio.url, "--project", title]
    assert q.main(pull_argv) == 0
    out = capsys.readouterr().out
    assert "+1 sample(s) from Label Studio project" in out and "4 task(s) unfinished or skipped" in out
    assert q.main(pull_argv) == 0
    assert "nothing new to pull" in capsys.readouterr().out
    # A wrong API key is named as such (exit 2), and nothing is written.
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
    assert q.main(pull_argv) == 2
    assert "refused the API key" in capsys.readouterr().err


def test_instance_push_annotate_pull_is_exact(label_studio, tmp_path):
    """COCO categories as brush labels; the annotator's instance masks come back pixel for pixel."""
    from pycocotools import mask as mask_utils

    from dataplane.annotation.simulate import annotate_in_label_studio
    from tests.test_queue import capture_shapes
    from train.data.synth import generate_coco

    shapes = generate_coco(tmp_path / "shapes", n=6, seed=4, size=64)
    store = LocalStore(tmp_path / "store")
    create_version(store, "shapes", shapes, "instance")
    ann = capture_shapes(store, shapes, 3)
    target = target_for(label_studio)
    res = push(store, target, q.list_captures(store))
    assert len(res.added) == 3
    ls = target.client()
    config = ls.projects.get(id=res.project_id).label_config
    assert all(f'value="{c["name"]}"' in config for c in ann["categories"])
    assert annotate_in_label_studio(ls, res.project_id, store, q.truth_from_dataset(shapes)) == 3
    child, status = pull(store, target, "shapes")
    assert child is not None and status.finished == 3

    out = materialize(store, child, tmp_path / "child")
    merged = json.loads((out / "annotations" / "instances_train.json").read_text())
    cats = {c["id"]: c["name"] for c in merged["categories"]}
    truth = q.truth_from_dataset(shapes)
    pulled = [im for im in merged["images"] if "capture_id" in im]
    assert len(pulled) == 3
    for im in pulled:
        got = sorted(
            (cats[a["category_id"]], mask_utils.decode(a["segmentation"]).tobytes())
            for a in merged["annotations"]
            if a["image_id"] == im["id"]
        )
        want = sorted(
            (t["category"], coco_mask(t["segmentation"]).tobytes())
            for t in truth(q.get_capture(store, im["capture_id"]))
        )
        assert got and got == want, f"capture {im['capture_id']}: pulled instances differ from the ground truth"


def coco_mask(segmentation) -> np.ndarray:
    """A generated COCO segmentation (polygons or RLE) as a 64x64 mask, with pycocotools."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(segmentation, 64, 64)
    return mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle)


def test_monitor_pulls_when_enough_annotations_are_finished(label_studio, pets, tmp_path, monkeypatch):
    """The min_new_samples rule counts finished Label Studio annotations; a malformed one is reported once."""
    from monitoring.actor import Monitor

    store = LocalStore(tmp_path / "store")
    parent = create_version(store, "pets", pets, "semantic")
    ids = capture_pets(store, pets, {n: 0.1 * (i + 1) for i, n in enumerate(pet_names(pets)[:3])})
    truth = {cid: trimap_of(pets, name) for name, cid in ids.items()}
    target = target_for(label_studio)
    res = push(store, target, q.list_captures(store))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    m = Monitor(
        {
            "store": {"kind": "local", "root": str(store.root)},
            "data_dir": str(tmp_path),
            "dataset_name": "pets",
            "min_new_samples": 2,
            "label_studio": {"url": label_studio.url, "project": target.project, "interval_s": 1},
        }
    )
    ls = target.client()
    tasks = project_tasks(ls, res.project_id)
    annotate(ls, tasks[0]["id"], truth[tasks[0]["data"]["capture_id"]])
    assert m.maybe_pull(now=10.0) == {} and m.state["label_studio"]["finished"] == 1
    assert latest_version(store, "pets").version == parent.version
    annotate(ls, tasks[1]["id"], truth[tasks[1]["data"]["capture_id"]])
    assert m.maybe_pull(now=10.5) == {}  # read at most every interval_s
    act = m.maybe_pull(now=11.0)
    assert act["action"] == "pull" and act["samples"] == 2
    assert latest_version(store, "pets").version == act["version"] != parent.version
    # a malformed annotation: no version, the error kept in the state (and logged once), retried later
    ls.annotations.create(id=tasks[2]["id"], result=[{"type": "brushlabels", "value": {"brushlabels": ["pet"]}}])
    m.cfg.min_new_samples = 1
    assert m.maybe_pull(now=20.0) == {}
    assert f"task {tasks[2]['id']}" in m.state["label_studio"]["error"]
    assert "needs value.rle" in m.status()["label_studio"]["error"]
    assert latest_version(store, "pets").version == act["version"]
