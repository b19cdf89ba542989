"""Cluster mode for real: a head with no CPUs and a second node that shares no disk with the driver.

See ``tests/multinode.py`` for how the cluster is built. What is checked: the one-machine
defaults are refused before any work; the README's ``ray job submit`` line trains on the
isolated node (both workers there), tracks into the MLflow server, checkpoints to S3,
registers and promotes; a replica on the isolated node loads the champion from the MLflow
server, answers ``/predict`` and captures into S3; the monitoring actor's retraining job on a
new dataset version succeeds although one of its training workers is ``kill -9``-ed mid-run
(it resumes from the S3 checkpoint). First, on a one-node ``ray start --head`` cluster of its own,
the README's ``ray job submit`` block runs as written.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multinode import BIN, REPO, SimCluster, start_cluster, stop

pytestmark = [pytest.mark.slow, pytest.mark.multinode, pytest.mark.own_ray_cluster]

MODEL = "segloop-pets"
# a tiny run of configs/pets.yaml: the README line plus size overrides
TINY = ["image_size=64", "batch_size=8", "precise_bn_images=16", "patience=0", "lr=0.01"]
PROFILE = (
    "SEGLOOP_STORE",
    "SEGLOOP_S3_ENDPOINT",
    "SEGLOOP_S3_ACCESS_KEY",
    "SEGLOOP_S3_SECRET_KEY",
    "MLFLOW_TRACKING_URI",
    "RAY_AUTH_MODE",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    saved = dict(os.environ)
    c = start_cluster(tmp_path_factory.getbasetemp())
    os.environ.update({k: c.env[k] for k in PROFILE})  # this process is a driver with the cluster profile
    try:
        yield c
    finally:
        stop(c)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def pets_v1(cluster: SimCluster) -> str:
    from dataplane.versions import create_version
    from segloop.settings import data_store
    from train.data.synth import generate_pets

    root = generate_pets(cluster.base / "data" / "pets-v1", n=48, seed=0, size=64)
    return create_version(data_store(), "pets", root, "semantic").version


def job_submit(c: SimCluster, *train_args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """The README's line: ``ray job submit --working-dir . -- python -m train --config configs/pets.yaml``."""
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", c.dashboard, "--working-dir", "."]
        + ["--", "python", "-m", "train", "--config", "configs/pets.yaml", *train_args],
        cwd=REPO,
        env=c.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def readme_job_block() -> str:
    """The bash block after "`ray job submit`, step by step" in the README."""
    text = (REPO / "README.md").read_text()
    after = text[text.index("**`ray job submit`, step by step**") :]
    return after[after.index("```bash\n") + 8 : after.index("\n```", after.index("```bash"))]


def copy_checkout(dest: Path) -> Path:
    """What a clone holds (tracked and not-ignored files), without the data or the venv."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def test_readme_job_submit_block_on_one_node(tmp_path: Path) -> None:
    """The README's one-node block as written (venv path made absolute; smaller data and run)."""
    import mlflow

    script = readme_job_block()
    assert "ray start --head" in script and "ray job submit" in script, script
    script = script.replace("source .venv/bin/activate", f"source {BIN}/activate", 1)
    script = script.replace("--n 200", "--n 40").replace(
        "dataset_version=$VERSION", "dataset_version=$VERSION epochs=2 " + " ".join(TINY)
    )
    clone = copy_checkout(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGLOOP_", "MLFLOW_", "RAY_ADDRESS"))}
    try:
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
            check=False,
        )
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log and "promoted to champion" in log, log[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{clone}/.segloop/mlflow.db")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    assert (clone / ".segloop" / "mlartifacts").is_dir()  # beside the MLflow file, not in the job's copy


def test_one_machine_defaults_are_refused_before_work(
    cluster: SimCluster, pets_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segloop.errors import ConfigError
    from serve_app.app import build_app
    from train.config import TrainConfig
    from train.run import prepare

    for k in ("SEGLOOP_STORE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k)
    cfg = TrainConfig(task="semantic", dataset=str(pets_root), data_dir=str(tmp_path), image_size=64)
    with pytest.raises(ConfigError) as err:
        prepare(cfg)
    text = str(err.value)
    assert "2 nodes" in text and "SEGLOOP_STORE=s3://" in text and "MLFLOW_TRACKING_URI=http" in text, text
    assert "dataset_version" in text and not (tmp_path / "ray_results").exists()
    assert cluster.s3.secret_key not in text
    with pytest.raises(ConfigError, match="SEGLOOP_STORE=s3://"):
        build_app({"data_dir": str(tmp_path)})


def test_readme_job_submit_trains_on_the_isolated_node(cluster: SimCluster, pets_v1: str) -> None:
    import mlflow

    from dataplane.store import S3Store

    out = job_submit(cluster, f"dataset_version={pets_v1}", "epochs=2", *TINY)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    ranks = set(re.findall(rf"worker (\d)/2 on node {cluster.node_id}", log))
    assert ranks == {"0", "1"}, log[-4000:]  # both DDP workers ran on the node without the driver's files
    assert "promoted to champion" in log, log[-3000:]

    client = mlflow.MlflowClient(cluster.mlflow_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(champion.run_id)
    assert run.data.params["dataset_version"] == pets_v1
    assert run.data.tags["dataset.version"] == pets_v1 and "val_miou" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/report.md"}
    store = S3Store(cluster.s3.endpoint, cluster.bucket, cluster.s3.access_key, cluster.s3.secret_key)
    assert any("/checkpoint_" in k for k in store.list("ray_results/")), "no Ray Train checkpoint in S3"


def test_replica_on_the_isolated_node_serves_the_champion_and_captures_to_s3(
    cluster: SimCluster, pets_root: Path
) -> None:
    import requests
    from ray import serve
    from ray.util.state import list_actors

    from dataplane.capture import write_policy
    from monitoring import serving
    from segloop.settings import data_store
    from tests.conftest import free_port

    write_policy(data_store(), {"mode": "all"})
    port = free_port()
    args = {
        "model": {"model_uri": f"models:/{MODEL}@champion", "poll_interval_s": 1},
        "model_num_replicas": 1,
        "model_autoscaling": None,
    }
    serving.deploy(args, http_options={"host": "127.0.0.1", "port": port}, timeout_s=240)
    try:
        alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        replicas = [a for a in alive if "SegModel" in (a.class_name or "")]
        assert replicas and all(a.node_id == cluster.node_id for a in replicas), replicas
        image = next((pets_root / "images").glob("*.jpg")).read_bytes()
        for _ in range(3):
            r = requests.post(f"http://127.0.0.1:{port}/predict", data=image, timeout=60)
            assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"
        deadline = time.time() + 30
        while not list(data_store().list("captures/")) and time.time() < deadline:
            time.sleep(1)
        keys = list(data_store().list("captures/"))
        assert any(k.endswith(".json") for k in keys) and any(k.endswith(".jpg") for k in keys), keys
    finally:
        serve.shutdown()


def _training_worker_pid(node_id: str) -> int | None:
    from ray.util.state import list_actors

    for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
        if a.class_name == "RayTrainWorker" and a.node_id == node_id:
            return a.pid
    return None


def _checkpoints(keys: set[str]) -> set[str]:
    return {k.split("/checkpoint_")[1].split("/")[0] for k in keys if "/checkpoint_" in k}


@pytest.mark.faults
def test_monitor_retrains_on_a_new_version_through_a_worker_kill(cluster: SimCluster, pets_v1: str) -> None:
    import ray
    from ray.job_submission import JobSubmissionClient

    from dataplane.store import S3Store
    from dataplane.versions import create_version
    from monitoring import actor
    from segloop.settings import data_store
    from train.data.synth import generate_pets

    config = {
        "interval_s": 2, "rules": [], "dataset_name": "pets", "min_new_samples": 8, "registered_model": MODEL,
        "train_config": str(REPO / "configs" / "pets.yaml"), "dashboard_url": cluster.dashboard,
        "train_overrides": ["epochs=6", "max_failures=2", *TINY], "data_dir": str(cluster.base / "monitor"),
    }  # fmt: skip
    handle = actor.start(config, restart=True)
    time.sleep(5)  # the first tick records what the champion was trained on
    # enough data that an epoch outlasts Ray Train's 2 s poll (a fast VM trains 64 images in 0.3 s)
    root = generate_pets(cluster.base / "data" / "pets-v2", n=192, seed=1, size=64)
    v2 = create_version(data_store(), "pets", root, "semantic", parent=pets_v1).version

    jobs = JobSubmissionClient(cluster.dashboard)
    store = S3Store(cluster.s3.endpoint, cluster.bucket, cluster.s3.access_key, cluster.s3.secret_key)
    before = set(store.list("ray_results/"))
    job_id, pid, killed, ready_at = None, None, None, None
    deadline = time.time() + 420
    while time.time() < deadline:
        status = ray.get(handle.status.remote())
        job = next((j for j in status["jobs"] if j["dataset_version"] == v2), None)
        job_id = job and job["id"]
        if job_id and killed is None:
            pid = pid or _training_worker_pid(cluster.node_id)
            # two checkpoints in S3, then one poll of Ray Train's controller (every 2 s) later: the
            # first is registered (each epoch's report waits for every rank), so a restart resumes
            if ready_at is None and pid and len(_checkpoints(set(store.list("ray_results/")) - before)) >= 2:
                ready_at = time.time()
            if ready_at is not None and time.time() - ready_at >= 2.5:
                os.kill(pid, signal.SIGKILL)  # mid-run
                killed = pid
        if job_id and str(jobs.get_job_status(job_id)) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.3)
    ray.get(handle.stop.remote())
    assert job_id, "the monitor did not submit a retraining job for the new version"
    logs = jobs.get_job_logs(job_id)
    assert str(jobs.get_job_status(job_id)) == "SUCCEEDED", logs[-4000:]
    assert killed is not None, "no training worker was found to kill"
    assert re.search(r"resumed from checkpoint at epoch [1-5]/6", logs), logs[-4000:]
    assert re.search(rf"worker 0/2 on node {cluster.node_id}", logs)
    # the learning-rate schedule went on where it was, as in an uninterrupted run: cosine from
    # lr=0.01 falling every epoch and ending at eta_min = 1% of lr exactly once, at the last epoch
    import mlflow

    client = mlflow.MlflowClient(cluster.mlflow_uri)
    exp = client.get_experiment_by_name("segloop-pets")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`dataset.version` = '{v2}'")
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert sorted(lr) == list(range(6)), lr
    values = [lr[e] for e in range(6)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(1e-4), values
