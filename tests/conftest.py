"""Shared fixtures: tiny generated datasets, one local Ray cluster per session, MLflow, S3.

Everything runs for real on 127.0.0.1: Ray, MLflow on SQLite, moto's S3 server.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from segloop.simcluster import free_port  # noqa: F401 - the tests' port helper, shared with the demo

# Keep torch and Ray from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Token authentication, as Ray 2.60 turns on for local clusters, set before Ray is first imported:
# Ray reads the mode once per process, and a driver joining a cluster it did not start
# (tests/test_multinode.py) only sends the token when the variable says so.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_ray_cluster: starts its own Ray cluster in a subprocess; runs first")
    config.addinivalue_line(
        "markers", "multinode: a real two-node Ray cluster whose second node shares no disk (root, unshare)"
    )
    config.addinivalue_line("markers", "faults: a fault caused for real (a killed process, a locked store, a race)")
    config.addinivalue_line(
        "markers", "labelstudio: talks to a real Label Studio server (from .venv-labelstudio, started once per session)"
    )
    config.addinivalue_line(
        "markers", "long: over the CI time budget on 2 cores (6+ min); runs with SEGLOOP_LONG_TESTS=1 (make test-long)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("long") and os.environ.get("SEGLOOP_LONG_TESTS") != "1":
        pytest.skip("long test: set SEGLOOP_LONG_TESTS=1 (make test-long) to run it")


def wait_for(predicate, timeout_s: float, what: str):
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start their own Ray cluster run before the session cluster exists: two local
    clusters on one machine would fight over the dashboard agent's fixed port (52365).

    When Label Studio tests were collected, its server starts now, in the background: its
    first start migrates a fresh database (~30 s), which then overlaps the other tests."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray_cluster") is None)
    if any(item.get_closest_marker("labelstudio") for item in items):
        import tempfile

        from dataplane.annotation.ls_server import launch_label_studio
        from segloop.errors import ConfigError

        try:
            _LABEL_STUDIO["server"] = launch_label_studio(Path(tempfile.mkdtemp(prefix="segloop-ls-")))
        except ConfigError as err:
            _LABEL_STUDIO["error"] = str(err)


_LABEL_STUDIO: dict = {}


@pytest.fixture(scope="session")
def label_studio_launched():
    """The session's Label Studio server, possibly still starting (for a test that waits later)."""
    server = _LABEL_STUDIO.get("server")
    if server is None:
        pytest.fail(_LABEL_STUDIO.get("error", "Label Studio was not started (no test marked labelstudio?)"))
    return server


@pytest.fixture(scope="session")
def label_studio(label_studio_launched):
    """The session's Label Studio server (LocalLabelStudio: url, api_key), up and answering."""
    from dataplane.annotation.ls_server import wait_until_up

    server = label_studio_launched
    wait_until_up(server, timeout_s=240, quiet=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.data.synth import generate_pets

    return generate_pets(tmp_path_factory.mktemp("data") / "pets", n=96, seed=0, size=64)


@pytest.fixture(scope="session")
def pets_shift_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.data.synth import generate_pets

    return generate_pets(tmp_path_factory.mktemp("data") / "pets_shift", n=96, seed=1, size=64, shift=True)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.data.synth import generate_coco

    return generate_coco(tmp_path_factory.mktemp("data") / "coco", n=16, seed=0, size=96)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray cluster for the whole session (4 logical CPUs on the 2-core machine), with
    Serve's fast HTTP path on, as segloop ships it (HAProxy + direct ingress)."""
    import ray

    from segloop.settings import use_serve_fast_path

    use_serve_fast_path()  # read by Ray's processes when they start: before ray.init
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    metrics_port = free_port()
    ctx = ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _metrics_export_port=metrics_port,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        log_to_driver=True,
    )
    ctx.metrics_export_port = metrics_port  # type: ignore[attr-defined]
    yield ctx
    ray.shutdown()


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A fresh segloop data dir: MLflow SQLite + artifacts + Ray results live here."""
    d = tmp_path / "segloop"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def s3_server():
    from tests.s3server import start_s3_server

    srv = start_s3_server()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; don't let one test's store leak into the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    server = _LABEL_STUDIO.pop("server", None)
    if server is not None:
        server.stop()
