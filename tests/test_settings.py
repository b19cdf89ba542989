"""The cluster profile's pieces without a cluster: what counts as local, where checkpoints go."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.store import StoreConfig
from segloop.settings import is_local_tracking, node_cache_dir, shared_service_problems
from tests.s3server import start_s3_server, unique_bucket


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:////tmp/x/mlflow.db", True),
        ("file:///tmp/mlruns", True),
        ("/tmp/mlruns", True),
        ("mlruns", True),
        ("http://mlflow:5000", False),
        ("https://mlflow.example.com", False),
        ("postgresql://db/mlflow", False),
        ("databricks", False),
    ],
)
def test_local_tracking_uris(uri: str, local: bool) -> None:
    assert is_local_tracking(uri) is local


def test_shared_service_problems_name_the_setting_to_change() -> None:
    local = StoreConfig(kind="local", root="/data/store")
    s3 = StoreConfig(kind="s3", endpoint="minio:9000", bucket="segloop")
    problems = shared_service_problems(local, "sqlite:////data/mlflow.db", dataset_dir="/data/pets")
    assert len(problems) == 3
    assert "SEGLOOP_STORE=s3://" in problems[0] and "/data/store" in problems[0]
    assert "MLFLOW_TRACKING_URI=http" in problems[1] and "sqlite:////data/mlflow.db" in problems[1]
    assert "dataset_version" in problems[2] and "/data/pets" in problems[2]
    assert shared_service_problems(s3, "http://mlflow:5000") == []
    assert shared_service_problems(None, None) == []


def test_node_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGLOOP_CACHE_DIR", str(tmp_path / "cache"))
    assert node_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SEGLOOP_CACHE_DIR")
    assert node_cache_dir().name.startswith("segloop-")


def test_run_storage_follows_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """S3 store -> Ray Train writes checkpoints to s3://<bucket>/ray_results (checked by a real write)."""
    import pyarrow.fs

    from segloop.errors import ConfigError
    from train.run import run_storage

    monkeypatch.delenv("SEGLOOP_STORE", raising=False)
    assert run_storage(tmp_path).path == str(tmp_path / "ray_results")

    srv = start_s3_server()
    try:
        bucket = unique_bucket()
        monkeypatch.setenv("SEGLOOP_STORE", f"s3://{bucket}")
        monkeypatch.setenv("SEGLOOP_S3_ENDPOINT", srv.endpoint)
        for var in ("SEGLOOP_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MINIO_ROOT_USER"):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(ConfigError, match="no S3 credentials"):
            run_storage(tmp_path)
        monkeypatch.setenv("SEGLOOP_S3_ACCESS_KEY", srv.access_key)
        monkeypatch.setenv("SEGLOOP_S3_SECRET_KEY", srv.secret_key)
        storage = run_storage(tmp_path)
        assert storage.path == f"{bucket}/ray_results" and str(storage) == f"s3://{bucket}/ray_results"
        assert srv.secret_key not in str(storage)
        from tests.s3server import make_s3_store

        make_s3_store(srv, bucket).put_bytes("keep", b"x")  # the bucket exists
        with storage.filesystem.open_output_stream(f"{storage.path}/run/checkpoint_000000/checkpoint.pt") as f:
            f.write(b"weights")
        info = storage.filesystem.get_file_info(f"{storage.path}/run/checkpoint_000000/checkpoint.pt")
        assert info.type == pyarrow.fs.FileType.File and info.size == 7
    finally:
        srv.stop()


def test_training_preflight_names_a_missing_bucket_or_a_dead_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The cluster profile's S3 side is checked before any work; the secret never shows."""
    from segloop.errors import StoreError
    from tests.conftest import free_port
    from train.config import TrainConfig
    from train.run import resolve_dataset

    srv = start_s3_server()
    try:
        monkeypatch.setenv("SEGLOOP_S3_ACCESS_KEY", srv.access_key)
        monkeypatch.setenv("SEGLOOP_S3_SECRET_KEY", srv.secret_key)
        cfg = TrainConfig(task="semantic", dataset_version="abc", data_dir=str(tmp_path))
        for endpoint, bucket, expected in (
            (srv.endpoint, "no-such-bucket", "bucket 'no-such-bucket' does not exist"),
            (f"127.0.0.1:{free_port()}", "segloop", "127.0.0.1"),
        ):
            monkeypatch.setenv("SEGLOOP_STORE", f"s3://{bucket}")
            monkeypatch.setenv("SEGLOOP_S3_ENDPOINT", endpoint)
            with pytest.raises(StoreError) as err:
                resolve_dataset(cfg)
            assert expected in str(err.value) and srv.secret_key not in str(err.value), str(err.value)
    finally:
        srv.stop()
