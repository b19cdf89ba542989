"""monitoring/: the Prometheus config, alert rules (+ their promtool unit tests) and the Grafana dashboard.

promtool and prometheus come from Debian's `prometheus` package (`make system-deps`). Without them the
tests that need them are skipped, unless $CI is set, where a missing tool is a failure.
PromQL is checked by a real Prometheus on an empty TSDB (127.0.0.1, free port, temp storage).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from monitoring.rules import DEFAULT_RULES
from monitoring.signals import prometheus_query, promql, promql_queries
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
ALERTS_TEST_YML = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "segloop.json"

# What Grafana substitutes into queries; fixed values so the expressions can run on a plain Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${__range}": "1h",
    "${__rate_interval}": "1m",
}


# --- helpers (also for other test modules: the end-to-end test runs dashboard_queries after traffic) ---


def require_tool(name: str) -> str:
    """Path of a Prometheus binary; skip (or fail on CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        msg = f"`{name}` is not installed (Debian package `prometheus`; run `make system-deps`)"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- required on CI")
        pytest.skip(msg)
    return path


def render_grafana_expr(expr: str) -> str:
    """A dashboard expression with Grafana's built-in variables replaced by fixed durations."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # collapsed rows nest their panels


def dashboard_panels(path: Path | str = DASHBOARD) -> list[dict]:
    """Every panel of a dashboard, rows included, flattened."""
    return list(_panels(json.loads(Path(path).read_text())["panels"]))


def dashboard_queries(path: Path | str = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard, ready to send to Prometheus (Grafana variables rendered).

    For the end-to-end test: after real traffic through the Serve app, each of these should return data.
    """
    return [
        render_grafana_expr(t["expr"]) for p in dashboard_panels(path) for t in p.get("targets", []) if t.get("expr")
    ]


def alert_rules(path: Path | str = ALERTS_YML) -> list[dict]:
    return [r for g in yaml.safe_load(Path(path).read_text())["groups"] for r in g["rules"] if "alert" in r]


class Prometheus:
    """A Prometheus server on 127.0.0.1 (see ``run_prometheus``)."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return prometheus_query(self.url, expr, at=at)


@contextmanager
def run_prometheus(config: str, workdir: Path, timeout: float = 30.0) -> Iterator[Prometheus]:
    """Start Prometheus with ``config`` (YAML text) and a fresh TSDB under ``workdir``; stop it after."""
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Prometheus(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _promtool(*args: str) -> subprocess.CompletedProcess:
    tool = require_tool("promtool")
    res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, f"promtool {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def _nospace(s: str) -> str:
    return re.sub(r"\s+", "", s)


# --- promtool ---------------------------------------------------------------------------------


def test_prometheus_config_is_valid():
    res = _promtool("check", "config", str(PROMETHEUS_YML))
    assert "1 rule files found" in res.stdout


def test_alert_rules_are_valid():
    _promtool("check", "rules", str(ALERTS_YML))


def test_alert_rules_unit_tests_pass():
    _promtool("test", "rules", str(ALERTS_TEST_YML))


def test_prometheus_config_scrapes_ray_service_discovery_file():
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    assert _seconds(cfg["global"]["scrape_interval"]) <= 10
    (job,) = cfg["scrape_configs"]
    files = job["file_sd_configs"][0]["files"]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files
    # The file name Ray writes (ray._private.ray_constants); fail loudly if Ray renames it.
    from ray._private import ray_constants

    assert all(f.endswith(ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE) for f in files)


# --- alerts.yml vs the monitoring actor's rules ---------------------------------------------------


def test_every_alert_has_severity_summary_and_description():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "SegloopLowConfidence",
        "SegloopHighEntropy",
        "SegloopHighErrorRate",
        "SegloopNoHealthyReplicas",
        "SegloopCaptureDrops",
    }
    for r in rules:
        assert r["labels"]["severity"] in {"info", "warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"].strip() and r["annotations"]["description"].strip(), r["alert"]


@pytest.mark.parametrize("rule", DEFAULT_RULES, ids=lambda r: r.name)
def test_alerts_mirror_the_default_rules(rule):
    """Same signal expression, window, threshold, hysteresis band, `for` and severity as rules.py."""
    (alert,) = [a for a in alert_rules() if a.get("labels", {}).get("rule") == rule.name]
    assert alert["labels"]["signal"] == rule.signal
    assert alert["labels"]["severity"] == rule.severity
    assert _seconds(alert["for"]) == rule.for_s
    expr = _nospace(alert["expr"])
    signal = _nospace(f"({promql(rule.signal, rule.window_s)})")
    band = rule.threshold + rule.hysteresis if rule.op == "<" else rule.threshold - rule.hysteresis
    assert f"{signal}{rule.op}{rule.threshold:g}" in expr
    assert f"{signal}{rule.op}{band:g}" in expr
    assert f'ALERTS{{alertname="{alert["alert"]}",alertstate="firing"}}' in expr


def test_error_rate_counts_server_errors_only():
    """5xx page (error_rate, SegloopHighErrorRate); 4xx have their own signal and panel, and no alert."""
    assert 'status="server_error"' in promql("error_rate") and "client_error" not in promql("error_rate")
    assert 'status="client_error"' in promql("client_error_rate")
    assert not [a["alert"] for a in alert_rules() if "client_error" in a["expr"] or 'status="error"' in a["expr"]]
    (panel,) = [p for p in dashboard_panels() if p["title"].startswith("Error rates")]
    assert [_nospace(t["expr"]) for t in panel["targets"]] == [
        _nospace(promql("error_rate")),
        _nospace(promql("client_error_rate")),
    ]


# --- Grafana dashboard ---------------------------------------------------------------------------


def test_dashboard_is_importable_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_every_panel_has_datasource_and_query():
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 10
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert t["expr"].strip(), p["title"]
            assert t["refId"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_covers_the_serving_metrics():
    exprs = "\n".join(dashboard_queries())
    for metric in (
        "ray_segloop_predictions_total",
        "ray_segloop_request_latency_s_bucket",
        "ray_segloop_model_latency_s_bucket",
        "ray_segloop_confidence_bucket",
        "ray_segloop_entropy_bucket",
        "ray_segloop_confidence_sum",
        "ray_segloop_entropy_sum",
        "ray_segloop_batch_size",
        "ray_segloop_rejections_total",
        "ray_segloop_captures_total",
        "ray_segloop_capture_queue",
        "ray_segloop_monitor_alerts",
        "ray_segloop_retrain_jobs",
        "ray_segloop_promotions",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_num_http_requests_total",
    ):
        assert metric in exprs, metric
    heatmaps = [p for p in dashboard_panels() if p["type"] == "heatmap"]
    assert {t["format"] for p in heatmaps for t in p["targets"]} == {"heatmap"}
    assert len(heatmaps) == 2


# --- every expression parses, on a real Prometheus ------------------------------------------------


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    config = "global:\n  scrape_interval: 15s\nscrape_configs: []\n"
    with run_prometheus(config, tmp_path_factory.mktemp("prometheus")) as prom:
        yield prom


def test_bad_promql_is_rejected(empty_prometheus: Prometheus):
    """The parse check below means something: Prometheus does reject bad PromQL."""
    from monitoring.signals import SignalsUnavailable

    with pytest.raises(SignalsUnavailable, match="400.*sum\\(rate\\(x\\[5m\\]\\)"):
        empty_prometheus.query("sum(rate(x[5m])")


def test_every_expression_parses(empty_prometheus: Prometheus):
    exprs = dashboard_queries() + [a["expr"] for a in alert_rules()] + list(promql_queries(300).values())
    assert len(exprs) > 20
    for expr in exprs:
        empty_prometheus.query(expr)  # raises SignalsUnavailable (HTTP 400 + the parse error) if bad
    # On an empty TSDB the signals are "no data", except the request count, which is 0.
    assert empty_prometheus.query(promql("mean_confidence")) == []
    assert float(empty_prometheus.query(promql("requests"))[0]["value"][1]) == 0.0
