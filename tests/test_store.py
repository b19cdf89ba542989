"""ObjectStore: the same behaviour from LocalStore and S3Store (minio SDK against a real moto S3 server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dataplane.store import (
    ConditionalWritesUnsupported,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StoreConfig,
    blob_key,
    capture_keys,
    check_key,
    head_key,
    lineage_key,
    manifest_key,
    open_store,
    s3_credentials,
    store_config_from_url,
    store_from_env,
)
from segloop.config import load_config
from segloop.errors import ConfigError, StoreError

try:
    from tests.s3server import S3Server, make_s3_store, start_s3_server, unique_bucket
except ImportError:  # tests/ on sys.path instead of the repo root
    from s3server import S3Server, make_s3_store, start_s3_server, unique_bucket

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


# --------------------------------------------------------------------------- both stores


def test_round_trip(store):
    store.put_bytes("a/b/one.bin", b"\x00\x01payload")
    store.put_bytes("a/two.txt", b"two", content_type="text/plain")
    store.put_bytes("ab.txt", b"ab")
    store.put_json("c/meta.json", {"x": 1, "y": [1, 2], "z": "é"})

    assert store.get_bytes("a/b/one.bin") == b"\x00\x01payload"
    assert store.get_json("c/meta.json") == {"x": 1, "y": [1, 2], "z": "é"}
    assert store.exists("a/two.txt") and not store.exists("a/nope") and not store.exists("a")
    assert list(store.list()) == ["a/b/one.bin", "a/two.txt", "ab.txt", "c/meta.json"]
    assert list(store.list("a/")) == ["a/b/one.bin", "a/two.txt"]
    assert list(store.list("a")) == ["a/b/one.bin", "a/two.txt", "ab.txt"]  # plain string prefix, like S3
    assert list(store.list("a/b/o")) == ["a/b/one.bin"]
    assert list(store.list("zzz/")) == []

    store.put_bytes("a/two.txt", b"TWO")  # overwrite
    assert store.get_bytes("a/two.txt") == b"TWO"

    store.delete("a/two.txt")
    store.delete("a/two.txt")  # deleting a missing key is fine
    assert not store.exists("a/two.txt")
    assert list(store.list("a/")) == ["a/b/one.bin"]

    with pytest.raises(ObjectNotFound, match="a/two.txt"):
        store.get_bytes("a/two.txt")
    assert issubclass(ObjectNotFound, StoreError)
    store.ping()


def test_json_errors(store):
    store.put_bytes("bad.json", b"{not json")
    with pytest.raises(StoreError, match="bad.json.*not valid JSON"):
        store.get_json("bad.json")
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        store.put_json("x.json", {"a": object()})
    with pytest.raises(StoreError, match="must be bytes"):
        store.put_bytes("x.bin", "a str")  # type: ignore[arg-type]


def test_put_if_absent(store):
    """Create-only writes: the first create wins, later ones change nothing and say so."""
    assert store.put_if_absent("c/once.bin", b"first") is True
    assert store.put_if_absent("c/once.bin", b"second") is False
    assert store.get_bytes("c/once.bin") == b"first"
    store.put_bytes("c/once.bin", b"replaced")  # plain writes still replace
    assert store.put_if_absent("c/once.bin", b"third") is False and store.get_bytes("c/once.bin") == b"replaced"
    store.delete("c/once.bin")
    assert store.put_if_absent("c/once.bin", b"again") is True and store.get_bytes("c/once.bin") == b"again"
    assert store.put_json_if_absent("c/r.json", {"a": 1}) and not store.put_json_if_absent("c/r.json", {"a": 2})
    assert store.get_json("c/r.json") == {"a": 1}
    assert list(store.list()) == ["c/once.bin", "c/r.json"]  # no temp files or probe keys left over
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_if_absent("../x", b"x")
    with pytest.raises(StoreError, match="must be bytes"):
        store.put_if_absent("x.bin", "a str")  # type: ignore[arg-type]


def test_put_if_absent_one_winner_under_contention(store):
    """8 threads create the same keys at once: exactly one create per key succeeds, and the
    stored bytes are the winner's (moto 5.2 checks If-None-Match in Python without a lock; it
    held up here, and real S3/MinIO/link(2) are atomic)."""
    keys, wins = [f"race/{i}" for i in range(10)], {}
    barrier, lock = threading.Barrier(8, timeout=10), threading.Lock()

    def writer(n: int) -> None:
        barrier.wait()
        for key in keys:
            if store.put_if_absent(key, f"writer-{n}".encode()):
                with lock:
                    wins.setdefault(key, []).append(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(wins) == keys and all(len(w) == 1 for w in wins.values()), wins
    assert all(store.get_bytes(k) == f"writer-{w[0]}".encode() for k, w in wins.items())


def test_local_put_if_absent_leaves_no_temp_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    assert store.put_if_absent("a/b", b"1") and not store.put_if_absent("a/b", b"2")
    assert os.listdir(tmp_path / "s" / "a") == ["b"]
    store.put_bytes("d/e", b"1")
    with pytest.raises(StoreError, match="cannot write 'd/e/f'"):
        store.put_if_absent("d/e/f", b"2")  # a key under an object is an error, not 'exists'


def test_s3_server_ignoring_if_none_match_is_detected(s3_server):
    """A server that ignores If-None-Match would let conditional writes overwrite: refused, loudly."""
    store = make_s3_store(s3_server)
    real = store._client._put_object

    def ignoring(bucket, key, data, headers=None, query_params=None):
        headers = {k: v for k, v in (headers or {}).items() if k.lower() != "if-none-match"}
        return real(bucket, key, data, headers=headers, query_params=query_params)

    store._client._put_object = ignoring
    with pytest.raises(ConditionalWritesUnsupported, match="ignores If-None-Match"):
        store.put_if_absent("k", b"1")
    assert not store.exists("k") and list(store.list()) == []  # the probe cleaned up after itself
    store.put_bytes("k", b"plain writes still work")


BAD_KEYS = ["../x", "a/../../x", "/abs", "a//b", "a\\b", "a/./b", ".", "", "a/", "x\x00y", ".segloop-tmp-x"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_key_escapes_refused(store, key, tmp_path):
    for op in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_if_absent(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(StoreError, match="invalid store key"):
            op()
    # nothing was written anywhere around the store
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["store"])


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//", "a\\", "a/../b", ".."])
def test_bad_prefix_refused(store, prefix):
    with pytest.raises(StoreError, match="invalid store prefix"):
        list(store.list(prefix))


def test_check_key_accepts_normal_keys():
    for key in ["a", "a/b.c", "captures/2024-01-02/x.jpg", "..hidden/x", "a/.b", "a/b c"]:
        assert check_key(key) == key
    with pytest.raises(StoreError):
        check_key(None)


# --------------------------------------------------------------------------- LocalStore


def test_local_store_stays_under_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("x/y.txt", b"1")
    assert (tmp_path / "root" / "x" / "y.txt").read_bytes() == b"1"
    assert store.url_for("x/y.txt") == (tmp_path / "root" / "x" / "y.txt").as_uri()
    assert store.describe() == f"file://{tmp_path / 'root'}"
    # delete prunes empty directories but never the root
    store.delete("x/y.txt")
    assert not (tmp_path / "root" / "x").exists() and (tmp_path / "root").is_dir()
    # a key that collides with a directory is an error, not a crash
    store.put_bytes("d/e", b"1")
    with pytest.raises(StoreError, match="cannot write 'd'"):
        store.put_bytes("d", b"2")


def test_local_store_root_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="cannot create local store"):
        LocalStore(tmp_path / "f" / "store")


_CRASH_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from dataplane.store import LocalStore
    store = LocalStore(sys.argv[1])
    # "error": the write fails with EFBIG; "crash": SIGXFSZ kills the process mid-write
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "error" else signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    try:
        store.put_bytes("obj.bin", b"n" * 100_000)
    except Exception as err:
        print(type(err).__name__, err)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("mode", ["error", "crash"])
def test_local_write_is_atomic(tmp_path, mode):
    """A write that dies part way (disk full / killed process) leaves the old object intact."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("obj.bin", b"old")
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(store.root), mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if mode == "error":
        assert proc.returncode == 3 and "StoreError" in proc.stdout and "obj.bin" in proc.stdout, proc
        # the failed write cleaned up its temp file
        assert sorted(os.listdir(store.root)) == ["obj.bin"]
    else:
        assert proc.returncode == -signal.SIGXFSZ, proc
    assert store.get_bytes("obj.bin") == b"old"
    assert list(store.list()) == ["obj.bin"]  # a crash's leftover temp file is never listed


# --------------------------------------------------------------------------- S3Store


def test_s3_bucket_created_and_shared(s3_server):
    bucket = unique_bucket()
    a = make_s3_store(s3_server, bucket)
    a.put_bytes("k", b"v")
    b = make_s3_store(s3_server, bucket)  # an existing bucket is reused
    assert b.get_bytes("k") == b"v"
    assert b.url_for("k") == f"s3://{bucket}/k"
    assert b.describe() == f"s3://{bucket} at http://{s3_server.endpoint}"


def test_s3_large_object(s3_server):
    store = make_s3_store(s3_server)
    data = os.urandom(6 * 1024 * 1024)  # above 5 MiB minio uploads in parts (multipart API)
    store.put_bytes("big.bin", data)
    assert store.get_bytes("big.bin") == data


def test_s3_fails_fast_when_server_stops():
    with S3Server() as srv:
        store = make_s3_store(srv)
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"
    endpoint = srv.endpoint
    ops = {
        "get": lambda s: s.get_bytes("k"),
        "put": lambda s: s.put_bytes("k2", b"v"),
        "exists": lambda s: s.exists("k"),
        "list": lambda s: list(s.list()),
        "delete": lambda s: s.delete("k"),
        "ping": lambda s: s.ping(),
    }
    fresh = S3Store(endpoint, unique_bucket(), srv.access_key, srv.secret_key)
    for s in (store, fresh):
        for name, op in ops.items():
            t0 = time.monotonic()
            with pytest.raises(StoreError) as info:
                op(s)
            elapsed = time.monotonic() - t0
            assert elapsed < 10, f"{name} took {elapsed:.1f}s"
            msg = str(info.value)
            assert endpoint in msg and s.bucket in msg, msg
            assert srv.secret_key not in msg


def test_s3_hung_server_times_out():
    """A server that accepts connections but never answers fails after the read timeout."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"
        store = S3Store(endpoint, unique_bucket(), "a", "b", timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=endpoint):
            store.get_bytes("k")
        assert time.monotonic() - t0 < 5


def test_s3_secrets_never_shown(s3_server):
    store = make_s3_store(s3_server)
    for text in (store.describe(), repr(store), store.url_for("a")):
        assert s3_server.secret_key not in text and s3_server.access_key not in text


def test_s3_bad_endpoint_and_bucket():
    with pytest.raises(ConfigError, match="bucket"):
        S3Store("127.0.0.1:9", "Bad_Bucket!", "a", "b")
    with pytest.raises(ConfigError, match="endpoint"):
        S3Store("ftp://host:1", "bucket", "a", "b")
    with pytest.raises(ConfigError, match="path"):
        S3Store("http://host:1/some/path", "bucket", "a", "b")
    s = S3Store("https://example.invalid:9000", "bucket", "a", "b")
    assert s.secure and s.endpoint == "example.invalid:9000"


# --------------------------------------------------------------------------- config / env


def test_store_config_and_open_store(tmp_path, s3_server):
    local = open_store(StoreConfig(kind="local", root=str(tmp_path / "s")))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"

    env = {"SEGLOOP_S3_ACCESS_KEY": s3_server.access_key, "SEGLOOP_S3_SECRET_KEY": s3_server.secret_key}
    cfg = {"kind": "s3", "endpoint": s3_server.url, "bucket": unique_bucket()}
    s3 = open_store(cfg, env=env)
    assert isinstance(s3, S3Store) and not s3.secure
    s3.put_bytes("x", b"1")
    assert s3.get_bytes("x") == b"1"

    with pytest.raises(ConfigError, match="no S3 credentials"):
        open_store(cfg, env={})
    with pytest.raises(ConfigError, match="endpoint and bucket"):
        open_store({"kind": "s3"})
    with pytest.raises(ConfigError, match="kind"):
        open_store({"kind": "ftp"})


def test_credentials_never_in_config(tmp_path):
    p = tmp_path / "store.yaml"
    p.write_text("kind: s3\nendpoint: localhost:9000\nbucket: b\nsecret_key: hunter2\n")
    with pytest.raises(ConfigError, match="credentials do not belong in config files") as info:
        load_config(StoreConfig, p)
    assert "hunter2" not in str(info.value)


def test_credential_fallbacks():
    assert s3_credentials({}) == (None, None)
    assert s3_credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}) == ("a", "b")
    assert s3_credentials({"MINIO_ROOT_USER": "m", "MINIO_ROOT_PASSWORD": "p"}) == ("m", "p")
    both = {
        "SEGLOOP_S3_ACCESS_KEY": "s",
        "SEGLOOP_S3_SECRET_KEY": "t",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
    }
    assert s3_credentials(both) == ("s", "t")
    assert s3_credentials({"SEGLOOP_S3_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}) == (
        "a",
        "b",
    )


def test_store_from_env(tmp_path, monkeypatch, s3_server):
    monkeypatch.chdir(tmp_path)
    default = store_from_env({})
    assert isinstance(default, LocalStore) and default.root == tmp_path / ".segloop" / "store"

    s = store_from_env({"SEGLOOP_STORE": str(tmp_path / "elsewhere")})
    assert isinstance(s, LocalStore) and s.root == tmp_path / "elsewhere"
    s = store_from_env({"SEGLOOP_STORE": f"file://{tmp_path / 'f'}"})
    assert isinstance(s, LocalStore) and s.root == tmp_path / "f"

    bucket = unique_bucket()
    env = {
        "SEGLOOP_STORE": f"s3://{bucket}",
        "SEGLOOP_S3_ENDPOINT": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    s3 = store_from_env(env)
    assert isinstance(s3, S3Store) and s3.bucket == bucket
    s3.ping()

    with pytest.raises(ConfigError, match="SEGLOOP_S3_ENDPOINT"):
        store_from_env({"SEGLOOP_STORE": "s3://bucket"})
    with pytest.raises(ConfigError, match="s3://<bucket>"):
        store_config_from_url("s3://bucket/prefix", {"SEGLOOP_S3_ENDPOINT": "h:1"})
    with pytest.raises(ConfigError, match="expected a local path"):
        store_config_from_url("gs://bucket", {})
    cfg = store_config_from_url("s3://b", {"SEGLOOP_S3_ENDPOINT": "h:1", "SEGLOOP_S3_SECURE": "true"})
    assert cfg.secure and cfg.endpoint == "h:1"


# --------------------------------------------------------------------------- layout helpers


def test_layout_keys():
    import datetime as dt

    sha = "ab" + "0" * 62
    assert blob_key(sha) == f"blobs/sha256/ab/{sha}"
    with pytest.raises(StoreError):
        blob_key("xyz")
    assert manifest_key("pets", "0123456789abcdef") == "datasets/pets/0123456789abcdef.json"
    assert lineage_key("pets", "0123456789abcdef") == "datasets/pets/lineage/0123456789abcdef.json"
    assert lineage_key("pets", None) == "datasets/pets/lineage/root.json"
    assert head_key("pets") == "datasets/pets/lineage/HEAD.json"
    with pytest.raises(StoreError):
        manifest_key("../x", "v")
    when = dt.datetime(2024, 3, 5, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
    assert capture_keys("req-1", ".jpg", when) == ("captures/2024-03-06/req-1.jpg", "captures/2024-03-06/req-1.json")
    for bad_id in ("../x", "a/b", "", "x" * 200):
        with pytest.raises(StoreError):
            capture_keys(bad_id, "jpg")
    with pytest.raises(StoreError):
        capture_keys("ok", "json")
