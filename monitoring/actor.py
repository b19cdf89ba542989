"""The monitoring actor: watch the serving signals, react, retrain, promote, switch.

A detached, named Ray actor (``segloop-monitor``). Every ``interval_s`` it

1. reads the signals — from Prometheus (``prometheus_url``) or straight from Ray's
   metrics endpoints — and evaluates the alert rules (``monitoring.rules``: windows,
   ``for``, hysteresis, cooldown, so one incident triggers one response);
2. on a firing alert switches capture on in the Serve app (no redeploy);
3. when the newest dataset version holds ``min_new_samples`` more samples than the one
   last trained on, or the schedule fires, submits ``python -m train`` on that version as
   a Ray job (``JobSubmissionClient``; works with Ray's token authentication);
4. follows the job; when it ends, reads the champion/challenger decision the job wrote
   to the registry and, if the champion changed, moves the Serve app to it in place.

State (rule states, trained version, jobs, decisions) lives in the object store under
``monitor/state.json`` and is reloaded on start, so a restarted actor neither re-fires
an alert nor re-submits a job. Start it with ``segloop monitor start --config configs/monitor.yaml``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from monitoring.rules import DEFAULT_RULES, RuleConfig, RuleEngine

log = logging.getLogger("segloop.monitor")

ACTOR_NAME = "segloop-monitor"
ACTIVE = ("SUBMITTED", "PENDING", "RUNNING")
NAMESPACE = "segloop"
STATE_KEY = "monitor/state.json"


class LabelStudioSource(BaseModel):
    """A Label Studio project whose finished annotations count as new samples (``queue push`` fills it)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="the Label Studio server; API key from LABEL_STUDIO_API_KEY in the actor's env")
    project: str = Field(min_length=3, description="the project's title")
    split: Optional[str] = Field(None, description="the split pulled annotations go to (default train/trainval)")
    interval_s: float = Field(30.0, gt=0, description="how often the project is read")


class MonitorConfig(BaseModel):
    """Everything the monitoring actor needs (YAML + key=value overrides)."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(5.0, gt=0)
    prometheus_url: Optional[str] = Field(None, description="read signals from Prometheus; else from Ray directly")
    metrics_urls: list[str] = Field(default_factory=list, description="Ray metrics endpoints (default: every node's)")
    rules: list[RuleConfig] = Field(default_factory=lambda: list(DEFAULT_RULES))
    # capture switched on by an alert
    app_name: str = "segloop"
    capture_on_alert: dict = Field(default_factory=lambda: {"mode": "entropy", "threshold": 0.3})
    capture_baseline: dict = Field(
        default_factory=lambda: {"mode": "off"},
        description="the policy capture returns to when no alert fires any more, and after a promotion",
    )
    recalibrate_capture: bool = Field(
        True,
        description="after a promotion, capture_on_alert's entropy threshold becomes the new champion's mean "
        "entropy over the rules' window (it was calibrated on the old champion)",
    )
    capture_retention_days: Optional[float] = Field(
        30.0, ge=1, description="once a day, delete captures older than this that no export or version uses"
    )
    # retraining
    dataset_name: str = "pets"
    min_new_samples: int = Field(20, ge=1)
    label_studio: Optional[LabelStudioSource] = Field(
        None,
        description="when min_new_samples annotations not in the dataset are finished in this project, pull "
        "them into a new version (which then triggers retraining)",
    )
    schedule_interval_s: Optional[float] = Field(None, gt=0, description="retrain every N seconds regardless")
    schedule_cron: Optional[str] = Field(None, description="retrain on a cron schedule, e.g. '0 3 * * *'")
    train_config: str = Field("configs/pets.yaml", description="config file the retraining job uses")
    train_overrides: list[str] = Field(default_factory=list)
    job_working_dir: Optional[str] = Field(
        None, description="upload this dir with the job (cluster without segloop installed)"
    )
    max_attempts: int = Field(3, ge=1, description="retraining attempts per dataset version, then an alert")
    retry_backoff_s: float = Field(60.0, gt=0, description="wait after a failed job; doubles with each failure")
    retry_backoff_max_s: float = Field(3600.0, gt=0)
    job_timeout_s: float = Field(6 * 3600.0, gt=0, description="a retraining job running longer is stopped")
    dashboard_url: Optional[str] = Field(None, description="Ray dashboard (Jobs API); default: this cluster's")
    registered_model: str = "segloop-pets"
    switch_serve: bool = Field(False, description="pin Serve to the new champion; off when replicas follow the alias")
    data_dir: str = ".segloop"
    store: Optional[dict] = Field(None, description="dataplane.store.StoreConfig; default: SEGLOOP_STORE / local")

    @field_validator("schedule_cron")
    @classmethod
    def _cron(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            check_cron(v)
        return v

    @field_validator("capture_on_alert", "capture_baseline")
    @classmethod
    def _policy(cls, v: dict) -> dict:
        from dataplane.capture import parse_policy

        return parse_policy(v).model_dump()


# ----------------------------------------------------------------------------- schedule
def cron_matches(expr: str, t: dt.datetime) -> bool:
    """Minimal 5-field cron (minute hour day-of-month month day-of-week): ``*``, lists, ranges, steps."""
    check_cron(expr)
    fields = expr.split()
    values = (t.minute, t.hour, t.day, t.month, (t.weekday() + 1) % 7)
    bounds = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
    return all(_cron_field(f, v, lo, hi) for f, v, (lo, hi) in zip(fields, values, bounds))


CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("weekday", 0, 6))


def check_cron(expr: str) -> None:
    """Raise ValueError naming the first bad field (checked when the config loads, not at 3 a.m.)."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expr!r} must have 5 fields (minute hour day month weekday)")
    for field, (what, lo, hi) in zip(fields, CRON_FIELDS):
        for part in field.split(","):
            try:
                a, b, step = _cron_range(part, lo, hi)
            except ValueError:
                a, b, step = -1, -1, 0
            if not (lo <= a <= b <= hi and step >= 1):
                raise ValueError(
                    f"cron expression {expr!r}: {what} field {part!r} is not *, N, N-M or */S with N, M in {lo}-{hi}"
                )


def _cron_range(part: str, lo: int, hi: int) -> tuple[int, int, int]:
    rng, _, step = part.partition("/")
    if rng == "*":
        a, b = lo, hi
    elif "-" in rng:
        a, b = (int(x) for x in rng.split("-", 1))
    else:
        a = b = int(rng)
    return a, b, int(step or 1)


def _cron_field(field: str, value: int, lo: int, hi: int) -> bool:
    for part in field.split(","):
        a, b, step = _cron_range(part, lo, hi)
        if a <= value <= b and (value - a) % step == 0:
            return True
    return False


def schedule_due(cfg: MonitorConfig, last_fire: float | None, now: float) -> bool:
    """Interval: due when ``schedule_interval_s`` passed; cron: due once in a matching minute."""
    if cfg.schedule_interval_s is not None:
        return last_fire is None or now - last_fire >= cfg.schedule_interval_s
    if cfg.schedule_cron:
        t = dt.datetime.fromtimestamp(now)
        fired_this_minute = last_fire is not None and int(last_fire // 60) == int(now // 60)
        return cron_matches(cfg.schedule_cron, t) and not fired_this_minute
    return False


# ----------------------------------------------------------------------------- the loop
def sample_count(manifest: Any) -> int:
    return sum(len(v) for v in manifest.splits.values())


class Monitor:
    """The actor's body; plain Python so the decision logic is testable without Ray."""

    def __init__(self, config: dict[str, Any]) -> None:
        from dataplane.store import open_store
        from segloop.settings import store_config_dict

        self.cfg = MonitorConfig.model_validate(config)
        self.store = open_store(self.cfg.store or store_config_dict(self.cfg.data_dir))
        self.state: dict[str, Any] = {
            "engine": None,
            "trained": None,
            "jobs": [],
            "decisions": [],
            "events": [],
            "schedule_fired": None,
            "capture": None,
            "attempts": {},
            "retrain_blocked": None,
            "last_tick": None,
            "calibrate_at": None,
            "alert_threshold": None,
            "totals": {"alerts": {}, "jobs": {}, "decisions": {}},
        }
        if self.store.exists(STATE_KEY):
            self.state.update(self.store.get_json(STATE_KEY))
        self.engine = (
            RuleEngine.from_dict(self.state["engine"], self.cfg.rules)
            if self.state["engine"]
            else RuleEngine(self.cfg.rules)
        )
        self._reader = None
        self._metrics = _Metrics(self.cfg.rules)
        self._tick_lock = threading.Lock()
        self._stopped = threading.Event()
        self.publish()

    # -- signals
    def read_signals(self) -> dict[str, float | None]:
        from monitoring import signals

        window = max(r.window_s for r in self.cfg.rules)
        if self.cfg.prometheus_url:
            return signals.query_prometheus(self.cfg.prometheus_url, window)
        if self._reader is None:
            self._reader = signals.RayMetricsReader(self.cfg.metrics_urls or signals.ray_metrics_urls(), window)
        return self._reader.read()

    # -- one tick
    def tick(self, now: float | None = None, signals: dict[str, float | None] | None = None) -> list[dict]:
        """Evaluate once; returns the actions taken (also kept in the persisted state)."""
        with self._tick_lock:  # the loop's tick and a `tick_now` call never interleave
            return self._tick(time.time() if now is None else now, signals)

    def _tick(self, now: float, signals: dict[str, float | None] | None) -> list[dict]:
        actions: list[dict] = []
        if signals is None:
            try:
                signals = self.read_signals()
            except Exception as err:  # noqa: BLE001 - signals unavailable: never act on missing data
                log.warning("signals unavailable: %s", err)
                signals = {}
        for ev in self.engine.evaluate(signals, now):
            e = ev.to_dict()
            self.state["events"].append(e)
            self._count("alerts", f"{e['rule']}|{e['state']}")
            actions.append({"action": "alert", **e})
            if e["state"] == "firing":
                actions.append(self.switch_capture(self.alert_policy(), reason=f"alert {e['rule']}"))
            elif e["state"] == "resolved" and not self.engine.firing():
                actions.append(self.switch_capture(self.cfg.capture_baseline, reason=f"alert {e['rule']} resolved"))
        actions.append(self.maybe_recalibrate(now, signals))
        actions += self.follow_jobs(now)
        actions += self.record_pending_decisions(now)
        if not self.active_job():
            actions.append(self.maybe_pull(now))
            actions += self.maybe_retrain(now)
        actions.append(self.maybe_prune(now))
        self.state["engine"] = self.engine.to_dict()
        self.state["last_tick"] = time.time()
        self.save()
        self.publish()  # every tick: Ray drops gauges that are not re-set
        return [a for a in actions if a]

    def switch_capture(self, policy: dict, reason: str) -> dict:
        from dataplane.capture import write_policy

        if self.state.get("capture") == policy:
            return {}
        try:
            write_policy(self.store, policy)
        except Exception as err:  # noqa: BLE001 - reported as the action's outcome; retried on the next alert
            return {"action": "capture", "ok": False, "error": str(err)}
        self.state["capture"] = policy
        return {"action": "capture", "ok": True, "policy": policy, "reason": reason}

    def alert_policy(self) -> dict:
        """``capture_on_alert``, with the entropy threshold measured on the current champion if known."""
        policy = dict(self.cfg.capture_on_alert)
        if policy.get("mode") == "entropy" and self.state.get("alert_threshold") is not None:
            policy["threshold"] = self.state["alert_threshold"]
        return policy

    def maybe_recalibrate(self, now: float, signals: dict[str, float | None]) -> dict:
        """Once a promoted champion has served a full window, its mean entropy is the new threshold."""
        due = self.state.get("calibrate_at")
        entropy = signals.get("mean_entropy")
        if due is None or now < due or entropy is None:
            return {}
        self.state["alert_threshold"], self.state["calibrate_at"] = round(float(entropy), 4), None
        return {"action": "recalibrated", "threshold": self.state["alert_threshold"]}

    def maybe_prune(self, now: float) -> dict:
        """Apply the captures' retention rule once a day (a store error: tried again next tick)."""
        from dataplane.retention import prune_captures

        days = self.cfg.capture_retention_days
        if days is None or now - (self.state.get("pruned") or 0.0) < 86400:
            return {}
        try:
            result = prune_captures(self.store, days)
        except Exception as err:  # noqa: BLE001 - reported; retention can wait a tick
            log.warning("capture retention failed: %s: %s", type(err).__name__, err)
            return {}
        self.state["pruned"] = now
        totals = self.state["totals"]
        totals["captures_pruned"] = totals.get("captures_pruned", 0) + len(result.deleted)
        return {"action": "retention", "deleted": len(result.deleted), "kept_in_use": result.kept_in_use}

    def maybe_pull(self, now: float) -> dict:
        """Pull the Label Studio project's finished annotations into a new dataset version once
        ``min_new_samples`` of them are not in the dataset (an error: reported, tried again later)."""
        from dataplane.annotation.ls_project import LabelStudioTarget, pull

        src = self.cfg.label_studio
        seen = self.state.get("label_studio") or {}
        if src is None or now - seen.get("checked", 0.0) < src.interval_s:
            return {}
        seen = {**seen, "checked": now}
        self.state["label_studio"] = seen
        try:
            target = LabelStudioTarget(src.url, src.project)
            manifest, status = pull(
                self.store, target, self.cfg.dataset_name, split=src.split, min_finished=self.cfg.min_new_samples
            )
        except Exception as err:  # noqa: BLE001 - a malformed annotation or an outage: said once, retried
            msg = f"{type(err).__name__}: {err}"
            if seen.get("error") != msg:
                log.warning("cannot pull from Label Studio project %r: %s", src.project, msg)
            self.state["label_studio"] = {**seen, "error": msg}
            return {}
        self.state["label_studio"] = {**seen, "error": None, "finished": status.finished, "waiting": status.waiting}
        if manifest is None:
            return {}
        added = len(manifest.notes.get("import", {}).get("captures", []))
        return {"action": "pull", "version": manifest.version, "samples": added, "project": status.project_id}

    # -- retraining
    def active_job(self) -> dict | None:
        return next((j for j in self.state["jobs"] if j["status"] in ACTIVE), None)

    def maybe_retrain(self, now: float) -> list[dict]:
        """Submit a job when the newest version has enough new samples or the schedule is due,
        unless that version's failed attempts are backing off or used up."""
        from dataplane.versions import latest_version
        from segloop.errors import DatasetError

        try:
            latest = latest_version(self.store, self.cfg.dataset_name)
        except DatasetError as err:  # nothing versioned yet
            log.info("no dataset version yet: %s", err)
            return []
        except Exception as err:  # noqa: BLE001 - a store outage or a corrupt manifest: say so, try next tick
            log.warning("cannot read dataset %r: %s: %s", self.cfg.dataset_name, type(err).__name__, err)
            return []
        samples = sample_count(latest)
        trained = self.state.get("trained")
        if trained is None:  # the serving model was trained on what exists now
            self.state["trained"] = {"version": latest.version, "samples": samples}
            return []
        self.state["retrain_blocked"] = latest.version if self._exhausted(latest.version) else None
        reason = None
        if latest.version != trained["version"] and samples - trained["samples"] >= self.cfg.min_new_samples:
            reason = f"dataset {latest.version} has {samples - trained['samples']} new samples (>= {self.cfg.min_new_samples})"
        elif schedule_due(self.cfg, self.state.get("schedule_fired"), now):
            reason = "schedule"
        if reason is None or self.state["retrain_blocked"] or now < self._retry_at(latest.version):
            return []
        if reason == "schedule":
            self.state["schedule_fired"] = now
        return [self.submit(latest.version, samples, reason, now)]

    def _attempts(self, version: str) -> dict[str, Any]:
        return self.state["attempts"].get(version) or {"failures": 0, "last_end": 0.0, "trigger": 0}

    def _exhausted(self, version: str) -> bool:
        return self._attempts(version)["failures"] >= self.cfg.max_attempts

    def _retry_at(self, version: str) -> float:
        """When the next attempt on ``version`` may start: exponential backoff after failures."""
        a = self._attempts(version)
        if not a["failures"]:
            return 0.0
        wait = min(self.cfg.retry_backoff_s * 2 ** (a["failures"] - 1), self.cfg.retry_backoff_max_s)
        return a["last_end"] + wait

    def submit(self, version: str, samples: int, reason: str, now: float | None = None) -> dict:
        """Submit ``python -m train`` on ``version`` under an id that names the attempt, so a
        monitor that dies between submitting and saving adopts its job instead of submitting twice."""
        a = self._attempts(version)
        trigger = a["trigger"] + (reason == "schedule")  # a schedule re-trains a version it has trained
        submission_id = f"segloop-retrain-{version}-{trigger}-{a['failures'] + 1}"
        try:
            job_id = self._jobs().submit_job(
                entrypoint=self._entrypoint(version),
                submission_id=submission_id,
                runtime_env=self._runtime_env(),
                metadata={"segloop.reason": reason[:200], "segloop.dataset_version": version},
            )
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise
            job_id = submission_id  # submitted by this monitor before a restart: follow it
        self.state["attempts"][version] = {**a, "trigger": trigger}
        job = {
            "id": job_id,
            "status": "SUBMITTED",
            "dataset_version": version,
            "samples": samples,
            "reason": reason,
            "attempt": a["failures"] + 1,
            "submitted": time.time() if now is None else now,
        }
        self.state["jobs"].append(job)
        self._count("jobs", "submitted")
        self.save()
        return {"action": "retrain", **job}

    def _entrypoint(self, version: str) -> str:
        cmd = [
            sys.executable,
            "-m",
            "train",
            "--config",
            self.cfg.train_config,
            f"dataset_version={version}",
            f"dataset_name={self.cfg.dataset_name}",
            f"registered_model={self.cfg.registered_model}",
            f"data_dir={os.path.abspath(self.cfg.data_dir)}",
            *self.cfg.train_overrides,
        ]
        return " ".join(_quote(c) for c in cmd)

    def _runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {"env_vars": _forwarded_env()}
        if self.cfg.job_working_dir:
            env["working_dir"] = self.cfg.job_working_dir
        return env

    def follow_jobs(self, now: float) -> list[dict]:
        """Poll the active job; a job past its deadline is stopped, one the cluster forgot released."""
        job = self.active_job()
        if job is None:
            return []
        try:
            status = str(self._jobs().get_job_status(job["id"]).value)
        except Exception as err:  # noqa: BLE001 - the Jobs API is down: try again next tick
            if "status code 404" not in str(err):
                log.warning("cannot read job %s: %s: %s", job["id"], type(err).__name__, err)
                return []
            status = "LOST"  # a restarted head forgot it: release it, count it as a failed attempt
        if status in ("PENDING", "RUNNING"):
            job["status"] = status
            if now - job["submitted"] <= self.cfg.job_timeout_s:
                return []
            status = "TIMED_OUT"
            try:
                self._jobs().stop_job(job["id"])
            except Exception as err:  # noqa: BLE001 - reported; the job is released either way
                log.warning("cannot stop job %s past its deadline: %s", job["id"], err)
        return self.job_ended(job, status, now)

    def job_ended(self, job: dict, status: str, now: float) -> list[dict]:
        job["status"], job["ended"] = status, now
        self._count("jobs", status.lower())
        actions: list[dict] = [{"action": "job_ended", "id": job["id"], "status": status}]
        version = job["dataset_version"]
        if status == "SUCCEEDED":
            self.state["trained"] = {"version": version, "samples": job["samples"]}
            self.state["attempts"][version] = {**self._attempts(version), "failures": 0}
            job["decision_recorded"] = False
            return actions
        a = self._attempts(version)
        self.state["attempts"][version] = {**a, "failures": a["failures"] + 1, "last_end": now}
        if self._exhausted(version):
            self._count("jobs", "exhausted")
            self.state["retrain_blocked"] = version
            actions.append({"action": "retrain_exhausted", "dataset_version": version, "attempts": a["failures"] + 1})
            log.error("retraining on %s failed %d times: no more attempts on it", version, a["failures"] + 1)
        else:
            retry = self._retry_at(version)
            actions.append({"action": "retry_scheduled", "dataset_version": version, "at": retry})
        return actions

    def record_pending_decisions(self, now: float | None = None) -> list[dict]:
        """Read the decision of every succeeded job not read yet; an MLflow error (a locked SQLite
        file, a server blip) is logged and retried on the next tick, never dropped."""
        actions = []
        for job in self.state["jobs"]:
            if job.get("decision_recorded") is not False:
                continue
            try:
                actions.append(self.record_decision(job, now))
            except Exception as err:  # noqa: BLE001 - retried next tick; the job itself succeeded
                log.warning("cannot read job %s's decision yet: %s: %s", job["id"], type(err).__name__, err)
                continue
            job["decision_recorded"] = True
        return actions

    def record_decision(self, job: dict, now: float | None = None) -> dict:
        """Read what the job decided (registry tags) and move Serve to a new champion."""
        import mlflow

        from train import registry, tracking

        mlflow.set_tracking_uri(tracking.tracking_uri(self.cfg.data_dir))
        client = mlflow.MlflowClient()
        versions = client.search_model_versions(
            f"name='{self.cfg.registered_model}'", order_by=["version_number DESC"], max_results=1
        )
        if not versions:
            return {"action": "decision", "error": "no model version found"}
        mv = versions[0]
        decision = {
            "job": job["id"],
            "version": mv.version,
            "decision": mv.tags.get("segloop.decision", "unknown"),
            "reason": mv.tags.get("segloop.reason", ""),
            "time": time.time(),
        }
        self.state["decisions"].append(decision)
        self._count("decisions", decision["decision"])
        if decision["decision"] == "promoted":  # the alert's thresholds were calibrated on the old champion
            decision["capture"] = self.switch_capture(self.cfg.capture_baseline, reason=f"new champion v{mv.version}")
            if self.cfg.recalibrate_capture:
                window = max((r.window_s for r in self.cfg.rules), default=0.0)
                self.state["calibrate_at"] = (time.time() if now is None else now) + window
        champion = registry.champion_version(self.cfg.registered_model)
        if self.cfg.switch_serve and champion and decision["decision"] == "promoted":
            from monitoring.serving import redeploy_with_version

            try:
                decision["serving"] = redeploy_with_version(self.cfg.registered_model, champion, self.cfg.app_name)
            except Exception as err:  # noqa: BLE001 - the decision stands; the switch error is reported with it
                decision["serve_error"] = str(err)
        return {"action": "decision", **decision}

    def _jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.cfg.dashboard_url or _dashboard_url())

    # -- state
    def _count(self, kind: str, key: str) -> None:
        totals = self.state["totals"][kind]
        totals[key] = totals.get(key, 0) + 1
        self.publish()

    def publish(self) -> None:
        self._metrics.publish(self.state["totals"], self.state["last_tick"], self.state["retrain_blocked"])

    def save(self) -> None:
        for key in ("events", "decisions", "jobs"):
            self.state[key] = self.state[key][-200:]
        attempts = self.state["attempts"]
        self.state["attempts"] = dict(list(attempts.items())[-50:])
        self.store.put_json(STATE_KEY, self.state)

    def status(self) -> dict[str, Any]:
        return {
            "firing": self.engine.firing(),
            **{k: self.state[k] for k in ("trained", "capture", "alert_threshold", "last_tick", "retrain_blocked")},
            "jobs": self.state["jobs"][-5:],
            "decisions": self.state["decisions"][-5:],
            "totals": self.state["totals"],
            "label_studio": self.state.get("label_studio"),
        }

    def run_forever(self) -> None:
        """Tick every ``interval_s`` until :meth:`stop`; a failing tick is logged, never fatal."""
        while not self._stopped.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("monitor tick failed")
            self._stopped.wait(self.cfg.interval_s)

    def stop(self) -> None:
        self._stopped.set()


class _Metrics:
    """The actor's decisions as Ray gauges holding running totals (kept in the persisted state).

    Gauges, not counters: every known series exists at 0 from the actor's start, so the first
    job or promotion shows as a step (Prometheus never sees a counter's first increment, and
    Ray cannot export a counter at 0); a restarted actor continues from the stored totals.
    Several actor incarnations may export the same total, so dashboards take ``max by``.
    Ray forgets a gauge value that is not set again within a metrics report period (10 s), so
    ``publish`` runs on every tick.
    """

    JOB_STATUSES = ("submitted", "succeeded", "failed", "stopped", "lost", "timed_out", "exhausted")
    DECISIONS = ("promoted", "rejected")
    ALERT_STATES = ("firing", "resolved")

    def __init__(self, rules: list[RuleConfig]) -> None:
        self._rules = [r.name for r in rules]
        try:
            from ray.util.metrics import Gauge

            self._alerts = Gauge(
                "segloop_monitor_alerts", "alert state changes so far, by rule and state", tag_keys=("rule", "state")
            )
            self._jobs = Gauge("segloop_retrain_jobs", "retraining jobs so far, by status", tag_keys=("status",))
            self._promos = Gauge("segloop_promotions", "champion/challenger decisions so far", tag_keys=("decision",))
            self._tick = Gauge("segloop_monitor_last_tick_seconds", "unix time of the monitor's last completed tick")
            self._blocked = Gauge(
                "segloop_retrain_blocked", "1 while the newest dataset version has used up its retraining attempts"
            )
            self._pruned = Gauge("segloop_captures_pruned", "captures deleted by the retention rule so far")
        except Exception:  # noqa: BLE001 - outside a Ray worker (unit tests): no metrics
            self._alerts = self._jobs = self._promos = self._tick = self._blocked = self._pruned = None

    def publish(self, totals: dict[str, dict[str, int]], last_tick: float | None, blocked: str | None) -> None:
        if self._alerts is None:
            return
        alerts = {f"{r}|{s}": 0 for r in self._rules for s in self.ALERT_STATES} | totals["alerts"]
        for key, n in alerts.items():
            rule, _, state = key.partition("|")
            self._alerts.set(n, tags={"rule": rule, "state": state})
        for status, n in ({s: 0 for s in self.JOB_STATUSES} | totals["jobs"]).items():
            self._jobs.set(n, tags={"status": status})
        for decision, n in ({d: 0 for d in self.DECISIONS} | totals["decisions"]).items():
            self._promos.set(n, tags={"decision": decision})
        if last_tick is not None:
            self._tick.set(last_tick)
        self._blocked.set(1 if blocked else 0)
        self._pruned.set(totals.get("captures_pruned", 0))


def _dashboard_url() -> str:
    import ray

    ctx = ray.get_runtime_context()
    url = getattr(ctx, "dashboard_url", None) or ray._private.worker.global_worker.node.webui_url
    return url if url.startswith("http") else f"http://{url}"


def _label_studio_env() -> dict[str, str]:
    """The Label Studio API key, for the actor only (retraining jobs do not need it)."""
    key = os.environ.get("LABEL_STUDIO_API_KEY")
    return {"LABEL_STUDIO_API_KEY": key} if key else {}


def _forwarded_env() -> dict[str, str]:
    keys = (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "SEGLOOP_STORE",
        "SEGLOOP_S3_ENDPOINT",
        "SEGLOOP_S3_ACCESS_KEY",
        "SEGLOOP_S3_SECRET_KEY",
        "OMP_NUM_THREADS",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# ----------------------------------------------------------------------------- Ray actor + CLI
def resolve_train_config(cfg: MonitorConfig) -> MonitorConfig:
    """Check ``train_config`` where the jobs will read it, before the monitor starts.

    With ``job_working_dir`` a relative path is read inside that uploaded directory; without
    it the job runs in another process and directory, so a relative path becomes absolute here.
    """
    from segloop.errors import ConfigError

    path = Path(cfg.train_config).expanduser()
    if cfg.job_working_dir:
        workdir = Path(cfg.job_working_dir)
        if workdir.is_dir() and not path.is_absolute() and not (workdir / path).is_file():
            raise ConfigError(f"train_config {str(path)!r} is not a file inside job_working_dir {str(workdir)!r}")
        return cfg
    if path.is_absolute():
        return cfg
    if not path.is_file():
        raise ConfigError(
            f"train_config {str(path)!r} not found relative to {Path.cwd()}: give an absolute path, "
            "or set job_working_dir to the directory the jobs should upload"
        )
    return cfg.model_copy(update={"train_config": str(path.resolve())})


def start(config: dict[str, Any], restart: bool = False) -> Any:
    """Start (or find) the detached named actor and its loop; returns the handle.

    On a multi-node cluster a local-directory store is refused here, before the actor starts
    (its state, the capture policy and the dataset versions must be where every node looks).
    """
    import ray

    from dataplane.store import StoreConfig
    from segloop.settings import require_shared_services, store_config

    cfg = resolve_train_config(MonitorConfig.model_validate(config))
    config = cfg.model_dump(mode="json")
    store = StoreConfig.model_validate(cfg.store) if cfg.store else store_config(cfg.data_dir)
    require_shared_services(store=store, tracking=None, what="monitoring")
    try:
        handle = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        if not restart:
            return handle
        ray.kill(handle)
        time.sleep(1)
    except ValueError:
        pass
    # On the head node: it holds no CPUs and reaches the Jobs API where the dashboard is bound
    # (127.0.0.1 by default); it is restarted there when it dies.
    actor_cls = ray.remote(
        num_cpus=0,
        resources={"node:__internal_head__": 0.001},
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=4,
    )(MonitorActor)
    handle = actor_cls.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        runtime_env={"env_vars": {**_forwarded_env(), **_label_studio_env()}},
    ).remote(config)
    ray.get(handle.status.remote(), timeout=120)  # a constructor error (store unreachable) surfaces here
    return handle


class MonitorActor(Monitor):
    """The Ray actor: its loop starts in the constructor, so an actor Ray restarts after a
    crash (``max_restarts=-1``) reloads its state and ticks again without anyone calling it."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        threading.Thread(target=self.run_forever, name="segloop-monitor-loop", daemon=True).start()

    async def status(self) -> dict[str, Any]:  # type: ignore[override]
        return Monitor.status(self)

    async def tick_now(self, signals: dict | None = None, now: float | None = None) -> list[dict]:
        import asyncio

        return await asyncio.to_thread(self.tick, now, signals)

    async def stop(self) -> None:  # type: ignore[override]
        Monitor.stop(self)


def main(argv: list[str] | None = None) -> int:
    from segloop.config import load_config
    from segloop.errors import SegloopError, cli_error

    p = argparse.ArgumentParser(prog="segloop monitor", description="segloop's monitoring actor")
    p.add_argument("command", choices=["start", "status", "stop"])
    p.add_argument("--config", help="YAML with MonitorConfig keys")
    p.add_argument("--restart", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)  # overrides before or after --config
    import ray

    ctx = ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE)
    try:
        if args.command == "start":
            cfg = load_config(MonitorConfig, args.config, args.overrides)
            if cfg.dashboard_url is None and ctx.dashboard_url:  # the actor submits jobs here
                url = ctx.dashboard_url
                cfg.dashboard_url = url if url.startswith("http") else f"http://{url}"
            start(cfg.model_dump(mode="json"), restart=args.restart)
            print(f"monitor {ACTOR_NAME!r} running (namespace {NAMESPACE})")
        else:
            handle = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
            if args.command == "status":
                print(json.dumps(ray.get(handle.status.remote()), indent=2, default=str))
            else:
                ray.get(handle.stop.remote())
                ray.kill(handle)
                print("monitor stopped")
    except (SegloopError, ValueError) as err:
        return cli_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
