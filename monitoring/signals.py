"""Read the windowed signals the alert rules watch (monitoring/rules.py, monitoring/alerts.yml).

Two sources, same result ``{"mean_confidence", "mean_entropy", "error_rate", "client_error_rate", "requests"}``:

* ``query_prometheus(url, window_s)`` asks a Prometheus server with the PromQL of alerts.yml;
* ``RayMetricsReader(url, window_s).read()`` scrapes Ray's metrics endpoint itself (no Prometheus
  needed) and computes the same quantities from the increments between its scrapes.

Definitions over the window: mean confidence/entropy = increase of the histogram's _sum / increase of
its _count; error rate = server errors (5xx) / all requests and client error rate = client errors (4xx)
/ all requests, counted by ``segloop_predictions`` (the ingress counts every answered /predict request
there once, with ``status`` = ``ok``, ``client_error`` or ``server_error`` by the HTTP status it
answered, which is also the ``code`` label; ``segloop_rejections`` breaks the errors down by reason);
requests = all requests. A value is ``None`` when it is undefined (no traffic in the window), which
the rules treat as "no data".

Ray exports a Ray-side metric ``segloop_x`` as ``ray_segloop_x`` (counters ``ray_segloop_x_total``),
one series per worker process, so everything is summed over series.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from monitoring import metric_names as metrics
from segloop.errors import ConfigError, SegloopError

SIGNALS: tuple[str, ...] = ("mean_confidence", "mean_entropy", "error_rate", "client_error_rate")
# The ``status`` of segloop_predictions each error signal counts (error_rate: 5xx only).
ERROR_STATUS: dict[str, str] = {"error_rate": "server_error", "client_error_rate": "client_error"}
KEYS: tuple[str, ...] = (*SIGNALS, "requests")

# Prometheus-side names of the serving metrics (monitoring/alerts.yml spells them out).
CONFIDENCE = f"ray_{metrics.CONFIDENCE}"
ENTROPY = f"ray_{metrics.ENTROPY}"
PREDICTIONS = f"ray_{metrics.PREDICTIONS}_total"


class SignalsUnavailable(SegloopError, RuntimeError):
    """The metrics source could not be reached or answered something unusable."""


def prom_duration(seconds: float) -> str:
    """300 -> '5m', 3600 -> '1h', 90 -> '90s', 0.5 -> '500ms' (PromQL range durations)."""
    ms = round(seconds * 1000) if seconds > 0 and math.isfinite(seconds) else 0
    if ms < 1:
        raise ConfigError(f"window must be a positive number of seconds (>= 1 ms), got {seconds!r}")
    if ms % 1000:
        return f"{ms}ms"
    s = ms // 1000
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


def _mean(metric: str, w: str) -> str:
    return f"sum(rate({metric}_sum[{w}])) / sum(rate({metric}_count[{w}]))"


def promql(signal: str, window_s: float = 300) -> str:
    """The PromQL of one signal over ``window_s`` -- exactly the expression used in alerts.yml."""
    w = prom_duration(window_s)
    if signal == "mean_confidence":
        return _mean(CONFIDENCE, w)
    if signal == "mean_entropy":
        return _mean(ENTROPY, w)
    if signal in ERROR_STATUS:
        # no error series yet (Ray exports a counter once incremented) is 0 errors, not "no data"
        errors = f'sum(rate({PREDICTIONS}{{status="{ERROR_STATUS[signal]}"}}[{w}]))'
        return f"({errors} or vector(0)) / sum(rate({PREDICTIONS}[{w}]))"
    if signal == "requests":
        return f"sum(increase({PREDICTIONS}[{w}])) or vector(0)"
    raise ConfigError(f"unknown signal {signal!r}: expected one of {', '.join(KEYS)}")


def promql_queries(window_s: float = 300) -> dict[str, str]:
    """Every expression, keyed like the result of ``query_prometheus``."""
    return {key: promql(key, window_s) for key in KEYS}


def _get(url: str, timeout: float, what: str, shown: str | None = None) -> bytes:
    """GET ``url``; errors name ``what`` at ``shown`` (default: the URL)."""
    shown = shown or url
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http URL from config)
            return resp.read()
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")[:500]
        raise SignalsUnavailable(f"{what} at {shown} answered HTTP {e.code}: {body}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise SignalsUnavailable(f"{what} at {shown} is unreachable: {reason}") from None


def prometheus_query(url: str, expr: str, *, at: float | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Run an instant query on the Prometheus at ``url``; returns the result vector (or raises)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    base = url.rstrip("/")
    try:
        raw = _get(f"{base}/api/v1/query?{urllib.parse.urlencode(params)}", timeout, "Prometheus", shown=base)
    except SignalsUnavailable as e:
        # Prometheus answers bad queries with HTTP 400 and a JSON error; say which query.
        raise SignalsUnavailable(f"{e} (query: {expr})") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise SignalsUnavailable(f"Prometheus at {url} answered non-JSON to {expr!r}: {raw[:200]!r}") from None
    if body.get("status") != "success":
        raise SignalsUnavailable(f"Prometheus at {url} failed query {expr!r}: {body.get('error', body)}")
    data = body.get("data", {})
    if data.get("resultType") == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return list(data.get("result", []))


def _scalar(result: list[dict[str, Any]]) -> float | None:
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value


def query_prometheus(
    url: str, window_s: float = 300, *, at: float | None = None, timeout: float = 5.0
) -> dict[str, float | None]:
    """The signals over the last ``window_s`` seconds (at time ``at``, default now) from Prometheus."""
    return {
        key: _scalar(prometheus_query(url, expr, at=at, timeout=timeout))
        for key, expr in promql_queries(window_s).items()
    }


# --- straight from Ray's metrics endpoint -------------------------------------------------------

_WANTED = (f"{CONFIDENCE}_sum", f"{CONFIDENCE}_count", f"{ENTROPY}_sum", f"{ENTROPY}_count", PREDICTIONS)
_ERRORS = tuple(ERROR_STATUS.values())  # the error statuses of PREDICTIONS, counted apart
SeriesKey = tuple[str, str, frozenset]  # (url, sample name, labels)


def parse_series(text: str, source: str = "") -> dict[SeriesKey, float]:
    """The cumulative values of the segloop series in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    # Only the segloop lines: a Ray node exports thousands of others.
    lines = [ln for ln in text.splitlines() if "ray_segloop_" in ln[:64]]
    out: dict[SeriesKey, float] = {}
    try:
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for s in family.samples:
                if s.name in _WANTED:
                    out[(source, s.name, frozenset(s.labels.items()))] = float(s.value)
    except ValueError as e:
        raise SignalsUnavailable(f"cannot parse the metrics at {source or '<text>'}: {e}") from None
    return out


def _increments(prev: Mapping[SeriesKey, float], cur: Mapping[SeriesKey, float]) -> dict[str, float]:
    """Per-series increase between two scrapes, summed per sample name. A series that went down was
    reset (worker restarted) and counts from zero; a new series counts whole."""
    totals = dict.fromkeys((*_WANTED, *_ERRORS), 0.0)
    for key, value in cur.items():
        before = prev.get(key)
        inc = value if before is None or value < before else value - before
        totals[key[1]] += inc
        status = dict(key[2]).get("status", "") if key[1] == PREDICTIONS else ""
        if status in _ERRORS:
            totals[status] += inc
    return totals


def signals_from_increments(inc: Mapping[str, float]) -> dict[str, float | None]:
    """The signals from summed increments (keys of ``_WANTED`` plus the error statuses)."""

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {
        "mean_confidence": ratio(inc[f"{CONFIDENCE}_sum"], inc[f"{CONFIDENCE}_count"]),
        "mean_entropy": ratio(inc[f"{ENTROPY}_sum"], inc[f"{ENTROPY}_count"]),
        **{signal: ratio(inc[status], inc[PREDICTIONS]) for signal, status in ERROR_STATUS.items()},
        "requests": inc[PREDICTIONS],
    }


def ray_metrics_urls() -> list[str]:
    """The metrics endpoints of the alive nodes of the Ray cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise SignalsUnavailable("Ray is not initialised: cannot list the nodes' metrics endpoints")
    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") or n.get("alive")
    ]


class RayMetricsReader:
    """Scrapes Ray metrics endpoint(s) and returns the signals over a sliding window.

    Each ``read()`` scrapes, turns the change since the previous scrape into increments, and sums the
    increments of the scrapes taken within the last ``window_s`` seconds. The first read only sets the
    baseline (all values ``None``): cumulative totals since a worker started say nothing about now.
    """

    def __init__(self, urls: str | Sequence[str], window_s: float = 300, *, timeout: float = 5.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ConfigError("RayMetricsReader needs at least one metrics URL")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ConfigError(f"window must be a positive number of seconds, got {window_s!r}")
        self.window_s = float(window_s)
        self.timeout = timeout
        self._last: dict[SeriesKey, float] | None = None
        self._history: deque[tuple[float, dict[str, float]]] = deque()

    def scrape(self) -> dict[SeriesKey, float]:
        series: dict[SeriesKey, float] = {}
        for url in self.urls:
            text = _get(url, self.timeout, "Ray metrics endpoint").decode("utf-8", "replace")
            series.update(parse_series(text, url))
        return series

    def read(self, now: float | None = None) -> dict[str, float | None]:
        now = time.monotonic() if now is None else now
        cur = self.scrape()
        if self._last is None:
            self._last = cur
            return dict.fromkeys(KEYS)
        self._history.append((now, _increments(self._last, cur)))
        self._last = cur
        while self._history and self._history[0][0] <= now - self.window_s:
            self._history.popleft()
        window = dict.fromkeys((*_WANTED, *_ERRORS), 0.0)
        for _, inc in self._history:
            for k, v in inc.items():
                window[k] += v
        return signals_from_increments(window)

    def reset(self) -> None:
        """Forget the baseline and the window (the next read is a first read again)."""
        self._last = None
        self._history.clear()
