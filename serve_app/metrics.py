"""Prometheus metrics of the serving app, through Ray's metrics (``ray.serve.metrics``).

Ray exports them on each node's metrics endpoint with a ``ray_`` prefix (counters also get
``_total``), and ``ray.serve.metrics`` adds the ``deployment``, ``replica`` and
``application`` tags. Ray Serve's built-in ``ray_serve_*`` metrics are untouched.

Objects are created lazily, once per process (a replica), never at import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from monitoring.metric_names import (  # the names the watch side reads
    BATCH_BOUNDARIES,
    BATCH_SIZE,
    CONFIDENCE,
    ENTROPY,
    LATENCY_BOUNDARIES,
    MODEL_LATENCY,
    PREDICTIONS,
    REJECTIONS,
    REQUEST_LATENCY,
    UNIT_BOUNDARIES,
)


def status_class(code: int) -> str:
    """The ``status`` tag of ``segloop_predictions`` for the HTTP status code a request was answered with."""
    if code < 400:
        return "ok"
    return "client_error" if code < 500 else "server_error"


@dataclass
class IngressMetrics:
    predictions: Any
    request_latency: Any
    rejections: Any

    def answered(self, code: int, version: str, task: str) -> None:
        """Count one answered /predict request: ``status`` (its class) and ``code`` come from ``code``."""
        tags = {"model_version": version, "task": task, "status": status_class(code), "code": str(code)}
        self.predictions.inc(1, tags=tags)

    def ok(self, version: str, task: str, latency_s: float) -> None:
        self.answered(200, version, task)
        self.request_latency.observe(latency_s, tags={"model_version": version})

    def rejected(self, reason: str, code: int, version: str, task: str) -> None:
        self.rejections.inc(1, tags={"reason": reason})
        self.answered(code, version, task)


@dataclass
class ModelMetrics:
    model_latency: Any
    batch_size: Any
    confidence: Any
    entropy: Any

    def batch(self, version: str, size: int, latency_s: float) -> None:
        tags = {"model_version": version}
        self.batch_size.observe(size, tags=tags)
        self.model_latency.observe(latency_s, tags=tags)

    def image(self, version: str, confidence: float, entropy: float) -> None:
        tags = {"model_version": version}
        self.confidence.observe(confidence, tags=tags)
        self.entropy.observe(entropy, tags=tags)


@functools.cache
def ingress_metrics() -> IngressMetrics:
    from ray.serve.metrics import Counter, Histogram

    return IngressMetrics(
        predictions=Counter(
            PREDICTIONS,
            description="Answered /predict requests by model version, task, status (ok|client_error|server_error)"
            " and HTTP code.",
            tag_keys=("model_version", "task", "status", "code"),
        ),
        request_latency=Histogram(
            REQUEST_LATENCY,
            description="End-to-end latency of successful /predict requests in the ingress (s).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model_version",),
        ),
        rejections=Counter(
            REJECTIONS,
            description="Rejected /predict requests by reason.",
            tag_keys=("reason",),
        ),
    )


@functools.cache
def model_metrics() -> ModelMetrics:
    from ray.serve.metrics import Histogram

    return ModelMetrics(
        model_latency=Histogram(
            MODEL_LATENCY,
            description="One batched forward pass incl. softmax and mask upsampling (s).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model_version",),
        ),
        batch_size=Histogram(
            BATCH_SIZE,
            description="Images per batched forward pass.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model_version",),
        ),
        confidence=Histogram(
            CONFIDENCE,
            description="Per-image confidence (mean max-softmax / mean detection score).",
            boundaries=UNIT_BOUNDARIES,
            tag_keys=("model_version",),
        ),
        entropy=Histogram(
            ENTROPY,
            description="Per-image normalised entropy (0..1).",
            boundaries=UNIT_BOUNDARIES,
            tag_keys=("model_version",),
        ),
    )
