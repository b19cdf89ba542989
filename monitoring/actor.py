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
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from monitoring.rules import DEFAULT_RULES, RuleConfig, RuleEngine

log = logging.getLogger("segloop.monitor")

ACTOR_NAME = "segloop-monitor"
NAMESPACE = "segloop"
STATE_KEY = "monitor/state.json"


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
    # retraining
    dataset_name: str = "pets"
    min_new_samples: int = Field(20, ge=1)
    schedule_interval_s: Optional[float] = Field(None, gt=0, description="retrain every N seconds regardless")
    schedule_cron: Optional[str] = Field(None, description="retrain on a cron schedule, e.g. '0 3 * * *'")
    train_config: str = Field("configs/pets.yaml", description="config file the retraining job uses")
    train_overrides: list[str] = Field(default_factory=list)
    job_working_dir: Optional[str] = Field(
        None, description="upload this dir with the job (cluster without segloop installed)"
    )
    dashboard_url: Optional[str] = Field(None, description="Ray dashboard (Jobs API); default: this cluster's")
    registered_model: str = "segloop-pets"
    switch_serve: bool = Field(False, description="pin Serve to the new champion; off when replicas follow the alias")
    data_dir: str = ".segloop"
    store: Optional[dict] = Field(None, description="dataplane.store.StoreConfig; default: SEGLOOP_STORE / local")


# ----------------------------------------------------------------------------- schedule
def cron_matches(expr: str, t: dt.datetime) -> bool:
    """Minimal 5-field cron (minute hour day-of-month month day-of-week): ``*``, lists, ranges, steps."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expr!r} must have 5 fields (minute hour day month weekday)")
    values = (t.minute, t.hour, t.day, t.month, (t.weekday() + 1) % 7)
    bounds = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
    return all(_cron_field(f, v, lo, hi) for f, v, (lo, hi) in zip(fields, values, bounds))


def _cron_field(field: str, value: int, lo: int, hi: int) -> bool:
    for part in field.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
        if a <= value <= b and (value - a) % int(step or 1) == 0:
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
        self._metrics.publish(self.state["totals"])
        self._running = False

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
        now = time.time() if now is None else now
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
                actions.append(self.switch_capture(self.cfg.capture_on_alert, reason=f"alert {e['rule']}"))
        actions += self.follow_jobs(now)
        actions += self.record_pending_decisions()
        if not self.active_job():
            actions += self.maybe_retrain(now)
        self.state["engine"] = self.engine.to_dict()
        self.save()
        self._metrics.publish(self.state["totals"])  # every tick: Ray drops gauges that are not re-set
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

    # -- retraining
    def active_job(self) -> dict | None:
        return next((j for j in self.state["jobs"] if j["status"] in ("PENDING", "RUNNING", "SUBMITTED")), None)

    def maybe_retrain(self, now: float) -> list[dict]:
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
        reason = None
        if latest.version != trained["version"] and samples - trained["samples"] >= self.cfg.min_new_samples:
            reason = f"dataset {latest.version} has {samples - trained['samples']} new samples (>= {self.cfg.min_new_samples})"
        elif schedule_due(self.cfg, self.state.get("schedule_fired"), now):
            self.state["schedule_fired"] = now
            reason = "schedule"
        if reason is None:
            return []
        return [self.submit(latest.version, samples, reason)]

    def submit(self, version: str, samples: int, reason: str) -> dict:
        client = self._jobs()
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
        runtime_env: dict[str, Any] = {"env_vars": _forwarded_env()}
        if self.cfg.job_working_dir:
            runtime_env["working_dir"] = self.cfg.job_working_dir
        job_id = client.submit_job(
            entrypoint=" ".join(_quote(c) for c in cmd),
            runtime_env=runtime_env,
            metadata={"segloop.reason": reason[:200], "segloop.dataset_version": version},
        )
        job = {
            "id": job_id,
            "status": "SUBMITTED",
            "dataset_version": version,
            "samples": samples,
            "reason": reason,
            "submitted": time.time(),
        }
        self.state["jobs"].append(job)
        self._count("jobs", "submitted")
        self.save()
        return {"action": "retrain", **job}

    def follow_jobs(self, now: float) -> list[dict]:
        job = self.active_job()
        if job is None:
            return []
        status = str(self._jobs().get_job_status(job["id"]).value)
        if status in ("PENDING", "RUNNING"):
            job["status"] = status
            return []
        job["status"], job["ended"] = status, now
        self._count("jobs", "succeeded" if status == "SUCCEEDED" else "failed")
        actions: list[dict] = [{"action": "job_ended", "id": job["id"], "status": status}]
        if status == "SUCCEEDED":
            self.state["trained"] = {"version": job["dataset_version"], "samples": job["samples"]}
            job["decision_recorded"] = False
        return actions

    def record_pending_decisions(self) -> list[dict]:
        """Read the decision of every succeeded job not read yet; an MLflow error (a locked SQLite
        file, a server blip) is logged and retried on the next tick, never dropped."""
        actions = []
        for job in self.state["jobs"]:
            if job.get("decision_recorded") is not False:
                continue
            try:
                actions.append(self.record_decision(job))
            except Exception as err:  # noqa: BLE001 - retried next tick; the job itself succeeded
                log.warning("cannot read job %s's decision yet: %s: %s", job["id"], type(err).__name__, err)
                continue
            job["decision_recorded"] = True
        return actions

    def record_decision(self, job: dict) -> dict:
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
        self._metrics.publish(self.state["totals"])

    def save(self) -> None:
        for key in ("events", "decisions", "jobs"):
            self.state[key] = self.state[key][-200:]
        self.store.put_json(STATE_KEY, self.state)

    def status(self) -> dict[str, Any]:
        return {
            "firing": self.engine.firing(),
            **{k: self.state[k] for k in ("trained", "capture")},
            "jobs": self.state["jobs"][-5:],
            "decisions": self.state["decisions"][-5:],
        }

    async def run(self) -> None:
        """The actor's loop; ``tick`` work is blocking, so it runs in a thread."""
        import asyncio

        self._running = True
        while self._running:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("monitor tick failed")
            await asyncio.sleep(self.cfg.interval_s)

    def stop(self) -> None:
        self._running = False


class _Metrics:
    """The actor's decisions as Ray gauges holding running totals (kept in the persisted state).

    Gauges, not counters: every known series exists at 0 from the actor's start, so the first
    job or promotion shows as a step (Prometheus never sees a counter's first increment, and
    Ray cannot export a counter at 0); a restarted actor continues from the stored totals.
    Several actor incarnations may export the same total, so dashboards take ``max by``.
    Ray forgets a gauge value that is not set again within a metrics report period (10 s), so
    ``publish`` runs on every tick.
    """

    JOB_STATUSES = ("submitted", "succeeded", "failed")
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
        except Exception:  # noqa: BLE001 - outside a Ray worker (unit tests): no metrics
            self._alerts = self._jobs = self._promos = None

    def publish(self, totals: dict[str, dict[str, int]]) -> None:
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


def _dashboard_url() -> str:
    import ray

    ctx = ray.get_runtime_context()
    url = getattr(ctx, "dashboard_url", None) or ray._private.worker.global_worker.node.webui_url
    return url if url.startswith("http") else f"http://{url}"


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
def start(config: dict[str, Any], restart: bool = False) -> Any:
    """Start (or find) the detached named actor and its loop; returns the handle.

    On a multi-node cluster a local-directory store is refused here, before the actor starts
    (its state, the capture policy and the dataset versions must be where every node looks).
    """
    import ray

    from dataplane.store import StoreConfig
    from segloop.settings import require_shared_services, store_config

    cfg = MonitorConfig.model_validate(config)
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
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", runtime_env={"env_vars": _forwarded_env()}
    ).remote(config)
    handle.run.remote()
    return handle


class MonitorActor(Monitor):
    """The Ray actor class (async so ``status``/``tick`` answer while ``run`` loops)."""

    async def run(self) -> None:  # type: ignore[override]
        await Monitor.run(self)

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
