"""The whole loop, end to end, as `make demo` runs it (tiny data): must finish with 0 failed requests.

A real Prometheus (monitoring/prometheus.yml, 1 s scrapes) watches the demo's Ray cluster through
the service-discovery file Ray writes, so afterwards every Grafana dashboard query is run over the
demo's time range against metrics of real Serve traffic, a real capture, a real retraining job and
a real promotion, and each must return data.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.test_monitoring_config import ALERTS_YML, PROMETHEUS_YML, Prometheus, dashboard_queries, run_prometheus

ROOT = Path(__file__).resolve().parents[1]
# ray.init()'s default temp dir: Ray keeps a link to the newest session's discovery file here.
RAY_SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")


def prometheus_config(workdir: Path) -> str:
    """monitoring/prometheus.yml with 1 s scrapes, and alerts.yml with a low bar on one alert.

    The demo runs for minutes, the shipped alerts need 2-5 minutes of breach: SegloopLowConfidence
    is rewritten to fire on any traffic after 5 s so the "firing alerts" panel has something to
    show. (The real thresholds are tested by `promtool test rules` in test_monitoring_config.)
    """
    alerts = yaml.safe_load(ALERTS_YML.read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "SegloopLowConfidence":
                rule["expr"] = "sum(rate(ray_segloop_confidence_count[1m])) > 0"
                rule["for"] = "5s"
    (workdir / "alerts.yml").write_text(yaml.safe_dump(alerts))
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(workdir / "alerts.yml")]
    cfg["scrape_configs"][0]["file_sd_configs"] = [{"files": [str(RAY_SD_FILE)], "refresh_interval": "1s"}]
    return yaml.safe_dump(cfg)


def query_range(prom: Prometheus, expr: str, start: float, end: float, step_s: float = 5) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    with urllib.request.urlopen(f"{prom.url}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def has_data(series: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for s in series for _, v in s["values"])


@pytest.mark.slow
@pytest.mark.own_ray_cluster
@pytest.mark.labelstudio
def test_demo_loop_end_to_end(tmp_path: Path, label_studio_launched) -> None:
    """The loop with a person's step done in Label Studio: the batch is pushed to the session's
    Label Studio server, annotated through its API, and pulled by the monitoring actor."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SEGLOOP_STORE")}
    env["LABEL_STUDIO_API_KEY"] = label_studio_launched.api_key
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    with run_prometheus(prometheus_config(prom_dir), prom_dir) as prom:
        t0 = time.time()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "segloop",
                "demo",
                "--data-dir",
                str(tmp_path / "demo"),
                "--n",
                "96",
                "--shift-n",
                "96",
                "--epochs",
                "8",
                "--annotate",
                "40",
                "--timeout",
                "900",
                "--stay",
                "15",
                "--label-studio",
                label_studio_launched.url,
                "--simulate-annotator",
            ],  # > Ray's 10 s metrics report period: the last totals reach Prometheus
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=1500,
        )
        t1 = time.time()
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-6000:]
        assert "alert FIRED" in log, log[-6000:]
        assert "400 empty_body, 400 not_an_image, 400 truncated" in log, log[-6000:]
        assert re.search(r"pushed 40 tasks, most useful first, to Label Studio project \d+", log), log[-6000:]
        assert "the simulated annotator submitted 40 annotations through Label Studio's API" in log, log[-6000:]
        assert re.search(r"pulled 40 annotations: pets@\w+ .*Label Studio project \d+", log), log[-6000:]
        assert re.search(r"job \S+: SUCCEEDED on pets@", log), log[-6000:]
        assert re.search(r"failed requests: 0\b", log)
        m = re.search(r"\| held-out score \(same data\) \| ([0-9.]+) \| ([0-9.]+) \|", log)
        assert m and float(m[2]) > float(m[1]), log[-3000:]
        assert re.search(r"Serve answers with v(\d+) \(champion v\1\)", log), log[-3000:]

        # Every dashboard panel query shows data for the demo's run (Serve's own metrics included).
        queries = dashboard_queries()
        assert len(queries) >= 20
        empty = [q for q in queries if not has_data(query_range(prom, q, t0, t1))]
        assert empty == [], f"dashboard queries without data: {empty}\n{prom.log.read_text()[-2000:]}"
        # The monitoring actor's totals (gauges): one job submitted and succeeded, one promotion.
        for expr, want in (
            ("max by (decision) (ray_segloop_promotions)", {"promoted": 1, "rejected": 0}),
            (
                "max by (status) (ray_segloop_retrain_jobs)",
                {"submitted": 1, "succeeded": 1, "failed": 0, "stopped": 0, "lost": 0, "timed_out": 0, "exhausted": 0},
            ),
        ):
            got = {
                s["metric"].get("decision") or s["metric"]["status"]: max(float(v) for _, v in s["values"])
                for s in query_range(prom, expr, t0, t1)
            }
            assert got == want, (expr, got)
