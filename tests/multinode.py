"""A real multi-node Ray cluster on one machine whose second node shares no disk with the driver.

The head starts with ``num_cpus=0`` (as in ``kuberay.yaml``), so every worker, replica and task
that needs a CPU runs on the second node. That node is started with ``ray start --address=...``
inside its own mount namespace (``unshare --mount``, root only) with a private tmpfs over every
directory the driver and the head write to — the test's base directory (data, MLflow server
files, the head's Ray temp dir), pytest's temp root and this machine's segloop node cache —
while the code and the virtual environment stay visible. Shared things go through services
on 127.0.0.1: a real ``mlflow server`` and moto's S3 server. Token authentication is on, as
for every Ray CLI call on the cluster (``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.s3server import S3Server, unique_bucket

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ISOLATED = "isolated_node"  # a custom resource only the second node has


@dataclass
class MultiNode:
    """What the tests need to reach the cluster and its services."""

    base: Path
    env: dict[str, str]  # the cluster profile: every Ray CLI call and node uses it
    dashboard: str
    gcs: str
    mlflow_uri: str
    s3: S3Server
    bucket: str
    hidden: list[Path]
    procs: list[subprocess.Popen] = field(default_factory=list)
    node_id: str = ""  # the isolated node's Ray node id

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


def skip_without_namespaces() -> None:
    """Mount namespaces need root (development machines and CI run as root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("multi-node test needs root and unshare(1) for a mount namespace")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.strip()}")


def hidden_dirs(base: Path, pytest_root: Path) -> list[Path]:
    """Directories the isolated node must not see; never one holding the code or the venv."""
    from segloop.settings import node_cache_dir

    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dirs = [base, pytest_root, cache]
    for d in dirs:
        for keep in (REPO, Path(sys.prefix)):
            if keep.resolve().is_relative_to(d.resolve()):
                pytest.skip(f"{keep} lies inside {d}: it cannot be hidden from the second node")
    return dirs


def start_mlflow_server(base: Path) -> tuple[subprocess.Popen, str]:
    """A real tracking server (SQLite behind it, artifacts proxied through it)."""
    import requests

    port = free_port()
    (base / "mlflow").mkdir()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{base}/mlflow/mlflow.db"]
        + ["--artifacts-destination", str(base / "mlflow" / "artifacts")],
        stdout=open(base / "mlflow" / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(uri + "/health", timeout=2).ok:
                return proc, uri
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not start: {(base / 'mlflow' / 'server.log').read_text()[-2000:]}")


def cluster_env(base: Path, s3: S3Server, bucket: str, mlflow_uri: str) -> dict[str, str]:
    """The cluster profile: shared services only; credentials from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SEGLOOP_", "MLFLOW_"))}
    env.update(
        RAY_AUTH_MODE="token",
        PATH=f"{BIN}:{env.get('PATH', '')}",
        SEGLOOP_STORE=f"s3://{bucket}",
        SEGLOOP_S3_ENDPOINT=s3.endpoint,
        SEGLOOP_S3_ACCESS_KEY=s3.access_key,
        SEGLOOP_S3_SECRET_KEY=s3.secret_key,
        MLFLOW_TRACKING_URI=mlflow_uri,
        OMP_NUM_THREADS="1",
        RAY_TRAIN_ENABLE_PRINT_PATCH="0",
    )
    return env


def start_head(c: MultiNode) -> None:
    gcs_port, dash_port = free_port(), free_port()
    out = c.ray(
        "start", "--head", "--num-cpus=0", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}", f"--temp-dir={c.base / 'ray'}", "--include-dashboard=true",
        "--min-worker-port=20000", "--max-worker-port=20999", "--disable-usage-stats",
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"ray start --head failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    c.gcs, c.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"


def start_isolated_node(c: MultiNode, cpus: int = 2) -> None:
    """``ray start --address`` in a private mount namespace: tmpfs over every hidden directory."""
    mounts = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in c.hidden)
    ray_start = " ".join(
        [
            str(BIN / "ray"), "start", f"--address={c.gcs}", f"--num-cpus={cpus}",
            f"--resources='{json.dumps({ISOLATED: cpus})}'", f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=21000", "--max-worker-port=21999", "--disable-usage-stats",
        ]
    )  # fmt: skip
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {ray_start}"],
        env=c.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"isolated node did not start: {out.stdout[-1500:]}{out.stderr[-1500:]}")


def wait_for_isolated_node(c: MultiNode, timeout_s: float = 90) -> str:
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for n in ray.nodes():
            if n.get("Alive") and n.get("Resources", {}).get(ISOLATED):
                return n["NodeID"]
        time.sleep(1)
    raise RuntimeError("the isolated node did not join the cluster")


def stop(c: MultiNode) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    c.ray("stop", "--force", timeout=120)
    for p in c.procs:
        p.kill()
        p.wait(timeout=30)
    c.s3.stop()
    shutil.rmtree(c.base, ignore_errors=True)


def start_cluster(pytest_root: Path) -> MultiNode:
    """S3, the MLflow server, the head, the isolated node; the test process connected as a driver."""
    import ray

    skip_without_namespaces()
    base = Path(tempfile.mkdtemp(prefix="smn-", dir="/tmp"))
    hidden = hidden_dirs(base, pytest_root)
    s3 = S3Server().start()
    bucket = unique_bucket("multinode")
    mlflow_proc, mlflow_uri = start_mlflow_server(base)
    c = MultiNode(base, cluster_env(base, s3, bucket, mlflow_uri), "", "", mlflow_uri, s3, bucket, hidden)
    c.procs.append(mlflow_proc)
    try:
        start_head(c)
        start_isolated_node(c)
        if os.environ.get("RAY_AUTH_MODE") != "token":  # Ray reads it once, at import (tests/conftest.py sets it)
            raise RuntimeError("RAY_AUTH_MODE=token must be set before Ray is imported")
        ray.init(address=c.gcs, log_to_driver=False)
        c.node_id = wait_for_isolated_node(c)
    except BaseException:
        stop(c)
        raise
    return c
