"""Faults caused for real: racing promotions, an unreadable champion, failing and forgotten
retraining jobs, a monitor whose process is killed.

Real MLflow (SQLite), the session's real Ray cluster and its Jobs API; only the champion's
*score* is given by the test (a number per version) so that a race is cheap to stage.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import wait_for
from train import registry
from train.config import TrainConfig
from train.job import compare_and_promote

pytestmark = pytest.mark.faults

MODEL = "faults-pets"


def _registry(tmp_path: Path) -> tuple[mlflow.MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    client.create_registered_model(MODEL)
    return client, uri


def _version(client: mlflow.MlflowClient, tmp_path: Path) -> str:
    return str(client.create_model_version(MODEL, source=(tmp_path / "model").as_uri()).version)


def test_racing_promotions_leave_the_better_champion_and_a_true_history(ray_cluster, tmp_path: Path) -> None:
    client, _ = _registry(tmp_path)
    v1 = _version(client, tmp_path)
    registry.record_decision(MODEL, registry.Decision(True, v1, 0.5, None, None, 0.0, "val_miou", "first"))
    better, worse = _version(client, tmp_path), _version(client, tmp_path)
    scores = {v1: 0.5, better: 0.7, worse: 0.6}

    def slow_score(version: str) -> float:  # scoring the champion takes a while: the race window
        time.sleep(1.0)
        return scores[version]

    cfg = TrainConfig(dataset="unused", registered_model=MODEL, promotion_margin=0.0)
    decisions: dict[str, registry.Decision] = {}
    threads = [
        threading.Thread(target=lambda v=v: decisions.update({v: compare_and_promote(cfg, v, scores[v], slow_score)}))
        for v in (worse, better)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert registry.champion_version(MODEL) == better
    # each comparison saw the champion of its time: the history is a chain, not a fork
    chain, v = [], better
    while v:
        chain.append(v)
        v = client.get_model_version(MODEL, v).tags.get("segloop.previous_champion")
    assert chain[-1] == v1 and len(chain) == len(set(chain))
    assert chain in ([better, v1], [better, worse, v1])
    if decisions[worse].promoted:  # the worse one went first, then lost its title on merit
        assert decisions[better].champion_version == worse
    else:
        assert decisions[worse].champion_version == better and "does not beat" in decisions[worse].reason
    assert registry.rollback(MODEL) == (better, chain[1])


def test_a_champion_mlflow_cannot_read_is_never_replaced(ray_cluster, tmp_path: Path) -> None:
    client, _ = _registry(tmp_path)
    v1 = _version(client, tmp_path)
    registry.record_decision(MODEL, registry.Decision(True, v1, 0.9, None, None, 0.0, "val_miou", "first"))
    challenger = _version(client, tmp_path)
    cfg = TrainConfig(dataset="unused", registered_model=MODEL)

    locked = threading.Event()

    def hold_the_file(seconds: float) -> None:  # another writer: "database is locked" (MLflow waits 20 s)
        db = sqlite3.connect(tmp_path / "mlflow.db", timeout=0, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        db.execute("ROLLBACK")
        db.close()

    with registry.promotion_lock(MODEL):  # (the lease actor exists: the read starts at once below)
        pass
    holder = threading.Thread(target=hold_the_file, args=(24.0,))  # longer than MLflow's 20 s wait
    holder.start()
    locked.wait(10)
    d = compare_and_promote(cfg, challenger, 0.95, lambda v: 0.9)
    holder.join()
    assert not d.promoted and "could not be compared" in d.reason and "locked" in d.reason
    assert registry.champion_version(MODEL) == v1
    tags = client.get_model_version(MODEL, challenger).tags  # written once the file was free again
    assert tags["segloop.decision"] == "rejected" and "database is locked" in tags["segloop.reason"]


# ----------------------------------------------------------------------------- the monitor's retraining jobs
@pytest.fixture()
def failing_monitor(ray_cluster, pets_root: Path, tmp_path: Path):
    """A monitor config whose retraining job always fails (a config error: exit 2 in seconds)."""
    from dataplane.store import LocalStore
    from dataplane.versions import create_version

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: many\n")
    store = LocalStore(tmp_path / "store")
    v1 = create_version(store, "pets", pets_root, "semantic")
    url = ray_cluster.dashboard_url
    config = {
        "interval_s": 0.5, "rules": [], "dataset_name": "pets", "min_new_samples": 1, "registered_model": MODEL,
        "train_config": str(bad), "dashboard_url": url if url.startswith("http") else f"http://{url}",
        "data_dir": str(tmp_path), "store": {"kind": "local", "root": str(tmp_path / "store")},
        "max_attempts": 2, "retry_backoff_s": 2.0,
    }  # fmt: skip
    return config, store, v1


def _new_version(store, v1, content: bytes) -> str:
    """A child version (its id is content-addressed: distinct ``content`` per test, as the Ray
    cluster and its job ids are shared by the session)."""
    from dataplane.versions import add_samples

    return add_samples(store, "pets", v1, {"images/extra.jpg": content}, {"trainval": ["extra"]}).version


def test_a_failing_job_backs_off_gives_up_and_a_killed_monitor_ticks_on(failing_monitor) -> None:
    import os
    import signal

    import ray
    from ray.util.state import list_actors

    from monitoring import actor

    config, store, v1 = failing_monitor
    handle = actor.start(config, restart=True)
    try:
        wait_for(lambda: ray.get(handle.status.remote())["trained"], 30, "the first tick")
        v2 = _new_version(store, v1, b"backoff test")
        status = wait_for(
            lambda: (s := ray.get(handle.status.remote()))["retrain_blocked"] == v2 and s, 120, "attempts used up"
        )
        jobs = [j for j in status["jobs"] if j["dataset_version"] == v2]
        assert [j["status"] for j in jobs] == ["FAILED", "FAILED"] and [j["attempt"] for j in jobs] == [1, 2]
        assert jobs[1]["submitted"] - jobs[0]["ended"] >= 2.0  # backed off before the second attempt
        time.sleep(3)  # no storm: nothing more is submitted for a version that used up its attempts
        totals = ray.get(handle.status.remote())["totals"]["jobs"]
        assert (totals["submitted"], totals["failed"], totals["exhausted"]) == (2, 2, 1)

        (info,) = [a for a in list_actors(filters=[("name", "=", actor.ACTOR_NAME)]) if a.state == "ALIVE"]
        killed_at = time.time()
        os.kill(info.pid, signal.SIGKILL)
        after = wait_for(
            lambda: (s := _status_or_none(handle)) and (s["last_tick"] or 0) > killed_at + 1 and s,
            90,
            "the restarted monitor's tick",
        )
        assert after["totals"]["jobs"]["submitted"] == 2 and after["retrain_blocked"] == v2
    finally:
        ray.kill(handle)


def _status_or_none(handle):
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(handle.status.remote(), timeout=10)
    except (RayActorError, ray.exceptions.GetTimeoutError):
        return None


def test_jobs_are_adopted_released_and_stopped_at_their_deadline(failing_monitor) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from monitoring.actor import STATE_KEY, Monitor

    config, store, v1 = failing_monitor
    client = JobSubmissionClient(config["dashboard_url"])
    # a monitor that died between submitting and saving: the next one adopts the same job
    first = Monitor(config).submit(v1.version, 1, "test")
    fresh = Monitor(config)
    fresh.state["jobs"], fresh.state["attempts"] = [], {}
    again = fresh.submit(v1.version, 1, "test")
    assert again["id"] == first["id"]
    assert sum(1 for j in client.list_jobs() if j.submission_id == first["id"]) == 1

    # a job id the cluster no longer knows (its head restarted): released, the state saved
    m = Monitor(config)
    m.state["jobs"] = [{**first, "id": "raysubmit_forgotten", "status": "RUNNING"}]
    assert {"action": "job_ended", "id": "raysubmit_forgotten", "status": "LOST"} in m.tick(signals={})
    assert store.get_json(STATE_KEY)["jobs"][-1]["status"] == "LOST"

    # a job past its deadline is stopped and counted as a failed attempt
    late = Monitor({**config, "job_timeout_s": 0.01})
    late.state["jobs"], late.state["attempts"] = [], {}
    job = late.submit(_new_version(store, v1, b"deadline test"), 2, "test")
    time.sleep(0.1)
    ended = late.follow_jobs(time.time())
    assert ended[0]["status"] == "TIMED_OUT", ended
    assert late.state["attempts"][job["dataset_version"]]["failures"] == 1
    wait_for(lambda: client.get_job_status(job["id"]) == JobStatus.STOPPED, 30, "the job to be stopped")


# ----------------------------------------------------------------------------- training through an MLflow outage
@pytest.mark.slow
def test_a_30s_mlflow_outage_mid_run_loses_no_metric_and_a_rerun_resumes(
    ray_cluster, pets_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    from segloop.simcluster import start_mlflow_server
    from tests.test_train import pets_cfg
    from train.job import run

    proc, uri = start_mlflow_server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = pets_cfg(pets_root, tmp_path / "segloop", epochs=4, run_name="outage", registered_model=MODEL)
    client = mlflow.MlflowClient(uri)
    outage: dict[str, float] = {}

    def take_mlflow_down_for_30s() -> None:
        def first_epoch_logged() -> bool:
            runs = mlflow.search_runs(experiment_names=[cfg.experiment], output_format="list")
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "val_miou"))

        wait_for(first_epoch_logged, 240, "the first epoch's metrics")
        os.killpg(proc.pid, signal.SIGKILL)
        outage["start"] = time.time()
        time.sleep(30)
        outage["server"] = start_mlflow_server(tmp_path, port=int(uri.rsplit(":", 1)[1]))[0]
        outage["end"] = time.time()

    chaos = threading.Thread(target=take_mlflow_down_for_30s)
    chaos.start()
    try:
        result = run(cfg)
    finally:
        chaos.join(300)
    try:
        assert outage["end"] - outage["start"] >= 30
        assert client.get_run(result.run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(result.run_id, "val_miou")] == list(range(4))
        assert result.promoted and result.model_version == "1"

        # re-running with the same run name resumes: the same MLflow run, training continues at epoch 5
        more = run(cfg.model_copy(update={"epochs": 5}))
        assert more.run_id == result.run_id and more.epochs_run == 5
        assert sorted({m.step for m in client.get_metric_history(result.run_id, "val_miou")}) == list(range(5))
    finally:
        os.killpg(outage["server"].pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- capture budget
def test_traffic_above_the_capture_budget_stops_at_the_budget_across_replicas(ray_cluster, tmp_path: Path) -> None:
    import ray

    from dataplane.annotation import list_captures
    from dataplane.capture import BUDGET_ACTOR, budget_gate
    from dataplane.store import LocalStore
    from serve_app.capture import Capturer
    from tests.test_capture import jpeg, semantic_record

    store = {"kind": "local", "root": str(tmp_path / "store")}
    image, record = jpeg(), semantic_record(0.9)
    policy = {"mode": "all", "drop_duplicates": False}  # one image offered 20 times, every copy counts
    replicas = [Capturer(store, policy, budget=budget_gate({"objects_per_day": 7}, store)) for _ in range(2)]
    try:
        offered = [c.offer(image, "image/png", record) for _ in range(10) for c in replicas]
        assert all(offered)  # the request path is not affected: every prediction was answered and queued
        for c in replicas:
            assert c.flush(30)
        stats = [c.stats() for c in replicas]
        assert sum(s["stored"] for s in stats) == 7 and sum(s["over_budget"] for s in stats) == 13
        assert len(list_captures(LocalStore(tmp_path / "store"))) == 7
    finally:
        for c in replicas:
            c.close()
        ray.kill(ray.get_actor(BUDGET_ACTOR, namespace="segloop"))
