"""A real multi-node Ray cluster on one machine whose second node shares no disk with the driver.

For ``segloop demo --cluster`` and ``tests/test_multinode.py``. The head starts with
``num_cpus=0`` (as in ``kuberay.yaml``), so every worker, replica and task that needs a CPU
runs on the second node. That node is started with ``ray start --address=...`` inside its own
mount namespace (``unshare --mount``, root only) with a private tmpfs over every directory the
driver and the head write to (``hidden``: the base directory with the data, the MLflow
server's files and the head's Ray temp dir, plus what the caller adds), while the code and the
virtual environment stay visible. Shared things go through services on 127.0.0.1: a real
``mlflow server`` and an S3 server (the caller's: moto here, MinIO on a real cluster). Token
authentication is on, as for every Ray CLI call on the cluster (``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

BIN = Path(sys.executable).parent
ISOLATED = "isolated_node"  # a custom resource only the second node has
REPO = Path(__file__).resolve().parents[1]


class S3Endpoint(Protocol):
    endpoint: str
    access_key: str
    secret_key: str

    def stop(self) -> None: ...


class Unavailable(RuntimeError):
    """This machine cannot host the simulated cluster (the reason says why)."""


class MotoS3:
    """moto's S3 server in this process (there is no MinIO binary here; the minio SDK talks to it)."""

    access_key, secret_key = "segloop-demo", "segloop-demo-secret"

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise Unavailable(
                "the simulated cluster's S3 server needs moto[server]: pip install -e '.[test]'"
            ) from None
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"{host}:{port}"

    def stop(self) -> None:
        self._server.stop()


@dataclass
class SimCluster:
    """What a driver needs to reach the cluster and its services."""

    base: Path
    env: dict[str, str]  # the cluster profile: every Ray CLI call and node uses it
    s3: Any
    bucket: str
    hidden: list[Path]
    mlflow_uri: str = ""
    dashboard: str = ""
    gcs: str = ""
    node_id: str = ""  # the isolated node's Ray node id
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_host(hidden: list[Path]) -> None:
    """Mount namespaces need root; nothing hidden may hold the code or the venv."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("unshare"):
        raise Unavailable("a simulated multi-node cluster needs root and unshare(1) for a mount namespace")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise Unavailable(f"cannot create a mount namespace here: {probe.stderr.strip()}")
    for d in hidden:
        for keep in (REPO, Path(sys.prefix)):
            if keep.resolve().is_relative_to(d.resolve()):
                raise Unavailable(f"{keep} lies inside {d}: it cannot be hidden from the second node")


def start_mlflow_server(base: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real tracking server (SQLite behind it, artifacts proxied through it); ``port`` to
    start it again where it was."""
    import requests

    port, home = port or free_port(), base / "mlflow"
    home.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", str(home / "artifacts")],
        stdout=open(home / "server.log", "a"),
        stderr=subprocess.STDOUT,
        # its own process group, so stop() takes its workers with it; MLflow's server-side job
        # runner (a pool of Huey consumers) is not used by segloop
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(uri + "/health", timeout=2).ok:
                return proc, uri
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")


def cluster_env(s3: S3Endpoint, bucket: str, mlflow_uri: str) -> dict[str, str]:
    """The cluster profile: shared services only; credentials from the environment."""
    from segloop.settings import SERVE_FAST_PATH_ENV

    # Serve's HAProxy fast path stays off here: both simulated nodes share this host's network, and
    # each node's HAProxy would bind the same Serve, stats and metrics ports (on real nodes it is on)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "SEGLOOP_", "MLFLOW_")) and k not in SERVE_FAST_PATH_ENV
    }
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


def start_head(c: SimCluster) -> None:
    gcs_port, dash_port = free_port(), free_port()
    out = c.ray(
        "start", "--head", "--num-cpus=0", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}", f"--temp-dir={c.base / 'ray'}", "--include-dashboard=true",
        "--min-worker-port=20000", "--max-worker-port=20999", "--disable-usage-stats",
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"ray start --head failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    c.gcs, c.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"


def start_isolated_node(c: SimCluster, cpus: int) -> None:
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


def wait_for_isolated_node(timeout_s: float = 90) -> str:
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for n in ray.nodes():
            if n.get("Alive") and n.get("Resources", {}).get(ISOLATED):
                return n["NodeID"]
        time.sleep(1)
    raise RuntimeError("the isolated node did not join the cluster")


def stop(c: SimCluster) -> None:
    """Disconnect, stop both nodes and the services, remove the base directory."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    c.ray("stop", "--force", timeout=120)
    for p in c.procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the server and its workers
        except ProcessLookupError:
            pass
        p.wait(timeout=30)
    c.s3.stop()
    shutil.rmtree(c.base, ignore_errors=True)


def start(
    base: Path, s3: S3Endpoint, bucket: str, *, hidden: list[Path], cpus: int = 2, namespace: str | None = None
) -> SimCluster:
    """S3 (running), the MLflow server, the head, the isolated node; this process joins as a driver.

    ``RAY_AUTH_MODE=token`` must be in this process's environment before Ray is first imported
    (Ray reads it once). ``hidden`` adds to ``base`` what the second node must not see.
    """
    import ray

    hidden = [base, *hidden]
    check_host(hidden)
    if os.environ.get("RAY_AUTH_MODE") != "token":
        raise RuntimeError("RAY_AUTH_MODE=token must be set before Ray is imported")
    c = SimCluster(base, {}, s3, bucket, hidden)
    try:
        proc, c.mlflow_uri = start_mlflow_server(base)
        c.procs.append(proc)
        c.env = cluster_env(s3, bucket, c.mlflow_uri)
        start_head(c)
        start_isolated_node(c, cpus)
        ray.init(address=c.gcs, log_to_driver=False, namespace=namespace)
        c.node_id = wait_for_isolated_node()
    except BaseException:
        stop(c)
        raise
    return c
