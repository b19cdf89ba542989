"""Dataset versions on LocalStore and on a real S3 server (moto) through S3Store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from dataplane.store import LocalStore, ObjectStore, blob_key, head_key, lineage_key
from dataplane.versions import (
    MARKER,
    HeadMoved,
    Manifest,
    RebaseConflict,
    add_samples,
    create_version,
    diff_versions,
    get_version,
    latest_version,
    list_datasets,
    list_versions,
    materialize,
    mlflow_dataset_info,
    read_materialized,
    verify_version,
    write_manifest,
)
from segloop.errors import DatasetError, StoreError

try:
    from tests.s3server import ACCESS_KEY, SECRET_KEY, make_s3_store, start_s3_server
except ImportError:  # tests/ on sys.path instead of the repo root
    from s3server import ACCESS_KEY, SECRET_KEY, make_s3_store, start_s3_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_server():
    srv = start_s3_server()
    yield srv
    srv.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return make_s3_store(request.getfixturevalue("s3_server"))


# --------------------------------------------------------------------------- tiny datasets


def _jpg(seed: int, size: int = 16) -> bytes:
    img = Image.new("RGB", (size, size), ((seed * 40) % 256, (seed * 90) % 256, (seed * 10) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _trimap(seed: int, size: int = 16) -> bytes:
    img = Image.new("L", (size, size), 2)  # 2 = background
    img.paste(1, (4, 4, 12, 12))  # 1 = pet
    img.putpixel((seed % size, 0), 3)  # 3 = border
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_pets(root: Path, names=("cat_1", "cat_2", "dog_1"), test=("dog_2",)) -> Path:
    """Oxford-IIIT Pet layout: images/, annotations/trimaps/, annotations/{trainval,test}.txt."""
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    for i, n in enumerate([*names, *test]):
        (root / "images" / f"{n}.jpg").write_bytes(_jpg(i))
        (root / "annotations" / "trimaps" / f"{n}.png").write_bytes(_trimap(i))
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names))
    (root / "annotations" / "test.txt").write_text("".join(f"{n} 2 2 1\n" for n in test))
    return root


def make_coco(root: Path) -> Path:
    """COCO layout: annotations/instances_<split>.json + images/<split>/<file_name>."""
    cats = [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]
    for split, files in (("train", ["a.jpg", "b.jpg"]), ("val", ["c.jpg"])):
        (root / "images" / split).mkdir(parents=True)
        images, anns = [], []
        for i, fn in enumerate(files):
            (root / "images" / split / fn).write_bytes(_jpg(i + 7))
            images.append({"id": i + 1, "file_name": fn, "width": 16, "height": 16})
            anns.append(
                {
                    "id": i + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": 16.0,
                    "bbox": [2, 2, 4, 4],
                    "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]],
                }
            )
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


class RecordingStore(ObjectStore):
    """A real store plus a log of the keys written (and optional fault injection)."""

    def __init__(self, inner: ObjectStore, fail_on_put: int | None = None, on_first_put=None):
        self.inner, self.puts, self.fail_on_put, self.on_first_put = inner, [], fail_on_put, on_first_put
        self._lock = threading.Lock()

    def _record(self, key):
        with self._lock:
            self.puts.append(key)
            n = len(self.puts)
        if n == 1 and self.on_first_put:
            self.on_first_put()
        if self.fail_on_put is not None and n >= self.fail_on_put:
            raise StoreError(f"injected failure writing {key}")

    def put_bytes(self, key, data, content_type=None):
        self._record(key)
        self.inner.put_bytes(key, data, content_type)

    def put_if_absent(self, key, data, content_type=None):
        self._record(key)
        return self.inner.put_if_absent(key, data, content_type)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def exists(self, key):
        return self.inner.exists(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        self.inner.delete(key)

    def describe(self):
        return self.inner.describe()

    def ping(self, *, require_bucket=False):
        self.inner.ping(require_bucket=require_bucket)

    def url_for(self, key):
        return self.inner.url_for(key)


# --------------------------------------------------------------------------- create / get / materialise


def test_create_get_materialize(store, tmp_path):
    src = make_pets(tmp_path / "pets")
    m = create_version(store, "pets", src, "semantic", notes={"why": "first"})

    assert m.name == "pets" and m.parent is None and m.task == "semantic"
    assert m.classes == ["background", "pet", "border"]
    assert m.splits == {"test": ["dog_2"], "trainval": ["cat_1", "cat_2", "dog_1"]}
    assert (
        m.digest
        == hashlib.sha256(
            json.dumps(m.body(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
    )
    assert m.version == m.digest[:16]
    assert [f.path for f in m.files] == sorted(tree(src))
    assert all(f.sha256 == hashlib.sha256(tree(src)[f.path]).hexdigest() for f in m.files)
    assert store.exists(f"datasets/pets/{m.version}.json")

    for ref in (m.version, m.version[:6], m.digest, "latest"):
        assert get_version(store, "pets", ref) == m
    assert latest_version(store, "pets") == m
    assert list_versions(store, "pets") == [m]
    assert list_datasets(store) == ["pets"]

    out = materialize(store, m, tmp_path / "out" / "pets")
    assert tree(out) == tree(src)
    assert read_materialized(out) == m
    verify_version(store, m)

    # an identical materialisation is reused, not rewritten
    inode = (out / "images" / "cat_1.jpg").stat().st_ino
    assert materialize(store, m, out) == out
    assert (out / "images" / "cat_1.jpg").stat().st_ino == inode
    # ... but a locally edited one is rebuilt
    (out / "images" / "cat_1.jpg").write_bytes(b"edited")
    materialize(store, m, out)
    assert tree(out) == tree(src)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    # creating the very same snapshot again is a no-op returning the same version
    again = create_version(store, "pets", src, "semantic", notes={"why": "first"})
    assert again == m and len(list_versions(store, "pets")) == 1


def test_create_coco_derives_classes_and_splits(store, tmp_path):
    src = make_coco(tmp_path / "coco")
    m = create_version(store, "coco-mini", src, "instance")
    assert m.classes == ["background", "cat", "dog"]  # sorted by category id
    assert m.splits == {"train": ["a.jpg", "b.jpg"], "val": ["c.jpg"]}
    out = materialize(store, m, tmp_path / "out")
    assert tree(out) == tree(src)


def test_child_version_adds_samples(store, tmp_path):
    src = make_pets(tmp_path / "pets")
    parent = create_version(store, "pets", src, "semantic")
    parent_raw = store.get_bytes(parent.key)

    new_img = tmp_path / "new.jpg"
    new_img.write_bytes(_jpg(99))
    child = add_samples(
        store,
        "pets",
        parent.version[:8],
        {"images/cap_1.jpg": new_img, "annotations/trimaps/cap_1.png": _trimap(99)},
        split_updates={"trainval": ["cap_1"]},
        notes={"from": "captures/2024-01-01"},
    )
    assert child.parent == parent.version and child.version != parent.version
    assert child.splits["trainval"] == ["cat_1", "cat_2", "dog_1", "cap_1"]
    assert child.notes == {"from": "captures/2024-01-01"}
    assert child.source == {"kind": "add_samples", "parent": parent.version, "added": 2, "replaced": 1}
    # the parent manifest is untouched
    assert store.get_bytes(parent.key) == parent_raw
    assert get_version(store, "pets", parent.version) == parent

    assert diff_versions(parent, child) == {
        "added": ["annotations/trimaps/cap_1.png", "images/cap_1.jpg"],
        "removed": [],
        "changed": ["annotations/trainval.txt"],  # the split list was extended too
    }
    assert [m.version for m in list_versions(store, "pets")] == [parent.version, child.version]
    assert latest_version(store, "pets") == child

    out = materialize(store, child, tmp_path / "child")
    assert (out / "images" / "cap_1.jpg").read_bytes() == new_img.read_bytes()
    lines = (out / "annotations" / "trainval.txt").read_text().splitlines()
    assert lines == ["cat_1 1 1 1", "cat_2 1 1 1", "dog_1 1 1 1", "cap_1"]
    # materialising the parent into the same dir swaps the contents back
    materialize(store, parent, out)
    assert tree(out) == tree(src) and read_materialized(out) == parent

    # a replaced file (e.g. a fixed annotation) shows up as changed; a grandchild chains
    grand = add_samples(store, "pets", child, {"annotations/test.txt": b"dog_2\ncat_1\n"})
    assert diff_versions(child, grand) == {"added": [], "removed": [], "changed": ["annotations/test.txt"]}
    assert grand.parent == child.version and grand.splits == child.splits


def test_add_samples_bad_input(tmp_path):
    store = LocalStore(tmp_path / "store")
    parent = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    with pytest.raises(DatasetError, match="needs new_files or split_updates"):
        add_samples(store, "pets", parent.version, {})
    with pytest.raises(DatasetError, match=r"invalid dataset path '\.\./x'"):
        add_samples(store, "pets", parent.version, {"../x": b"1"})
    with pytest.raises(DatasetError, match="bytes or a pathlib.Path"):
        add_samples(store, "pets", parent.version, {"a.txt": "text"})
    with pytest.raises(DatasetError, match="cannot read dataset file images/x.jpg"):
        add_samples(store, "pets", parent.version, {"images/x.jpg": tmp_path / "missing.jpg"})
    with pytest.raises(DatasetError, match="invalid sample name"):
        add_samples(store, "pets", parent.version, {}, split_updates={"trainval": ["a b"]})
    with pytest.raises(DatasetError, match="has no version"):
        add_samples(store, "pets", "ffffffff", {"a": b"1"})
    assert len(list_versions(store, "pets")) == 1


def test_blob_dedup(store, tmp_path):
    src = make_pets(tmp_path / "pets")
    (src / "images" / "copy_of_cat_1.jpg").write_bytes((src / "images" / "cat_1.jpg").read_bytes())
    rec = RecordingStore(store)
    m = create_version(rec, "pets", src, "semantic")
    blob_puts = [k for k in rec.puts if k.startswith("blobs/")]
    assert len(blob_puts) == len(set(blob_puts)) == len({f.sha256 for f in m.files}) == len(m.files) - 1
    # the manifest after every blob, then the lineage record and the head hint
    assert rec.puts[-3:] == [m.key, "datasets/pets/lineage/root.json", "datasets/pets/lineage/HEAD.json"]

    rec.puts.clear()
    side = create_version(rec, "pets", src, "semantic", notes={"run": 2}, branch=True)  # same contents
    assert [k for k in rec.puts if k.startswith("blobs/")] == []
    assert side.version != m.version and latest_version(store, "pets") == m  # a side branch

    rec.puts.clear()
    child = add_samples(rec, "pets", m.version, {"images/cat_1.jpg": (src / "images" / "dog_1.jpg"), "new.txt": b"n"})
    assert [k for k in rec.puts if k.startswith("blobs/")] == [blob_key(hashlib.sha256(b"n").hexdigest())]
    assert diff_versions(m, child)["changed"] == ["images/cat_1.jpg"]


# --------------------------------------------------------------------------- integrity


def test_tampered_blob_detected(store, tmp_path):
    src = make_pets(tmp_path / "pets")
    m = create_version(store, "pets", src, "semantic")
    victim = m.file_map["images/dog_1.jpg"]
    store.put_bytes(blob_key(victim.sha256), b"tampered bytes")  # overwrite the object in place
    bad_sha = hashlib.sha256(b"tampered bytes").hexdigest()

    with pytest.raises(StoreError) as info:
        verify_version(store, m)
    msg = str(info.value)
    assert "images/dog_1.jpg" in msg and victim.sha256 in msg and bad_sha in msg and "1 of" in msg
    problems = verify_version(store, m, raise_errors=False)
    assert len(problems) == 1 and "images/dog_1.jpg" in problems[0]

    out = tmp_path / "out"
    with pytest.raises(StoreError) as info:
        materialize(store, m, out)
    msg = str(info.value)
    assert "images/dog_1.jpg" in msg and victim.sha256 in msg and bad_sha in msg
    assert not out.exists()  # nothing half-materialised
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # a deleted blob is named too
    store.delete(blob_key(m.file_map["images/cat_1.jpg"].sha256))
    problems = verify_version(store, m, raise_errors=False)
    assert sorted(p.split(" ")[1] for p in problems) == ["images/cat_1.jpg", "images/dog_1.jpg"]
    assert any("missing" in p for p in problems)


def test_tampered_manifest_detected(store, tmp_path):
    m = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    raw = store.get_json(m.key)
    raw["splits"]["trainval"].append("sneaky")
    store.put_json(m.key, raw)
    with pytest.raises(StoreError, match="has been modified"):
        get_version(store, "pets", m.version)
    with pytest.raises(StoreError, match="has been modified"):
        list_versions(store, "pets")


def test_manifest_paths_cannot_escape(store, tmp_path):
    """A stored manifest naming '../x' is refused before materialize could write outside out_dir."""
    from dataplane.versions import compute_digest

    sha = hashlib.sha256(b"x").hexdigest()
    store.put_bytes(blob_key(sha), b"x")
    with pytest.raises(DatasetError, match="files"):
        Manifest.build(
            name="evil",
            task="semantic",
            classes=["a"],
            splits={},
            files=[{"path": "../escape.txt", "size": 1, "sha256": sha}],
        )
    with pytest.raises(DatasetError, match="duplicate file paths: a.txt"):
        Manifest.build(
            name="evil",
            task="semantic",
            classes=["a"],
            splits={},
            files=[{"path": "a.txt", "size": 1, "sha256": sha}] * 2,
        )
    raw = {
        "format": 1,
        "name": "evil",
        "parent": None,
        "created": "2024-01-01T00:00:00Z",
        "task": "semantic",
        "classes": ["a"],
        "splits": {},
        "files": [{"path": "../escape.txt", "size": 1, "sha256": sha}],
        "source": {},
        "notes": {},
    }
    digest = compute_digest(raw)
    raw.update(version=digest[:16], digest=digest)
    store.put_json(f"datasets/evil/{digest[:16]}.json", raw)
    with pytest.raises(StoreError, match="malformed.*files"):
        get_version(store, "evil", digest[:16])
    assert not (tmp_path / "escape.txt").exists()


def test_manifests_are_immutable(store, tmp_path):
    m = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    raw = store.get_bytes(m.key)
    # the same content again: no-op (the original bytes, created time included, stay)
    again = Manifest.build(**{k: v for k, v in m.to_dict().items() if k != "created"})
    assert again.version == m.version and again.created != m.created
    assert write_manifest(store, again) == m
    assert store.get_bytes(m.key) == raw
    # a hand-edited manifest (its digest no longer matches) is refused
    forged = Manifest.model_validate({**m.to_dict(), "notes": {"forged": True}})
    with pytest.raises(StoreError, match="has been modified"):
        write_manifest(store, forged)
    # different content already under the key: refused, the stored object untouched
    other = {**m.to_dict(), "notes": {"other": 1}}
    store.put_json(m.key, other)
    with pytest.raises(StoreError, match="refusing to overwrite"):
        write_manifest(store, m)
    assert store.get_json(m.key) == other


def test_failed_create_leaves_no_manifest(store, tmp_path):
    src = make_pets(tmp_path / "pets")
    with pytest.raises(StoreError, match="injected failure"):
        create_version(RecordingStore(store, fail_on_put=3), "pets", src, "semantic")
    assert list(store.list("datasets/")) == [] and list_versions(store, "pets") == []

    # a file that disappears while the snapshot is being taken
    doomed = src / "images" / "dog_2.jpg"  # last image in path order
    rec = RecordingStore(store, on_first_put=doomed.unlink)
    with pytest.raises(DatasetError, match="images/dog_2.jpg"):
        create_version(rec, "pets", src, "semantic", workers=1)
    assert list(store.list("datasets/")) == []
    with pytest.raises(DatasetError, match="no versions"):
        latest_version(store, "pets")

    # a failing child leaves the parent as the latest version
    doomed.write_bytes(_jpg(3))
    parent = create_version(store, "pets", src, "semantic")
    with pytest.raises(StoreError, match="injected failure"):
        add_samples(RecordingStore(store, fail_on_put=1), "pets", parent.version, {"x.txt": b"x"})
    assert list_versions(store, "pets") == [parent]


# --------------------------------------------------------------------------- lookups & errors


def test_get_version_prefixes_and_errors(tmp_path):
    store = LocalStore(tmp_path / "store")
    fake = [{"path": "a.txt", "size": 1, "sha256": "0" * 64}]
    ms = [
        write_manifest(
            store, Manifest.build(name="syn", task="semantic", classes=["x"], splits={}, files=fake, notes={"i": i})
        )
        for i in range(17)  # 17 ids over 16 hex digits: at least two share their first character
    ]
    first = {}
    for m in ms:
        first.setdefault(m.version[0], []).append(m)
    shared = next(v for v in first.values() if len(v) > 1)
    with pytest.raises(DatasetError, match="ambiguous"):
        get_version(store, "syn", shared[0].version[0])
    for m in ms:
        assert get_version(store, "syn", m.version.upper()[:12]) == m
    with pytest.raises(DatasetError, match="has no version"):
        get_version(store, "syn", "f" * 16 if not store.exists("datasets/syn/" + "f" * 16 + ".json") else "e" * 16)
    with pytest.raises(DatasetError, match="invalid version"):
        get_version(store, "syn", "not-hex")
    with pytest.raises(DatasetError, match="invalid dataset name"):
        get_version(store, "../etc", "abc")
    with pytest.raises(DatasetError, match="no versions"):
        latest_version(store, "nothing")
    with pytest.raises(DatasetError, match="invalid task"):
        create_version(store, "syn", tmp_path, "panoptic")
    with pytest.raises(DatasetError, match="does not exist"):
        create_version(store, "syn", tmp_path / "missing", "semantic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no files"):
        create_version(store, "syn", tmp_path / "empty", "semantic")
    with pytest.raises(DatasetError, match="classes"):
        create_version(store, "syn2", make_pets(tmp_path / "p"), "semantic", classes="abc")


def test_materialize_refuses_foreign_dir_and_is_concurrency_safe(tmp_path):
    store = LocalStore(tmp_path / "store")
    m = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        materialize(store, m, foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert tree(materialize(store, m, empty)) == tree(tmp_path / "pets")

    out, errors = tmp_path / "shared", []

    def worker():
        try:
            materialize(store, m, out)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and tree(out) == tree(tmp_path / "pets")


def test_mlflow_dataset_info(tmp_path):
    store = LocalStore(tmp_path / "store")
    m = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    info = mlflow_dataset_info(m, store)
    assert info == {"name": "pets", "version": m.version, "digest": m.version, "source": (store.root / m.key).as_uri()}
    assert len(info["digest"]) <= 36  # MLflow's dataset digest column
    assert mlflow_dataset_info(m)["source"] == f"segloop:{m.key}"


# --------------------------------------------------------------------------- CLI


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dataplane.versions", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli(tmp_path):
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    src = make_pets(tmp_path / "pets")
    m = create_version(store, "pets", src, "semantic")
    child = add_samples(store, "pets", m.version, {"images/new.jpg": _jpg(5)})
    env = {"SEGLOOP_STORE": str(store_dir)}

    r = _cli("list", env=env)
    assert r.returncode == 0 and r.stdout.split() == ["pets"], r
    r = _cli("list", "pets", env=env)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(m.version) and lines[1].startswith(child.version)
    assert f"parent={m.version}" in lines[1] and "trainval=3" in lines[0]

    r = _cli("--store", str(store_dir), "show", "pets", m.version[:8], "--json")
    assert r.returncode == 0, r
    assert Manifest.model_validate(json.loads(r.stdout)) == m
    r = _cli("show", "pets", "--store", str(store_dir))  # --store after the command works too
    assert r.returncode == 0 and f"pets@{child.version}" in r.stdout, r

    r = _cli("diff", "pets", m.version, child.version, env=env)
    assert r.returncode == 0 and "+ images/new.jpg" in r.stdout, r
    out = tmp_path / "out"
    r = _cli("materialize", "pets", child.version, str(out), env=env)
    assert r.returncode == 0 and tree(out) == {**tree(src), "images/new.jpg": _jpg(5)}, r
    r = _cli("verify", "pets", env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r

    r = _cli(
        "create", "coco", str(make_coco(tmp_path / "coco")), "--task", "instance", "--note", "origin=test", env=env
    )
    assert r.returncode == 0 and r.stdout.startswith("coco@"), r
    assert latest_version(store, "coco").notes == {"origin": "test"}

    # bad input: exit code 2 and a one-line error, no traceback
    r = _cli("show", "pets", "deadbeef", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "deadbeef" in r.stderr, r
    assert "Traceback" not in r.stderr


def test_cli_bad_input_in_process(tmp_path, monkeypatch, capsys):
    from dataplane.versions import main

    store = LocalStore(tmp_path / "store")
    src = make_pets(tmp_path / "pets")
    create_version(store, "pets", src, "semantic")
    monkeypatch.setenv("SEGLOOP_STORE", str(store.root))
    for args in (
        ["show", "../x"],
        ["create", "x", str(tmp_path / "nope"), "--task", "semantic"],
        ["create", "x", str(src), "--task", "semantic", "--note", "novalue"],
        ["materialize", "pets", "latest", str(src)],  # not empty and not ours
        ["--store", "s3://bucket", "list"],
    ):  # no SEGLOOP_S3_ENDPOINT
        monkeypatch.delenv("SEGLOOP_S3_ENDPOINT", raising=False)
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (args, err)
    for args in (["frobnicate"], ["create", "x", str(src), "--task", "panoptic"], []):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
    capsys.readouterr()


def test_cli_integrity_failure_exit_code(tmp_path):
    store = LocalStore(tmp_path / "store")
    child = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    env = {"SEGLOOP_STORE": str(tmp_path / "store")}
    # integrity failures: exit code 1
    store.put_bytes(blob_key(child.file_map["images/cat_1.jpg"].sha256), b"x")
    r = _cli("verify", "pets", child.version, env=env)
    assert r.returncode == 1 and "images/cat_1.jpg" in r.stderr, r


# --------------------------------------------------------------------------- lineage: the head moves by compare-and-set


class RacingStore(RecordingStore):
    """Holds each writer at the lineage record of ``parent`` until ``n`` writers got there, so
    they all built on the same head before any of them can advance it: a race, every time."""

    def __init__(self, inner: ObjectStore, name: str, parent: str | None, n: int = 2):
        super().__init__(inner)
        self.race_key = lineage_key(name, parent)
        self.barrier = threading.Barrier(n, timeout=10)

    def put_if_absent(self, key, data, content_type=None):
        if key == self.race_key:
            self.barrier.wait()
        return super().put_if_absent(key, data, content_type)


def run_together(*calls):
    """Run the calls in threads at once; -> each one's result or raised exception, in order."""
    out: list = [None] * len(calls)

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as err:  # noqa: BLE001 - the test looks at it
            out[i] = err

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def chain(store: ObjectStore, name: str) -> list[Manifest]:
    """The lineage, first version to head; each step checked against its lineage record."""
    out = [latest_version(store, name)]
    while out[-1].parent:
        parent = get_version(store, name, out[-1].parent)
        assert store.get_json(lineage_key(name, parent.version))["child"] == out[-1].version
        out.append(parent)
    assert store.get_json(lineage_key(name, None))["child"] == out[-1].version
    return out[::-1]


def batch(tag: str, n: int = 2, seed: int = 0) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """An annotation batch as add_samples takes it: images + trimaps, and their trainval names."""
    names = [f"{tag}_{i}" for i in range(n)]
    files = {}
    for i, name in enumerate(names):
        files[f"images/{name}.jpg"] = _jpg(seed + i)
        files[f"annotations/trimaps/{name}.png"] = _trimap(seed + i)
    return files, {"trainval": names}


@pytest.mark.faults
def test_concurrent_add_samples_both_reach_the_lineage(store, tmp_path):
    base = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    racing = RacingStore(store, "pets", base.version)
    (fa, sa), (fb, sb) = batch("a"), batch("b", seed=10)
    results = run_together(
        lambda: add_samples(racing, "pets", "latest", fa, sa),
        lambda: add_samples(racing, "pets", "latest", fb, sb),
    )
    assert all(isinstance(r, Manifest) for r in results), results
    first, second = sorted(results, key=lambda m: m.parent != base.version)
    # one won the race; the other rebased onto it: a chain, each parent the previous head
    assert [m.version for m in chain(store, "pets")] == [base.version, first.version, second.version]
    head = latest_version(store, "pets")
    assert head == second and second.parent == first.version
    names = head.splits["trainval"]
    assert sorted(names) == sorted(base.splits["trainval"] + sa["trainval"] + sb["trainval"])
    assert len(names) == len(set(names))
    assert set(fa) | set(fb) <= set(head.file_map)
    out = materialize(store, head, tmp_path / "head")
    assert [ln.split()[0] for ln in (out / "annotations" / "trainval.txt").read_text().splitlines()] == names
    # the version that lost stays behind as an unreferenced manifest; 'latest' never returns it
    lost = [m for m in list_versions(store, "pets") if m.version not in {base.version, first.version, second.version}]
    assert len(lost) == 1 and lost[0].parent == base.version


_IMPORT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from dataplane.store import LocalStore, S3Store
    from dataplane.versions import add_samples

    spec, tag, go = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    if spec["kind"] == "local":
        store = LocalStore(spec["root"])
    else:
        store = S3Store(spec["endpoint"], spec["bucket"], spec["access"], spec["secret"])
    Path(f"{go}.{tag}").touch()  # ready
    while not go.exists():
        time.sleep(0.002)
    for i in range(3):
        name = f"{tag}_{i}".encode()
        files = {f"images/{tag}_{i}.jpg": name, f"annotations/trimaps/{tag}_{i}.png": name}
        add_samples(store, "pets", "latest", files, {"trainval": [f"{tag}_{i}"]}, workers=1)
    """
)


@pytest.mark.faults
def test_concurrent_add_samples_from_two_processes(store, tmp_path):
    base = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    if isinstance(store, LocalStore):
        spec = {"kind": "local", "root": str(store.root)}
    else:
        spec = {"kind": "s3", "endpoint": store.endpoint, "bucket": store.bucket, "access": ACCESS_KEY}
        spec["secret"] = SECRET_KEY
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _IMPORT_SCRIPT, json.dumps(spec), tag, str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tag in ("p", "q")
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.{t}").exists() for t in "pq") and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    lineage = chain(store, "pets")
    assert len(lineage) == 7 and lineage[0] == base  # 6 imports, each one step of the chain
    names = lineage[-1].splits["trainval"]
    assert sorted(names) == sorted(base.splits["trainval"] + [f"{t}_{i}" for t in "pq" for i in range(3)])
    assert len(names) == len(set(names))


def test_explicit_stale_parent_is_refused(store, tmp_path):
    base = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    child = add_samples(store, "pets", base.version, *batch("a"))
    with pytest.raises(
        HeadMoved, match=f"pets@{base.version} is not the head of dataset 'pets': the head is pets@{child.version}"
    ) as info:
        add_samples(store, "pets", base.version, *batch("b", seed=10))
    assert info.value.head == child
    assert latest_version(store, "pets") == child and len(list_versions(store, "pets")) == 2  # nothing written

    side = add_samples(store, "pets", base.version, *batch("b", seed=10), branch=True)  # asked for: a side branch
    assert side.parent == base.version and latest_version(store, "pets") == child
    top = add_samples(store, "pets", "latest", *batch("b", seed=10))  # 'latest' builds on the head
    assert top.parent == child.version and latest_version(store, "pets") == top

    # a snapshot without a parent would start a second lineage and hide the imports from 'latest'
    other = make_pets(tmp_path / "other", names=("x_1",), test=())
    with pytest.raises(HeadMoved, match=f"a version without a parent is not the head.*pets@{top.version}"):
        create_version(store, "pets", other, "semantic")
    snap = create_version(store, "pets", other, "semantic", parent="latest")
    assert snap.parent == top.version and latest_version(store, "pets") == snap
    assert [m.version for m in chain(store, "pets")] == [base.version, child.version, top.version, snap.version]


@pytest.mark.faults
def test_explicit_parent_losing_the_race_fails_loudly(store, tmp_path):
    base = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    racing = RacingStore(store, "pets", base.version)
    results = run_together(
        lambda: add_samples(racing, "pets", base.version, *batch("a")),
        lambda: add_samples(racing, "pets", base.version, *batch("b", seed=10)),
    )
    won = [r for r in results if isinstance(r, Manifest)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], HeadMoved), results
    msg = str(lost[0])
    assert f"lost the race to extend dataset 'pets' from pets@{base.version}" in msg, msg
    assert f"pets@{won[0].version} was added first and the head is now pets@{won[0].version}" in msg, msg
    assert lost[0].head == won[0]
    assert [m.version for m in chain(store, "pets")] == [base.version, won[0].version]


def test_same_change_twice_is_one_version_and_clashes_are_refused(store, tmp_path):
    base = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    files, splits = batch("a")
    racing = RacingStore(store, "pets", base.version)
    ra, rb = run_together(*[lambda: add_samples(racing, "pets", "latest", files, splits)] * 2)
    assert isinstance(ra, Manifest) and ra == rb  # same content, same id: both callers get it
    again = add_samples(store, "pets", "latest", files, splits)  # a re-run adds nothing
    assert again == ra and len(list_versions(store, "pets")) == 2
    assert again.splits["trainval"] == base.splits["trainval"] + splits["trainval"]

    # two changes of the same file at once: rebasing one onto the other would drop it, so it fails
    racing = RacingStore(store, "pets", ra.version)
    results = run_together(
        lambda: add_samples(racing, "pets", "latest", {"annotations/test.txt": b"dog_2\nfixed_by_x\n"}),
        lambda: add_samples(racing, "pets", "latest", {"annotations/test.txt": b"dog_2\nfixed_by_y\n"}),
    )
    won = [r for r in results if isinstance(r, Manifest)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], RebaseConflict), results
    assert "annotations/test.txt" in str(lost[0]) and lost[0].head == won[0]
    assert latest_version(store, "pets") == won[0]


def test_latest_falls_back_to_created_time_without_lineage(store):
    """A store written before lineage records existed: the newest manifest is the head, and
    the first new version continues it."""
    sha = hashlib.sha256(b"x").hexdigest()
    store.put_bytes(blob_key(sha), b"x")
    fake = {"task": "semantic", "classes": ["x"], "splits": {}, "files": [{"path": "a.txt", "size": 1, "sha256": sha}]}
    new = write_manifest(
        store, Manifest.build(name="old", created="2024-02-01T00:00:00.000000Z", notes={"i": 2}, **fake)
    )
    write_manifest(store, Manifest.build(name="old", created="2024-01-01T00:00:00.000000Z", notes={"i": 1}, **fake))
    assert not list(store.list("datasets/old/lineage/"))
    assert latest_version(store, "old") == new

    child = add_samples(store, "old", "latest", {"b.txt": b"b"})
    assert child.parent == new.version and latest_version(store, "old") == child
    assert store.get_json(lineage_key("old", new.version))["child"] == child.version
    # the head hint is only a shortcut: gone or behind, readers follow the lineage records
    store.delete(head_key("old"))
    assert latest_version(store, "old") == child
    store.put_json(head_key("old"), {"version": new.version})
    assert latest_version(store, "old") == child
    grand = add_samples(store, "old", "latest", {"c.txt": b"c"})
    assert grand.parent == child.version and latest_version(store, "old") == grand


# --------------------------------------------------------------------------- lineage: concurrent annotation imports


def _capture(store: ObjectStore, image: bytes) -> str:
    """A captured sample as the importer reads it (image + metadata JSON); -> its id."""
    import datetime as dt

    from dataplane.capture import new_capture_id
    from dataplane.store import capture_keys

    cid = new_capture_id()
    image_key, json_key = capture_keys(cid, "jpg")
    store.put_bytes(image_key, image)
    meta = {"id": cid, "time": dt.datetime.now(dt.UTC).isoformat(), "image_key": image_key, "width": 16, "height": 16}
    store.put_json(json_key, {**meta, "image_sha256": hashlib.sha256(image).hexdigest()})
    return cid


def _trimap_dir(root: Path, cids: list[str], seed: int) -> Path:
    root.mkdir(parents=True)
    for i, cid in enumerate(cids):
        (root / f"{cid}.png").write_bytes(_trimap(seed + i))
    return root


@pytest.mark.faults
def test_concurrent_trimap_imports_both_reach_latest(store, tmp_path):
    from dataplane.annotation.importer import import_annotations

    base = create_version(store, "pets", make_pets(tmp_path / "pets"), "semantic")
    a, b = [_capture(store, _jpg(20 + i)) for i in range(2)], [_capture(store, _jpg(30 + i)) for i in range(2)]
    dir_a, dir_b = _trimap_dir(tmp_path / "a", a, 0), _trimap_dir(tmp_path / "b", b, 5)
    racing = RacingStore(store, "pets", base.version)
    results = run_together(
        lambda: import_annotations(racing, "pets", "latest", dir_a, fmt="trimaps"),
        lambda: import_annotations(racing, "pets", "latest", dir_b, fmt="trimaps"),
    )
    assert all(isinstance(r, Manifest) for r in results), results
    head = latest_version(store, "pets")
    assert len(chain(store, "pets")) == 3 and head in results
    assert sorted(head.splits["trainval"]) == sorted(base.splits["trainval"] + a + b)
    assert all(f"annotations/trimaps/{cid}.png" in head.file_map for cid in a + b)

    # the same capture annotated in two imports at once: the second is re-validated on the new
    # head and refused by name, not silently replaced
    c = _capture(store, _jpg(40))
    dir_c1, dir_c2 = _trimap_dir(tmp_path / "c1", [c], 0), _trimap_dir(tmp_path / "c2", [c], 7)
    racing = RacingStore(store, "pets", head.version)
    results = run_together(
        lambda: import_annotations(racing, "pets", "latest", dir_c1, fmt="trimaps"),
        lambda: import_annotations(racing, "pets", "latest", dir_c2, fmt="trimaps"),
    )
    won = [r for r in results if isinstance(r, Manifest)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], DatasetError), results
    assert c in str(lost[0]) and "already in" in str(lost[0]) and latest_version(store, "pets") == won[0]


@pytest.mark.faults
def test_concurrent_coco_imports_merge_both(store, tmp_path):
    """Both imports rewrite annotations/instances_train.json: the loser is merged again onto the new head."""
    from dataplane.annotation.importer import import_annotations

    base = create_version(store, "coco", make_coco(tmp_path / "coco"), "instance")
    cids = [_capture(store, _jpg(50 + i)) for i in range(2)]
    paths = []
    for cid in cids:
        coco = {
            "images": [{"id": 1, "file_name": f"{cid}.jpg", "capture_id": cid, "width": 16, "height": 16}],
            "annotations": [
                {
                    "id": 1,
                    "image_id": 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": 64.0,
                    "bbox": [2, 2, 8, 8],
                    "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]],
                }
            ],  # fmt: skip
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        }
        paths.append(tmp_path / f"{cid}.json")
        paths[-1].write_text(json.dumps(coco))
    racing = RacingStore(store, "coco", base.version)
    results = run_together(*[lambda p=p: import_annotations(racing, "coco", "latest", p, fmt="coco") for p in paths])
    assert all(isinstance(r, Manifest) for r in results), results
    head = latest_version(store, "coco")
    assert len(chain(store, "coco")) == 3 and head in results
    assert sorted(head.splits["train"]) == sorted(["a.jpg", "b.jpg"] + [f"{cid}.jpg" for cid in cids])
    out = materialize(store, head, tmp_path / "out")
    merged = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert {im.get("capture_id") for im in merged["images"]} >= set(cids)
    assert len(merged["images"]) == 4 and len(merged["annotations"]) >= 4
