"""The metric names and histogram buckets the serving app emits and the watch side reads.

One contract for the emitter (``serve_app.metrics``), the monitoring actor's signal reader
(``monitoring.signals``), the Prometheus rules (``alerts.yml``) and the Grafana dashboard.
"""

UNIT_BOUNDARIES = [round(0.05 * i, 2) for i in range(1, 20)] + [0.99, 1.0]  # 1.0: Ray sums +Inf at 2x the last bound
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

# Ray-side names; Prometheus sees "ray_" + name (+ "_total" for counters, "_bucket/_sum/_count" for histograms).
PREDICTIONS = "segloop_predictions"
REQUEST_LATENCY = "segloop_request_latency_s"
MODEL_LATENCY = "segloop_model_latency_s"
CONFIDENCE = "segloop_confidence"
ENTROPY = "segloop_entropy"
BATCH_SIZE = "segloop_batch_size"
REJECTIONS = "segloop_rejections"
