"""The Serve app over real HTTP on the session's local Ray cluster.

Two apps run side by side: semantic (``models:/...@champion`` from a temporary MLflow
store, deployed declaratively so models can be switched in place) and instance (a local
``checkpoint:/`` file, bearer token required). Models are untrained and tiny.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import free_port, wait_for
from tests.serve_helpers import INSTANCE, SEMANTIC, image_bytes, register_model, save_checkpoint, shapes_bytes

SEM_APP, INST_APP = "segloop-sem", "segloop-inst"
SEM_MODEL = "serve-test-sem"
TOKEN = "s3cret-token"
MAX_BYTES, MAX_PIXELS = 200_000, 512 * 512


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    import mlflow

    data_dir = tmp_path_factory.mktemp("serve") / "segloop"
    previous = mlflow.get_tracking_uri()
    version = register_model(data_dir, SEM_MODEL, SEMANTIC, seed=0)
    yield {"data_dir": data_dir, "tracking_uri": mlflow.get_tracking_uri(), "v1": version}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def instance_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "instance.pt", INSTANCE)


@pytest.fixture(scope="module")
def serve_urls(ray_cluster, store, instance_checkpoint):
    from ray import serve

    from monitoring.serving import deploy, wait_running
    from serve_app.config import AppArgs

    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    common = dict(
        max_body_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, model_num_replicas=1, model_num_cpus=1, ingress_num_cpus=0
    )
    sem = AppArgs(
        data_dir=str(store["data_dir"]),
        model={
            "model_uri": f"models:/{SEM_MODEL}@champion",
            "poll_interval_s": 0.5,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
        },
        model_max_ongoing_requests=16,
        model_max_queued_requests=16,
        body_timeout_s=2,
        **common,
    )
    inst = AppArgs(
        model={"model_uri": f"checkpoint:{instance_checkpoint}", "poll_interval_s": 0, "max_batch_size": 4},
        model_max_ongoing_requests=8,
        auth_token=TOKEN,
        **common,
    )
    deploy(sem, SEM_APP, "/", http_options=http, wait=False)
    deploy(inst, INST_APP, "/inst", http_options=http)  # both apps start in parallel
    wait_running(SEM_APP)
    base = f"http://127.0.0.1:{port}"
    yield {"sem": base, "inst": base + "/inst", "port": port}
    serve.delete(SEM_APP)
    serve.delete(INST_APP)
    serve.shutdown()


def post(url: str, data: bytes, timeout: float = 60, **kw) -> requests.Response:
    return requests.post(url + "/predict", data=data, timeout=timeout, **kw)


def png_mask(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == "PNG"
        return np.asarray(img)


# ----------------------------------------------------------------------------- metrics


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_segloop_\w+)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            out[(m[1], labels)] = out.get((m[1], labels), 0.0) + float(m[3])
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.mark.slow
def test_custom_metrics_exported(serve_urls, ray_cluster):
    """Counters/histograms reach Ray's Prometheus endpoint with the right values (deltas).

    First test of the module on purpose: no earlier request of this app can still be
    waiting for Ray's periodic export and spoil the deltas."""
    port = ray_cluster.metrics_export_port
    app = {"application": SEM_APP}

    def settled() -> dict:
        """A scrape with nothing of this app still to flush (runs first: usually nothing at all)."""
        a = scrape(port)
        if not any(dict(ls).get("application") == SEM_APP for _, ls in a):
            return a
        deadline = time.time() + 60
        while time.time() < deadline:
            time.sleep(6)
            b = scrape(port)
            if b == a:
                return b
            a = b
        return a

    before = settled()
    version = requests.get(serve_urls["sem"] + "/model", timeout=30).json()["version"]
    for i in range(3):
        assert post(serve_urls["sem"], image_bytes(40 + i)).status_code == 200
    for _ in range(2):
        assert post(serve_urls["sem"], b"not an image").status_code == 400
    assert post(serve_urls["sem"], b"").status_code == 400

    expected = {
        ("ray_segloop_predictions_total", (("status", "ok"), ("model_version", version), ("task", "semantic"))): 3,
        ("ray_segloop_predictions_total", (("status", "ok"), ("code", "200"))): 3,
        ("ray_segloop_predictions_total", (("status", "client_error"), ("code", "400"))): 3,
        ("ray_segloop_predictions_total", (("status", "server_error"),)): 0,
        ("ray_segloop_rejections_total", (("reason", "not_an_image"),)): 2,
        ("ray_segloop_rejections_total", (("reason", "empty_body"),)): 1,
        ("ray_segloop_request_latency_s_count", (("model_version", version),)): 3,
        ("ray_segloop_confidence_count", (("model_version", version),)): 3,
        ("ray_segloop_entropy_count", (("model_version", version),)): 3,
    }
    deadline = time.time() + 90
    while True:
        after = scrape(port)
        deltas = {
            k: total(after, k[0], **app, **dict(k[1])) - total(before, k[0], **app, **dict(k[1])) for k in expected
        }
        if deltas == expected or time.time() > deadline:
            break
        time.sleep(2)
    assert deltas == expected
    # one batch per sequential request (Ray estimates histogram _sum from bucket midpoints, so only counts are exact)
    batches = total(after, "ray_segloop_batch_size_count", **app) - total(before, "ray_segloop_batch_size_count", **app)
    forwards = total(after, "ray_segloop_model_latency_s_count", **app) - total(
        before, "ray_segloop_model_latency_s_count", **app
    )
    assert batches == forwards == 3
    ones = total(after, "ray_segloop_batch_size_bucket", **app, le="1.0") - total(
        before, "ray_segloop_batch_size_bucket", **app, le="1.0"
    )
    assert ones == 3
    assert total(after, "ray_segloop_confidence_bucket", **app, le="+Inf") >= 3
    # Serve's own metrics stay on
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    assert "ray_serve_num_http_requests" in text or "ray_serve_deployment_request_counter" in text


class _Recorder:
    """Stands in for a Ray counter/histogram: keeps the tags of every call."""

    def __init__(self) -> None:
        self.tags: list[dict] = []

    def inc(self, value: float, tags: dict) -> None:
        self.tags.append(tags)

    observe = inc


def test_predictions_are_labelled_by_the_http_status_returned():
    """No Ray needed: every answer's ``status`` (class) and ``code`` tags are the status the client gets."""
    from types import SimpleNamespace

    from serve_app.app import SegIngress
    from serve_app.metrics import IngressMetrics

    metrics = IngressMetrics(predictions=_Recorder(), request_latency=_Recorder(), rejections=_Recorder())
    ingress = SimpleNamespace(_metrics=metrics, _version="3", _task="semantic")
    want = {
        ("not_an_image", None): ("400", "client_error"),
        ("unauthorized", None): ("401", "client_error"),
        ("body_too_large", None): ("413", "client_error"),
        ("unsupported_format", None): ("415", "client_error"),
        ("internal", None): ("500", "server_error"),  # the model failed
        ("overloaded", None): ("503", "server_error"),  # the model queue is full
        ("overloaded", 504): ("504", "server_error"),  # the model did not answer in time
    }
    got = {}
    for reason, status in want:
        code = SegIngress.func_or_class._reject(ingress, reason, "message", status).status_code
        tags = metrics.predictions.tags[-1]
        assert str(code) == tags["code"] and (tags["model_version"], tags["task"]) == ("3", "semantic")
        got[(reason, status)] = (tags["code"], tags["status"])
    assert got == want
    assert [t["reason"] for t in metrics.rejections.tags] == [reason for reason, _ in want]
    metrics.ok("3", "semantic", 0.1)
    assert metrics.predictions.tags[-1] == {"model_version": "3", "task": "semantic", "status": "ok", "code": "200"}


# ----------------------------------------------------------------------------- semantic


def test_semantic_prediction(serve_urls, store):
    r = post(serve_urls["sem"], image_bytes(1, (80, 48)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "semantic" and body["model_version"] == store["v1"] == r.headers["X-Model-Version"]
    assert (body["width"], body["height"]) == (80, 48)
    mask = png_mask(body["mask_png_base64"])
    assert mask.shape == (48, 80) and mask.max() < 3  # upsampled back to the upload's size
    assert body["class_names"] == SEMANTIC["class_names"]
    fractions = body["class_fractions"]
    assert abs(sum(fractions.values()) - 1) < 1e-6
    counts = np.bincount(mask.ravel(), minlength=3) / mask.size
    assert np.allclose([fractions[c] for c in SEMANTIC["class_names"]], counts)
    assert 1 / 3 - 1e-6 <= body["confidence"] <= 1 and 0 <= body["entropy"] <= 1
    assert set(body["timings_ms"]) >= {"decode", "model", "total"}

    # the mask itself with Accept: image/png; the same mask through multipart
    r_png = post(serve_urls["sem"], image_bytes(1, (80, 48)), headers={"Accept": "image/png"})
    assert r_png.status_code == 200 and r_png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r_png.content))), mask)
    files = {"file": ("pet.jpg", image_bytes(1, (80, 48)), "image/jpeg")}
    r_mp = requests.post(serve_urls["sem"] + "/predict", files=files, timeout=60)
    assert r_mp.status_code == 200, r_mp.text
    assert np.array_equal(png_mask(r_mp.json()["mask_png_base64"]), mask)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"), ("WEBP", "RGB")])
def test_semantic_formats_and_modes(serve_urls, fmt, mode):
    r = post(serve_urls["sem"], image_bytes(2, (40, 56), fmt=fmt, mode=mode))
    assert r.status_code == 200, r.text
    assert png_mask(r.json()["mask_png_base64"]).shape == (56, 40)


def test_exif_orientation_applied(serve_urls):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 80x48 file shows as 48x80
    r = post(serve_urls["sem"], image_bytes(3, (80, 48), exif=exif.tobytes()))
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (48, 80)


def test_health_and_model(serve_urls, store):
    h = requests.get(serve_urls["sem"] + "/healthz", timeout=30)
    assert h.status_code == 200 and h.json() == {"status": "ok", "model_version": store["v1"]}
    m = requests.get(serve_urls["sem"] + "/model", timeout=30).json()
    assert m["name"] == SEM_MODEL and m["version"] == store["v1"] and m["task"] == "semantic"
    assert m["class_names"] == SEMANTIC["class_names"] and m["image_size"] == SEMANTIC["image_size"]


def test_concurrent_matches_sequential(serve_urls):
    images = [image_bytes(10 + i, (64, 64)) for i in range(16)]
    sequential = [post(serve_urls["sem"], b).json() for b in images]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda b: post(serve_urls["sem"], b), images))
    assert all(r.status_code == 200 for r in concurrent), [r.text for r in concurrent if r.status_code != 200]
    concurrent = [r.json() for r in concurrent]
    assert max(c["timings_ms"]["batch_size"] for c in concurrent) > 1  # requests really were batched
    for s, c in zip(sequential, concurrent):
        assert np.array_equal(png_mask(s["mask_png_base64"]), png_mask(c["mask_png_base64"]))
        assert c["confidence"] == pytest.approx(s["confidence"], abs=1e-5)
        assert c["entropy"] == pytest.approx(s["entropy"], abs=1e-5)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs() -> list[tuple[str, dict, int, str]]:
    jpeg = image_bytes(4, (64, 64))
    gif = io.BytesIO()
    Image.new("RGB", (16, 16)).save(gif, format="GIF")
    bomb = io.BytesIO()  # 600x600 = 360k pixels > MAX_PIXELS, but a tiny file
    Image.new("L", (600, 600)).save(bomb, format="PNG", optimize=True)
    return [
        ("empty", {"data": b""}, 400, "empty_body"),
        ("text", {"data": b"this is not an image at all"}, 400, "not_an_image"),
        ("truncated", {"data": jpeg[: len(jpeg) // 2]}, 400, "truncated"),
        ("header only", {"data": jpeg[:20]}, 400, "truncated"),
        ("gif", {"data": gif.getvalue()}, 415, "unsupported_format"),
        ("bomb", {"data": bomb.getvalue()}, 413, "too_many_pixels"),
        ("too large", {"data": b"\xff\xd8\xff" + bytes(MAX_BYTES)}, 413, "body_too_large"),
        ("multipart without file", {"files": {"image": ("x.jpg", jpeg, "image/jpeg")}}, 400, "empty_body"),
    ]


def test_bad_inputs_then_good(serve_urls):
    for name, kwargs, status, reason in _bad_inputs():
        r = requests.post(serve_urls["sem"] + "/predict", timeout=60, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["reason"] == reason and body["error"], (name, body)
    assert post(serve_urls["sem"], image_bytes(5)).status_code == 200


def test_overload_answers_503(serve_urls):
    """More concurrent requests than max_ongoing (16) + max_queued (16): some 503, none hang."""
    images = [image_bytes(20 + i % 4, (128, 128)) for i in range(96)]
    with ThreadPoolExecutor(96) as pool:
        responses = list(pool.map(lambda b: post(serve_urls["sem"], b, timeout=120), images))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 16
    assert all(r.json()["reason"] == "overloaded" for r in responses if r.status_code == 503)
    assert post(serve_urls["sem"], image_bytes(5)).status_code == 200


# ----------------------------------------------------------------------------- a request path no client can break


def _form(*parts: bytes, boundary: str = "B0undary") -> bytes:
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _part(name: str, data: bytes, extra: str = "", boundary: str = "B0undary") -> bytes:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + data + b"\r\n"


def test_malformed_multipart_bodies_answer_400_in_bounded_time(serve_urls):
    jpeg = image_bytes(6, (64, 64))
    ct = "multipart/form-data; boundary=B0undary"
    cases = [
        ("nested parentheses", _form(_part("x", b"1", "; c=" + "(" * 150 + ")" * 150)), ct),  # was a 500
        ("3k parts", _form(*[_part("f", b"x") for _ in range(3_000)]), ct),  # 20k: see test_body (size limit here)
        ("20k header parameters", _form(_part("file", jpeg, "".join(f"; p{i}=v" for i in range(20_000)))), ct),
        ("no boundary", _form(_part("file", jpeg)), "multipart/form-data"),
        ("truncated", _form(_part("file", jpeg))[:-30], ct),
    ]
    for name, body, content_type in cases:
        t0 = time.perf_counter()
        r = requests.post(serve_urls["sem"] + "/predict", data=body, headers={"Content-Type": content_type}, timeout=30)
        assert time.perf_counter() - t0 < 10, name
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", (name, r.status_code, r.text)
        assert r.json()["reason"] in ("bad_multipart", "empty_body") and r.json()["error"], (name, r.json())
    assert post(serve_urls["sem"], image_bytes(5)).status_code == 200


def test_slow_body_gets_408_whatever_the_timeout_header_says(serve_urls):
    """The body deadline (2 s here) holds even when the client asks Serve for no timeout at all."""
    import socket

    with socket.create_connection(("127.0.0.1", serve_urls["port"]), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n"
            b"x-request-timeout-seconds: 0\r\n\r\n\xff\xd8\xff"
        )
        t0, reply = time.perf_counter(), b""
        sock.settimeout(0.5)
        while b"\r\n\r\n" not in reply and time.perf_counter() - t0 < 20:
            try:
                sock.sendall(b"\x00" * 10)  # 20 bytes/s
                reply += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        reply += sock.recv(65536) if b"}" not in reply else b""
    elapsed = time.perf_counter() - t0
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b'"reason":"body_timeout"' in body and elapsed < 10


def test_too_large_body_sent_whole_gets_a_json_413(serve_urls):
    """Python requests writes the whole 80 MB before reading: it must see the 413, not a reset."""
    r = requests.post(serve_urls["sem"] + "/predict", data=b"\xff\xd8\xff" + bytes(80 * 2**20), timeout=120)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large", r.text[:300]
    assert post(serve_urls["sem"], image_bytes(5)).status_code == 200


# ----------------------------------------------------------------------------- instance


def test_instance_prediction_and_auth(serve_urls):
    from pycocotools import mask as mask_utils

    data = shapes_bytes(0, 96)
    assert post(serve_urls["inst"], data).status_code == 401
    r = post(serve_urls["inst"], data, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["reason"] == "unauthorized"
    r = post(serve_urls["inst"], data, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "instance" and body["model_version"].startswith("ckpt-")
    assert body["num_instances"] == len(body["instances"])
    assert 0 <= body["confidence"] <= 1 and 0 <= body["entropy"] <= 1
    if not body["instances"]:
        assert body["entropy"] == 1.0
    for inst in body["instances"]:
        assert set(inst) >= {"category_id", "category_name", "score", "bbox", "segmentation"}
        assert 1 <= inst["category_id"] < len(INSTANCE["class_names"]) and inst["score"] >= 0.05
        x, y, w, h = inst["bbox"]
        assert w >= 0 and h >= 0 and 0 <= x <= 96 and 0 <= y <= 96
        assert inst["segmentation"]["size"] == [96, 96]
        assert mask_utils.decode(inst["segmentation"]).shape == (96, 96)
    # the instance-index mask as a PNG
    r = post(serve_urls["inst"], data, headers={"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = np.asarray(Image.open(io.BytesIO(r.content)))
    assert labels.shape == (96, 96) and labels.max() <= body["num_instances"]
    # health needs no token
    assert requests.get(serve_urls["inst"] + "/healthz", timeout=30).status_code == 200


def test_a_bad_image_does_not_fail_its_batch_neighbours(serve_urls):
    """A 1 x 4000 image makes Mask R-CNN's resize fail; the images batched with it still answer."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = io.BytesIO()
    Image.new("RGB", (4000, 1), (90, 90, 90)).save(bad, format="PNG")
    bodies = [bad.getvalue()] + [shapes_bytes(i, 96) for i in range(3)]
    for _ in range(5):  # until the four land in one batch (max_batch_size 4)
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda b: post(serve_urls["inst"], b, headers=auth), bodies))
        good = [r.json() for r in responses[1:] if r.status_code == 200]
        if good and max(g["timings_ms"]["batch_size"] for g in good) == 4:
            break
    else:
        pytest.fail("the four requests never shared a batch")
    assert [r.status_code for r in responses[1:]] == [200, 200, 200], [r.text for r in responses]
    assert responses[0].status_code == 500 and responses[0].json()["reason"] == "internal"


# ----------------------------------------------------------------------------- model switching


class Stream:
    """Send requests from background threads until stopped; keep (status, version) of each."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.results, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        data = image_bytes(30 + i)
        while not self._stop.is_set():
            try:
                r = post(self.url, data, timeout=60)
                self.results.append((time.time(), r.status_code, r.headers.get("X-Model-Version")))
            except requests.RequestException as err:
                self.results.append((time.time(), repr(err), None))

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def wait_for_version(self, version: str, timeout_s: float = 90) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(v == version for *_, v in self.results[-3:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"no response with version {version} in {timeout_s}s: {self.results[-5:]}")


def test_champion_change_fails_no_request(serve_urls, store):
    """Moving the alias in MLflow: replicas follow it, no request fails, later ones name v2."""
    import mlflow

    from monitoring.serving import switch_model

    pid = requests.get(serve_urls["sem"] + "/model", timeout=30).json()["pid"]
    with Stream(serve_urls["sem"]) as stream:
        time.sleep(1)
        v2 = register_model(store["data_dir"], SEM_MODEL, SEMANTIC, seed=1, alias=None)
        mlflow.MlflowClient().set_registered_model_alias(SEM_MODEL, "champion", v2)
        stream.wait_for_version(v2)
        time.sleep(1)
        # pin version 1 explicitly, in place (declarative user_config update -> reconfigure)
        assert switch_model(f"models:/{SEM_MODEL}/{store['v1']}", SEM_APP, timeout_s=120) == store["v1"]
        stream.wait_for_version(store["v1"])
        time.sleep(1)
    statuses = [s for _, s, _ in stream.results]
    assert statuses and all(s == 200 for s in statuses), [r for r in stream.results if r[1] != 200][:5]
    versions = [v for *_, v in stream.results]
    first_v2 = versions.index(v2)
    assert versions[-1] == store["v1"] and v2 in versions and store["v1"] in versions[:first_v2]
    info = requests.get(serve_urls["sem"] + "/model", timeout=30).json()
    assert info["pid"] == pid and info["switches"] == 2  # swapped in place, never restarted
    assert info["follows"] == f"models:/{SEM_MODEL}/{store['v1']}"


# ----------------------------------------------------------------------------- autoscaling and dead replicas


def _replica_pids(app: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
    return [a.pid for a in actors if (a.class_name or "").endswith(f"ServeReplica:{app}:SegModel")]


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    return 0 if status is None else status.deployments["SegModel"].replica_states.get("RUNNING", 0)


def test_shipped_cpu_requests_fit_two_model_replicas_on_a_two_cpu_node():
    import yaml

    app = yaml.safe_load((Path(__file__).parents[1] / "serve_config.yaml").read_text())["applications"][0]
    sizes = {d["name"]: d for d in app["deployments"]}
    model = sizes["SegModel"]
    cpus = model["ray_actor_options"]["num_cpus"] * model["autoscaling_config"]["max_replicas"]
    cpus += sum(d.get("ray_actor_options", {}).get("num_cpus", 1) for name, d in sizes.items() if name != "SegModel")
    assert model["autoscaling_config"]["max_replicas"] >= 2 and cpus <= 2.0, cpus


@pytest.mark.slow
def test_model_scales_out_survives_a_kill_and_scales_back(serve_urls, store):
    """Load → 1 → 2 model replicas; kill -9 one under load → no failed request; idle → 1; kill the
    last one under load → only 200s and JSON 503s with Retry-After, never a 500."""
    import os
    import signal

    from ray import serve

    from monitoring.serving import deploy
    from serve_app.config import AppArgs

    app = "segloop-scale"
    args = AppArgs(
        data_dir=str(store["data_dir"]),
        model={"model_uri": f"models:/{SEM_MODEL}@champion", "poll_interval_s": 0, "max_batch_size": 4},
        model_autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
        model_num_cpus=0.75,
        ingress_num_cpus=0,
        capture=None,
    )
    deploy(args, app, "/scale", http_options={"host": "127.0.0.1", "port": serve_urls["port"]})
    url = serve_urls["sem"] + "/scale"
    try:
        assert _running_replicas(app) == 1
        with Stream(url, threads=8) as stream:
            wait_for(lambda: _running_replicas(app) == 2, 120, "a second model replica under load")
            time.sleep(2)
            os.kill(_replica_pids(app)[0], signal.SIGKILL)
            time.sleep(8)
        codes = [code for _, code, _ in stream.results]
        assert codes and set(codes) == {200}, [c for c in codes if c != 200][:5]
        wait_for(lambda: _running_replicas(app) == 1 and len(_replica_pids(app)) == 1, 120, "scale-in to one replica")
        answers: list[requests.Response] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                answers.append(post(url, image_bytes(7), timeout=90))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1)
        os.kill(_replica_pids(app)[0], signal.SIGKILL)
        time.sleep(6)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert {r.status_code for r in answers} <= {200, 503}, [(r.status_code, r.text[:200]) for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert r.json()["reason"] in ("model_unavailable", "overloaded") and r.headers["Retry-After"]
    finally:
        serve.delete(app)


@pytest.mark.slow
def test_fused_topology_answers_like_the_split_one(serve_urls, store):
    """topology: fused (one deployment, HTTP in the model replica): same answers, same error contract."""
    from ray import serve

    from monitoring.serving import deploy
    from serve_app.config import AppArgs

    app = "segloop-fused"
    image = image_bytes(11, (64, 64))
    split = post(serve_urls["sem"], image).json()  # pinned to the version the split app serves now
    args = AppArgs(
        data_dir=str(store["data_dir"]),
        topology="fused",
        model={"model_uri": f"models:/{SEM_MODEL}/{split['model_version']}", "poll_interval_s": 0, "max_batch_size": 4},
        model_num_replicas=1,
        model_num_cpus=0.5,
        max_body_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
        capture=None,
    )
    deploy(args, app, "/fused", http_options={"host": "127.0.0.1", "port": serve_urls["port"]})
    url = serve_urls["sem"] + "/fused"
    try:
        fused = post(url, image)
        assert fused.status_code == 200, fused.text
        assert fused.json()["model_version"] == split["model_version"]
        assert np.array_equal(png_mask(fused.json()["mask_png_base64"]), png_mask(split["mask_png_base64"]))
        info = requests.get(url + "/model", timeout=30).json()
        assert info["version"] == split["model_version"] and info["ready"]
        assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
        for name, kwargs, status, reason in _bad_inputs():
            r = requests.post(url + "/predict", timeout=60, **kwargs)
            assert (r.status_code, r.json()["reason"]) == (status, reason), (name, r.text)
    finally:
        serve.delete(app)
