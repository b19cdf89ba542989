"""The monitoring actor's decision logic (the actor's body, without Ray): fires once, capture on,
state survives a restart without a second trigger, schedules."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from dataplane.capture import read_policy
from monitoring.actor import Monitor, MonitorConfig, cron_matches, schedule_due

RULES = [
    {
        "name": "low_confidence",
        "signal": "mean_confidence",
        "op": "<",
        "threshold": 0.6,
        "window_s": 10,
        "for_s": 2,
        "hysteresis": 0.05,
        "cooldown_s": 100,
    }
]


def make(tmp_path: Path) -> Monitor:
    return Monitor(
        {
            "rules": RULES,
            "store": {"kind": "local", "root": str(tmp_path / "store")},
            "data_dir": str(tmp_path),
            "capture_on_alert": {"mode": "entropy", "threshold": 0.3},
        }
    )


def test_alert_fires_once_switches_capture_and_survives_restart(tmp_path: Path) -> None:
    m = make(tmp_path)
    low = {"mean_confidence": 0.4, "mean_entropy": 0.5, "error_rate": 0.0}
    assert m.tick(now=0.0, signals=low) == []  # pending: for_s not yet held
    acts = m.tick(now=3.0, signals=low)
    assert [a["action"] for a in acts] == ["alert", "capture"]
    assert read_policy(m.store).mode == "entropy"
    assert m.tick(now=5.0, signals=low) == []  # still firing: no second response
    assert m.state["totals"]["alerts"] == {"low_confidence|firing": 1}

    restarted = make(tmp_path)  # the actor restarts from the stored state
    assert restarted.engine.firing() == ["low_confidence"]
    assert restarted.state["totals"]["alerts"] == {"low_confidence|firing": 1}  # totals continue
    assert restarted.tick(now=6.0, signals=low) == []
    resolved = restarted.tick(now=8.0, signals={"mean_confidence": 0.9})
    assert [a["state"] for a in resolved if a["action"] == "alert"] == ["resolved"]
    # within the cooldown a new breach does not fire again
    restarted.tick(now=20.0, signals=low)
    assert restarted.tick(now=30.0, signals=low) == []


def test_missing_signals_never_fire(tmp_path: Path) -> None:
    m = make(tmp_path)
    for t in range(10):
        assert m.tick(now=float(t), signals={"mean_confidence": None}) == []


def test_schedules() -> None:
    assert cron_matches("0 3 * * *", dt.datetime(2026, 1, 5, 3, 0))
    assert not cron_matches("0 3 * * *", dt.datetime(2026, 1, 5, 4, 0))
    assert cron_matches("*/15 * * * 1-5", dt.datetime(2026, 1, 5, 10, 30))  # a Monday
    cfg = MonitorConfig(schedule_interval_s=60)
    assert schedule_due(cfg, None, 0) and not schedule_due(cfg, 0, 30) and schedule_due(cfg, 0, 61)


def _registry_with_a_promoted_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SQLite registry whose newest version a job tagged "promoted"."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("segloop-pets")
    mv = client.create_model_version("segloop-pets", source=(tmp_path / "model").as_uri())
    client.set_model_version_tag("segloop-pets", mv.version, "segloop.decision", "promoted")


def test_a_decision_mlflow_cannot_give_yet_is_read_on_a_later_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A succeeded job's decision is never dropped when MLflow fails once (locked file, server blip)."""

    from tests.conftest import free_port

    m = make(tmp_path)
    m.state["jobs"].append({"id": "raysubmit_1", "status": "SUCCEEDED", "decision_recorded": False})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert m.record_pending_decisions() == []
    assert m.state["jobs"][0]["decision_recorded"] is False and m.state["totals"]["decisions"] == {}

    _registry_with_a_promoted_version(tmp_path, monkeypatch)
    acts = m.record_pending_decisions()
    assert [a["decision"] for a in acts] == ["promoted"] and m.state["jobs"][0]["decision_recorded"] is True
    assert m.state["totals"]["decisions"] == {"promoted": 1}
    assert m.record_pending_decisions() == []  # read once


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"schedule_cron": "0 3 * *"}, "must have 5 fields"),
        ({"schedule_cron": "61 3 * * *"}, "minute field '61'"),
        ({"schedule_cron": "0 3 * * mon"}, "weekday field 'mon'"),
        ({"capture_on_alert": {"mode": "sometimes"}}, "mode"),
        ({"capture_on_alert": {"mode": "entropy", "threshold": 2}}, "threshold"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_monitor_config_is_refused_when_loaded(bad: dict, message: str) -> None:
    from segloop.config import validate
    from segloop.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(MonitorConfig, bad)


def test_train_config_is_checked_where_the_jobs_will_read_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitoring.actor import resolve_train_config
    from segloop.errors import ConfigError

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pets.yaml").write_text("epochs: 1\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_train_config(MonitorConfig()).train_config == str(tmp_path / "configs" / "pets.yaml")
    kept = MonitorConfig(job_working_dir=str(tmp_path))  # read inside the uploaded directory
    assert resolve_train_config(kept).train_config == "configs/pets.yaml"
    with pytest.raises(ConfigError, match="not found relative to"):
        resolve_train_config(MonitorConfig(train_config="configs/nope.yaml"))
    with pytest.raises(ConfigError, match="inside job_working_dir"):
        resolve_train_config(MonitorConfig(train_config="nope.yaml", job_working_dir=str(tmp_path)))


def test_capture_returns_to_its_baseline_when_the_alert_resolves_and_after_a_promotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    m = make(tmp_path)
    low, good = {"mean_confidence": 0.4}, {"mean_confidence": 0.9}
    m.tick(now=0.0, signals=low)
    m.tick(now=3.0, signals=low)
    assert read_policy(m.store).mode == "entropy"
    acts = m.tick(now=5.0, signals=good)
    assert [a.get("reason") for a in acts if a["action"] == "capture"] == ["alert low_confidence resolved"]
    assert read_policy(m.store).mode == "off"

    m.switch_capture({"mode": "entropy", "threshold": 0.3}, reason="by hand")
    _registry_with_a_promoted_version(tmp_path, monkeypatch)
    decision = m.record_decision({"id": "raysubmit_1"}, now=10.0)
    assert decision["capture"]["ok"] and read_policy(m.store).mode == "off"

    # re-calibrated for the new champion: its mean entropy over one rule window is the new threshold
    served = {"mean_confidence": 0.9, "mean_entropy": 0.21}
    assert not [a for a in m.tick(now=15.0, signals=served) if a["action"] == "recalibrated"]  # window not over
    assert [a for a in m.tick(now=21.0, signals=served) if a["action"] == "recalibrated"][0]["threshold"] == 0.21
    m.tick(now=200.0, signals=low)  # after the rule's cooldown, drift again
    m.tick(now=203.0, signals=low)
    assert read_policy(m.store).mode == "entropy" and read_policy(m.store).threshold == 0.21
