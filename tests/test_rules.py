"""monitoring.rules (the monitoring actor's rule engine) and monitoring.signals (where its inputs come from).

The engine runs on synthetic series; the signal readers run against real endpoints: a small static
metrics endpoint served here, a real Prometheus scraping it, and (slow) a real Ray cluster whose actor
emits the serving metrics, read directly and through Prometheus via Ray's service-discovery file.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from monitoring.metric_names import UNIT_BOUNDARIES
from monitoring.rules import DEFAULT_RULES, Event, RuleConfig, RuleEngine, parse_rules
from monitoring.signals import (
    KEYS,
    RayMetricsReader,
    SignalsUnavailable,
    parse_series,
    prom_duration,
    promql,
    query_prometheus,
    ray_metrics_urls,
)
from segloop.errors import ConfigError
from serve_app.imaging import STATUS
from serve_app.metrics import status_class
from tests.conftest import free_port
from tests.test_monitoring_config import ALERTS_YML, PROMETHEUS_YML, alert_rules, dashboard_queries, run_prometheus

LOW_CONF = RuleConfig(
    name="low_confidence",
    signal="mean_confidence",
    op="<",
    threshold=0.6,
    window_s=300,
    for_s=60,
    hysteresis=0.05,
    cooldown_s=0,
)


def run(
    engine: RuleEngine, values, start: float = 0.0, step: float = 10.0, signal: str = "mean_confidence"
) -> list[Event]:
    """Feed one value per step; returns all events."""
    events = []
    for i, v in enumerate(values):
        events += engine.evaluate({signal: v}, now=start + i * step)
    return events


def states(events: list[Event]) -> list[tuple[str, float]]:
    return [(e.state, e.time) for e in events]


# --- the rule engine ---------------------------------------------------------------------------


def test_fires_once_after_for_s():
    engine = RuleEngine([LOW_CONF])
    events = run(engine, [0.8, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    # breached from t=10; for_s=60 -> fires at t=70, and only once while it stays low
    assert states(events) == [("firing", 70.0)]
    ev = events[0]
    assert (ev.rule, ev.value, ev.signal, ev.threshold) == ("low_confidence", 0.5, "mean_confidence", 0.6)
    assert json.loads(json.dumps(ev.to_dict()))["state"] == "firing"
    assert engine.firing() == ["low_confidence"]


def test_for_s_must_hold_without_interruption():
    engine = RuleEngine([LOW_CONF])
    # 50 s low, one good reading, 50 s low again: the timer restarts, never reaches 60 s
    assert run(engine, [0.5] * 6 + [0.7] + [0.5] * 6) == []
    assert engine.state("low_confidence").state == "pending"
    # for_s=0 fires on the first breach
    eager = RuleEngine([LOW_CONF.model_copy(update={"for_s": 0})])
    assert states(run(eager, [0.7, 0.5])) == [("firing", 10.0)]


def test_hysteresis_prevents_flapping():
    engine = RuleEngine([LOW_CONF])
    hovering = [0.59, 0.61, 0.58, 0.64, 0.6, 0.62, 0.599, 0.649]
    events = run(engine, [0.5] * 7 + hovering * 3 + [0.66, 0.62, 0.7])
    assert states(events) == [("firing", 60.0), ("resolved", 310.0)]
    assert events[1].value == 0.66
    # Hovering inside the band without having fired never fires (0.6 is not < 0.6).
    assert run(RuleEngine([LOW_CONF]), [0.6, 0.61, 0.64, 0.649] * 10) == []
    # The same series without hysteresis flaps: that is what the band is for.
    flappy = RuleEngine([LOW_CONF.model_copy(update={"hysteresis": 0.0, "for_s": 0})])
    assert len(run(flappy, [0.5] + hovering * 3)) > 6


def test_cooldown_suppresses_refire_until_over():
    rule = LOW_CONF.model_copy(update={"for_s": 0, "cooldown_s": 100})
    engine = RuleEngine([rule])
    events = run(engine, [0.5, 0.7, 0.5, 0.5, 0.7, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    # fires at 0, resolves at 10, breaches again at 20 and 50: inside the cooldown, so it stays
    # pending (the good reading at 40 just resets it, silently) and fires once the cooldown is over
    assert states(events) == [("firing", 0.0), ("resolved", 10.0), ("firing", 100.0)]
    assert engine.evaluate({"mean_confidence": 0.5}, now=130.0) == []


def test_cooldown_counts_from_the_fire_not_the_resolve():
    rule = LOW_CONF.model_copy(update={"for_s": 0, "cooldown_s": 100})
    engine = RuleEngine([rule])
    events = run(engine, [0.5] * 10 + [0.7, 0.5])
    assert states(events) == [("firing", 0.0), ("resolved", 100.0), ("firing", 110.0)]


@pytest.mark.parametrize("missing", [None, math.nan, float("nan")])
def test_missing_data_never_fires(missing):
    engine = RuleEngine([LOW_CONF.model_copy(update={"for_s": 0})])
    assert run(engine, [missing] * 20) == []
    # a gap resets a pending rule: 50 s low, a gap, 50 s low -> not 60 s in a row
    engine = RuleEngine([LOW_CONF])
    assert run(engine, [0.5] * 6 + [missing] + [0.5] * 6) == []
    # a gap neither resolves nor re-fires a firing rule
    engine = RuleEngine([LOW_CONF])
    events = run(engine, [0.5] * 8 + [missing] * 10 + [0.5] * 5 + [0.7])
    assert states(events) == [("firing", 60.0), ("resolved", 230.0)]


def test_no_traffic_signals_from_reader_never_fire():
    engine = RuleEngine()  # the defaults, on all three signals
    no_traffic = {"mean_confidence": None, "mean_entropy": None, "error_rate": None, "requests": 0.0}
    for t in range(0, 3600, 15):
        assert engine.evaluate(no_traffic, now=1e9 + t) == []


def test_rules_are_independent_and_use_their_op():
    engine = RuleEngine()  # DEFAULT_RULES: for 120 s
    bad = {"mean_confidence": 0.9, "mean_entropy": 0.8, "error_rate": 0.2, "requests": 100.0}
    events = []
    for t in range(0, 200, 10):
        events += engine.evaluate(bad, now=float(t))
    assert sorted((e.rule, e.time) for e in events) == [("high_entropy", 120.0), ("high_error_rate", 120.0)]
    assert {e.severity for e in events} == {"warning", "critical"}
    assert engine.firing() == ["high_entropy", "high_error_rate"]


def test_restart_from_serialised_state_does_not_refire():
    engine = RuleEngine([LOW_CONF])
    run(engine, [0.5] * 10)  # fired at 60
    saved = json.loads(json.dumps(engine.to_dict()))  # what the actor persists
    restored = RuleEngine.from_dict(saved)
    assert restored.rules == engine.rules
    assert restored.firing() == ["low_confidence"]
    assert run(restored, [0.5] * 5, start=100) == []
    assert states(run(restored, [0.7], start=200)) == [("resolved", 200.0)]


def test_restart_keeps_pending_timer_and_cooldown():
    rule = LOW_CONF.model_copy(update={"cooldown_s": 1000})
    engine = RuleEngine([rule])
    run(engine, [0.5] * 4)  # pending since 0, last reading at 30
    restored = RuleEngine.from_dict(json.loads(json.dumps(engine.to_dict())))
    assert states(run(restored, [0.5] * 3, start=40)) == [("firing", 60.0)]  # not 100: timer kept
    run(restored, [0.7], start=70)  # resolved
    again = RuleEngine.from_dict(json.loads(json.dumps(restored.to_dict())))
    assert run(again, [0.5] * 20, start=80) == []  # still inside the cooldown after the restart
    assert states(run(again, [0.5], start=1060)) == [("firing", 1060.0)]


def test_restore_with_changed_rules_keeps_matching_state():
    engine = RuleEngine([LOW_CONF])
    run(engine, [0.5] * 10)
    new_rules = [LOW_CONF.model_copy(update={"threshold": 0.55}), DEFAULT_RULES[2]]
    restored = RuleEngine.from_dict(engine.to_dict(), rules=new_rules)
    assert restored.firing() == ["low_confidence"]
    assert restored.state("high_error_rate").state == "ok"


def test_bad_rule_configs_are_config_errors():
    good = LOW_CONF.model_dump()
    for bad, match in [
        ({**good, "op": ">="}, "op"),
        ({**good, "signal": "accuracy"}, "signal"),
        ({**good, "for_s": -1}, "for_s"),
        ({**good, "threshold": math.nan}, "threshold"),
        ({**good, "surprise": 1}, "surprise"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_rules([bad], source="monitor.yaml")
    with pytest.raises(ConfigError, match="duplicate rule names.*low_confidence"):
        parse_rules([good, good])
    with pytest.raises(ConfigError, match="version"):
        RuleEngine.from_dict({"states": {}})


def test_defaults_are_valid_and_distinct():
    assert [r.name for r in RuleEngine().rules] == ["low_confidence", "high_entropy", "high_error_rate"]
    assert {r.signal for r in DEFAULT_RULES} == {"mean_confidence", "mean_entropy", "error_rate"}


# --- signals: expressions and parsing ---------------------------------------------------------------


def test_prom_duration_and_promql():
    assert [prom_duration(s) for s in (300, 3600, 90, 1.5, 60)] == ["5m", "1h", "90s", "1500ms", "1m"]
    assert promql("mean_confidence", 300) == (
        "sum(rate(ray_segloop_confidence_sum[5m])) / sum(rate(ray_segloop_confidence_count[5m]))"
    )
    with pytest.raises(ConfigError, match="unknown signal 'accuracy'"):
        promql("accuracy")
    with pytest.raises(ConfigError, match="positive"):
        prom_duration(0)


def exposition(conf=(0.0, 0.0), ent=(0.0, 0.0), ok=0.0, err=0.0, client_err=0.0, rejected=0.0, worker="w1") -> str:
    """A Ray-like exposition of the serving metrics (histogram sum/count pairs, counters);
    ``err`` counts server errors (5xx), ``client_err`` client errors (4xx)."""
    lab = f'Component="core_worker",WorkerId="{worker}",model_version="1"'
    lines = []
    for name, (s, c) in (("ray_segloop_confidence", conf), ("ray_segloop_entropy", ent)):
        lines += [
            f"# HELP {name} x",
            f"# TYPE {name} histogram",
            f'{name}_bucket{{{lab},le="0.5"}} 0.0',
            f'{name}_bucket{{{lab},le="+Inf"}} {c}',
            f"{name}_count{{{lab}}} {c}",
            f"{name}_sum{{{lab}}} {s}",
        ]
    lines += [
        "# HELP ray_segloop_predictions_total x",
        "# TYPE ray_segloop_predictions_total counter",
        f'ray_segloop_predictions_total{{{lab},code="200",status="ok",task="semantic"}} {ok}',
        f'ray_segloop_predictions_total{{{lab},code="500",status="server_error",task="semantic"}} {err}',
        f'ray_segloop_predictions_total{{{lab},code="400",status="client_error",task="semantic"}} {client_err}',
        "# HELP ray_segloop_rejections_total x",
        "# TYPE ray_segloop_rejections_total counter",
        f'ray_segloop_rejections_total{{Component="core_worker",WorkerId="{worker}",reason="truncated"}} {rejected}',
        "# HELP ray_serve_num_http_requests_total x",
        "# TYPE ray_serve_num_http_requests_total counter",
        'ray_serve_num_http_requests_total{route="/x",status_code="200"} 5.0',
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def serve_text(text: Callable[[], str]) -> Iterator[str]:
    """Serve ``text()`` at http://127.0.0.1:<port>/metrics."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/metrics"
    finally:
        srv.shutdown()
        srv.server_close()


def test_parse_series_keeps_only_the_signal_samples():
    series = parse_series(exposition(conf=(1.5, 3), ok=2), source="u")
    names = sorted({k[1] for k in series})
    assert names == [
        "ray_segloop_confidence_count",
        "ray_segloop_confidence_sum",
        "ray_segloop_entropy_count",
        "ray_segloop_entropy_sum",
        "ray_segloop_predictions_total",
    ]
    assert (
        series[
            (
                "u",
                "ray_segloop_confidence_sum",
                frozenset({"Component": "core_worker", "WorkerId": "w1", "model_version": "1"}.items()),
            )
        ]
        == 1.5
    )


def test_ray_reader_windowed_deltas_and_resets():
    page = {"w1": exposition(), "w2": ""}
    with serve_text(lambda: page["w1"] + page["w2"]) as url:
        reader = RayMetricsReader(url, window_s=60)
        assert reader.read(now=0) == dict.fromkeys(KEYS)  # baseline only
        assert reader.read(now=10) == {
            "mean_confidence": None,
            "mean_entropy": None,
            "error_rate": None,
            "client_error_rate": None,
            "requests": 0.0,
        }

        # the error rate counts 5xx only; 4xx are the client error rate (both count in the requests)
        page["w1"] = exposition(conf=(3.0, 10), ent=(2.0, 10), ok=6, err=2, client_err=2, rejected=4)
        got = reader.read(now=20)
        assert got == pytest.approx(
            {"mean_confidence": 0.3, "mean_entropy": 0.2, "error_rate": 0.2, "client_error_rate": 0.2, "requests": 10.0}
        )

        # another worker appears (counts whole), w1 restarts (its counters go down: counts from zero)
        page["w2"] = exposition(conf=(9.0, 10), ent=(8.0, 10), ok=10, worker="w2").split("\n", 2)[2]
        page["w1"] = exposition(conf=(0.5, 5), ent=(0.5, 5), ok=5, err=0, client_err=0, rejected=0)
        got = reader.read(now=30)
        # window (0..30]: w1 before restart 3.0/10 + w1 after 0.5/5 + w2 9.0/10
        assert got["mean_confidence"] == pytest.approx((3.0 + 0.5 + 9.0) / 25)
        assert got["requests"] == pytest.approx(10 + 5 + 10)
        assert got["error_rate"] == pytest.approx(2 / 25)
        assert got["client_error_rate"] == pytest.approx(2 / 25)

        # 60 s later, only increments newer than the window count; none -> no data
        got = reader.read(now=95)
        assert got == {
            "mean_confidence": None,
            "mean_entropy": None,
            "error_rate": None,
            "client_error_rate": None,
            "requests": 0.0,
        }


def test_unreachable_sources_name_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SignalsUnavailable, match=f"Ray metrics endpoint at {url}/metrics is unreachable"):
        RayMetricsReader(f"{url}/metrics").read()
    with pytest.raises(SignalsUnavailable, match=f"Prometheus at {url} is unreachable"):
        query_prometheus(url)
    with pytest.raises(ConfigError, match="at least one"):
        RayMetricsReader([])


# --- signals through a real Prometheus ------------------------------------------------------------


def test_query_prometheus_on_scraped_endpoint(tmp_path: Path):
    """Prometheus scrapes counters growing at known rates; the windowed signals are their ratios."""
    t0 = time.time()

    def page() -> str:
        t = time.time() - t0
        return exposition(
            conf=(3 * t, 10 * t), ent=(7 * t, 10 * t), ok=7 * t, err=1 * t, client_err=2 * t, rejected=3 * t
        )

    with serve_text(page) as url:
        target = url.removeprefix("http://").removesuffix("/metrics")
        config = yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "static", "static_configs": [{"targets": [target]}]}],
            }
        )
        with run_prometheus(config, tmp_path / "prom") as prom:
            before = time.time() - 3600
            deadline = time.monotonic() + 30
            while True:
                got = query_prometheus(prom.url, window_s=5)
                if got["mean_confidence"] is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert got["mean_confidence"] == pytest.approx(0.3, abs=1e-6)
            assert got["mean_entropy"] == pytest.approx(0.7, abs=1e-6)
            assert got["error_rate"] == pytest.approx(0.1, abs=1e-6)
            assert got["client_error_rate"] == pytest.approx(0.2, abs=1e-6)
            assert got["requests"] > 0
            # an hour before there was nothing: no data, and zero requests
            assert query_prometheus(prom.url, window_s=5, at=before) == {
                "mean_confidence": None,
                "mean_entropy": None,
                "error_rate": None,
                "client_error_rate": None,
                "requests": 0.0,
            }


# --- real Ray -----------------------------------------------------------------------------------

# Exactly the app's boundaries: Ray registers a histogram once per node and drops data points of
# the same name reported with other boundaries.
BOUNDS = list(UNIT_BOUNDARIES)


def _emitter_class():
    import ray

    @ray.remote(num_cpus=0)
    class Emitter:
        """Emits the serving metrics like the Serve replicas do (names, tags, buckets of CONTRACTS.md)."""

        def __init__(self):
            from ray.util.metrics import Counter, Histogram

            self.conf = Histogram(
                "segloop_confidence",
                description="Per-image confidence.",
                boundaries=BOUNDS,
                tag_keys=("model_version",),
            )
            self.ent = Histogram(
                "segloop_entropy",
                description="Per-image normalised entropy.",
                boundaries=BOUNDS,
                tag_keys=("model_version",),
            )
            self.pred = Counter(
                "segloop_predictions",
                description="Predictions served.",
                tag_keys=("model_version", "task", "status", "code"),
            )
            self.rej = Counter("segloop_rejections", description="Rejected requests.", tag_keys=("reason",))

        def worker_id(self) -> str:
            return ray.get_runtime_context().get_worker_id()

        def emit(self, conf, ent, ok, rejected, version="test"):
            for c in conf:
                self.conf.observe(c, tags={"model_version": version})
            for e in ent:
                self.ent.observe(e, tags={"model_version": version})
            tags = {"model_version": version, "task": "semantic"}
            if ok:
                self.pred.inc(ok, tags={**tags, "status": "ok", "code": "200"})
            for reason, (status, code, n) in rejected.items():  # as the ingress: also a failed prediction
                self.rej.inc(n, tags={"reason": reason})
                self.pred.inc(n, tags={**tags, "status": status, "code": code})

    return Emitter


# Ray (2.60) exports a histogram's _sum as count x bucket midpoint, not the observed values
# (ray/_private/telemetry/open_telemetry_metric_recorder.py); midpoints keep the expected means exact.
def rejections(*reasons: str) -> dict[str, tuple[str, str, int]]:
    """One rejection per reason, tagged by the ingress's own mapping: reason -> (status, code, n)."""
    return {r: (status_class(STATUS[r]), str(STATUS[r]), 1) for r in reasons}


BATCH = dict(
    conf=[0.225, 0.425, 0.875, 0.675],
    ent=[0.125, 0.275, 0.475, 0.325],
    ok=6,
    rejected=rejections("not_an_image", "internal"),  # a 400 and a 500
)
EXPECTED = {"mean_confidence": 0.55, "mean_entropy": 0.3, "error_rate": 0.125, "client_error_rate": 0.125}


def _matches(got: dict) -> bool:
    return all(got[k] is not None and math.isclose(got[k], v, rel_tol=1e-6) for k, v in EXPECTED.items())


@pytest.mark.slow
def test_ray_reader_on_real_ray_metrics(ray_cluster):
    import ray

    urls = ray_metrics_urls()  # what the monitoring actor uses inside the cluster
    assert [u for u in urls if u.endswith(f":{ray_cluster.metrics_export_port}/metrics")], urls
    reader = RayMetricsReader(urls, window_s=600)
    reader.read()  # baseline
    emitter = _emitter_class().remote()
    try:
        ray.get(emitter.emit.remote(**BATCH))
        deadline = time.monotonic() + 60
        while not _matches(got := reader.read()) and time.monotonic() < deadline:
            time.sleep(1)
        assert got == pytest.approx({**EXPECTED, "requests": 8.0})
    finally:
        ray.kill(emitter)


@pytest.mark.slow
def test_query_prometheus_scraping_ray_via_service_discovery(ray_cluster, tmp_path: Path):
    """monitoring/prometheus.yml (pointed at this session's discovery file) + alerts.yml on real Ray metrics."""
    import ray

    sd_file = Path(ray_cluster.address_info["session_dir"]) / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + 30
    while not sd_file.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sd_file.exists(), f"Ray did not write {sd_file}"

    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ALERTS_YML)]
    cfg["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]

    emitter = _emitter_class().remote()
    try:
        wid = ray.get(emitter.worker_id.remote())
        # Warm-up: create every series first; Prometheus counts increases from a series' first sample on.
        ray.get(
            emitter.emit.remote(conf=[0.5] * 50, ent=[0.5] * 50, ok=50, rejected=rejections("not_an_image", "internal"))
        )
        with run_prometheus(yaml.safe_dump(cfg), tmp_path / "prom") as prom:
            warm = f'ray_segloop_predictions_total{{WorkerId="{wid}"}}'
            deadline = time.monotonic() + 60
            while sum(float(r["value"][1]) for r in prom.query(warm)) < 52 and time.monotonic() < deadline:
                time.sleep(0.5)
            rejected = prom.query(f'ray_segloop_rejections_total{{WorkerId="{wid}"}}')
            assert sorted(r["metric"]["reason"] for r in rejected) == ["internal", "not_an_image"], (
                f"no warm-up metrics in Prometheus:\n{prom.log.read_text()[-2000:]}"
            )
            # Exported names, labels and buckets, as Prometheus sees them.
            buckets = prom.query(f'ray_segloop_confidence_bucket{{WorkerId="{wid}"}}')
            assert sorted(float(r["metric"]["le"]) for r in buckets) == sorted(BOUNDS + [math.inf])
            assert {r["metric"]["model_version"] for r in buckets} == {"test"}
            time.sleep(1.5)  # at least one sample of the complete warm-up before the batch
            t_warm = time.time()

            ray.get(emitter.emit.remote(**BATCH))
            deadline = time.monotonic() + 60
            while True:
                got = query_prometheus(prom.url, window_s=round(time.time() - t_warm, 3))
                if _matches(got) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert {k: got[k] for k in EXPECTED} == pytest.approx(EXPECTED, rel=1e-6)
            assert got["requests"] == pytest.approx(8, rel=0.5)  # increase() extrapolates to the window edges

            # The dashboard panels fed by these four metrics show data.
            emitted = {
                "ray_segloop_confidence",
                "ray_segloop_entropy",
                "ray_segloop_predictions",
                "ray_segloop_rejections",
            }
            metrics = {
                q: {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in re.findall(r"ray_\w+", q)}
                for q in dashboard_queries()
            }
            fed = [q for q, ms in metrics.items() if ms and ms <= emitted]
            assert len(fed) >= 6
            assert [q for q in fed if not prom.query(q)] == []

            # alerts.yml evaluates without errors on real Ray data
            with urllib.request.urlopen(f"{prom.url}/api/v1/rules", timeout=5) as r:
                groups = json.load(r)["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            assert len(rules) == len(alert_rules())
            assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    finally:
        ray.kill(emitter)
