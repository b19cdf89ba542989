"""Serving benchmark: this Serve app vs a one-request-at-a-time Flask server vs the in-process limit.

All run the same model (same weights, loaded with ``serve_app.model.load_model``) on the same
JPEG images and do the same work per image: decode, eval transforms, forward, mask upsampling,
PNG/base64 and JSON. They run one after another so they never share the CPU.

* **serve ...**: ``serve_app`` with ``serve_config.yaml``'s args (limits, timeouts, capture on,
  bearer auth, metrics) on a local Ray instance, in four variants, each in its own process and
  Ray instance: the *split* (HTTP deployment + model deployment) and *fused* (one deployment)
  topologies, each behind Ray's Python proxy and behind HAProxy with direct ingress
  (``segloop.settings.SERVE_FAST_PATH_ENV``).
* **flask**: the original design, a single-threaded Flask server (``threaded=False``) that
  predicts each request alone (batch of 1) - a subprocess, same HTTP clients.
* **in-process**: decode + batched forward + postprocess in a loop, no HTTP (the limit).

    python bench/serve.py --requests 200 --rounds 3 --concurrency 1,8,32

Each row also gives the busy CPU time of the whole machine per answered image ("CPU ms/img"):
with every core busy, throughput = cores / CPU per image, so that column says where a system
loses to another; for Serve it is split by process (HAProxy, Python proxy, ingress replica,
model replicas, the HTTP client, and the rest of the machine).

On a CPU the Serve app runs ``--replicas`` model replicas with ``--serve-threads`` torch threads each
(default 2 x 1: on 2 cores two single-threaded replicas beat one two-threaded replica); Flask and
the in-process loop use ``--threads`` (default: all cores).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from segloop.simcluster import free_port  # noqa: E402 - after the path setup above

# ----------------------------------------------------------------------------- setup


def make_checkpoint(model_name: str, image_size: int, out: Path, seed: int = 0) -> Path:
    """An untrained model in train/loop.py's checkpoint format (no downloads, no MLflow)."""
    import torch

    from train.models import build_model, model_task

    task = model_task(model_name)
    classes = ["background", "pet", "border"] if task == "semantic" else ["background", "ball", "box", "tri"]
    kwargs = (
        {} if task == "semantic" else {"min_size": image_size, "max_size": image_size, "box_detections_per_img": 20}
    )
    torch.manual_seed(seed)
    model = build_model(model_name, len(classes), **kwargs)
    path = out / "bench_model.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "config": {"model": model_name, "task": task, "image_size": image_size, "model_kwargs": kwargs},
            "num_classes": len(classes),
            "class_names": classes,
        },
        path,
    )
    return path


def make_images(n: int, size: int) -> list[bytes]:
    from train.data.synth import render_pet

    out = []
    for i in range(n):
        img, _ = render_pet(1000 + i, size)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def settings(checkpoint: Path, batch: int, threads: int, wait_s: float):
    from serve_app.config import ModelSettings

    return ModelSettings(
        model_uri=f"checkpoint:{checkpoint}",
        poll_interval_s=0,
        max_batch_size=batch,
        batch_wait_timeout_s=wait_s,
        torch_threads=threads,
    )


def machine_info() -> dict[str, str]:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "gpu": gpu,
        "torch": torch.__version__,
        "load_1min": f"{load:.1f}",
    }


# ----------------------------------------------------------------------------- load generation


def cpu_busy_s() -> float:
    """Machine-wide busy CPU seconds so far (every process: server, proxy, replicas, client, Ray)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


LAYERS = ("haproxy", "proxy", "ingress", "model", "client", "other")


def _layer(proc, me: int) -> str:
    if proc.pid == me:
        return "client"
    name = proc.info.get("name") or ""
    cmd = " ".join(proc.info.get("cmdline") or [])
    if "haproxy" in name:
        return "haproxy"
    for layer, marker in (("proxy", "ProxyActor"), ("ingress", "SegIngress"), ("model", "SegModel")):
        if marker in cmd or marker in name:
            return layer
    return "other"


def layer_cpu() -> dict[int, tuple[str, float]]:
    """Busy CPU seconds of every process, by serving layer (Ray titles its workers ray::<actor>)."""
    import psutil

    me, out = os.getpid(), {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        t = proc.info.get("cpu_times")
        if t is not None:
            out[proc.pid] = (_layer(proc, me), t.user + t.system)
    return out


def layer_ms(before: dict, after: dict, total_s: float, n: int) -> dict[str, float]:
    """CPU ms per answered image by layer; 'other' is the rest of the machine (Ray, kernel, idle work)."""
    sums = dict.fromkeys(LAYERS, 0.0)
    for pid, (layer, cpu) in after.items():
        sums[layer] += cpu - before.get(pid, (layer, 0.0))[1]
    sums["other"] = max(total_s - sum(v for k, v in sums.items() if k != "other"), 0.0)
    return {k: v * 1000 / max(n, 1) for k, v in sums.items()}


def summarize(latencies: list[float], wall_s: float, errors: int, cpu_s: float = float("nan")) -> dict[str, float]:
    lat = np.asarray(latencies) * 1000
    return {
        "n": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / wall_s if wall_s > 0 else float("nan"),
        # CPU time the whole machine spent per answered request: less noisy than img/s on a
        # shared VM and shows what each serving layer costs.
        "cpu_ms": cpu_s * 1000 / len(latencies) if latencies else float("nan"),
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def drive_http(
    url: str, images: list[bytes], requests_n: int, concurrency: int, headers: dict | None = None, layers: bool = False
) -> dict:
    """``concurrency`` closed-loop clients send ``requests_n`` requests in total."""
    import requests

    counter = iter(range(requests_n))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    local = threading.local()

    def worker() -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            r = session.post(url, data=images[i % len(images)], headers=headers or {}, timeout=300)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code == 200:
                    latencies.append(dt)
                else:
                    errors[0] += 1

    snapshot = layer_cpu() if layers else {}
    t0, c0 = time.perf_counter(), cpu_busy_s()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    result = summarize(latencies, time.perf_counter() - t0, errors[0], cpu_busy_s() - c0)
    if layers:
        result["layers"] = layer_ms(snapshot, layer_cpu(), cpu_busy_s() - c0, len(latencies))
    return result


def median_run(run, rounds: int) -> dict:
    """Run a cell ``rounds`` times and keep the run with the median throughput (shared VMs are noisy)."""
    runs = sorted((run() for _ in range(max(rounds, 1))), key=lambda r: r["throughput"])
    return runs[len(runs) // 2]


def _in_process_loop(checkpoint: Path, images: list[bytes], requests_n: int, batch: int, threads: int, start=None):
    """Decode + batched forward + JSON fields in a loop; returns (latencies, wall_s)."""
    import torch

    from serve_app.imaging import ImageLimits
    from serve_app.model import load_model, predict_bytes

    torch.set_num_threads(threads)
    lm = load_model(settings(checkpoint, batch, threads, 0))
    limits = ImageLimits()
    for _ in range(2):  # warm-up
        predict_bytes(lm, images[:batch], limits)
    if start is not None:
        start.wait()
    latencies: list[float] = []
    t0, done = time.perf_counter(), 0
    while done < requests_n:
        chunk = [images[(done + k) % len(images)] for k in range(min(batch, requests_n - done))]
        t1 = time.perf_counter()
        for r in predict_bytes(lm, chunk, limits):
            json.dumps(r)
        latencies += [time.perf_counter() - t1] * len(chunk)  # every image of a batch is done when the batch is
        done += len(chunk)
    return latencies, time.perf_counter() - t0


def _in_process_worker(checkpoint, images, requests_n, batch, start, out) -> None:
    out.put(_in_process_loop(checkpoint, images, requests_n, batch, 1, start))


def bench_in_process(
    checkpoint: Path, images: list[bytes], requests_n: int, batch: int, threads: int, procs: int = 1
) -> dict:
    """The limit without HTTP: one process with ``threads`` torch threads, or ``procs`` processes x 1
    thread started together (how the Serve app uses the cores: one single-threaded replica per core)."""
    if procs == 1:
        c0 = cpu_busy_s()
        latencies, wall = _in_process_loop(checkpoint, images, requests_n, batch, threads)
        return summarize(latencies, wall, 0, cpu_busy_s() - c0)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [
        ctx.Process(target=_in_process_worker, args=(checkpoint, images, requests_n // procs, batch, start, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    start.wait()
    t0, c0 = time.perf_counter(), cpu_busy_s()
    parts = [out.get() for _ in workers]
    wall, cpu = time.perf_counter() - t0, cpu_busy_s() - c0
    for w in workers:
        w.join()
    return summarize([x for lat, _ in parts for x in lat], wall, 0, cpu)


# ----------------------------------------------------------------------------- flask (the original design)


def flask_server(checkpoint: str, port: int, threads: int) -> None:
    """One request at a time, batch of one: what segloop served with before Ray Serve."""
    import torch
    from flask import Flask, Response, request

    from serve_app.imaging import ImageLimits, ImageRejected, decode_image
    from serve_app.model import load_model, run_batch

    torch.set_num_threads(threads)
    lm = load_model(settings(Path(checkpoint), 1, threads, 0))
    limits = ImageLimits()
    app = Flask("segloop-flask")

    @app.post("/predict")
    def predict():  # noqa: ANN202
        try:
            image = decode_image(request.get_data(), limits)
        except ImageRejected as err:
            return Response(json.dumps(err.to_json()), err.status, mimetype="application/json")
        results, _ = run_batch(lm, [image])
        return Response(json.dumps(results[0]), 200, mimetype="application/json")

    @app.get("/healthz")
    def healthz():  # noqa: ANN202
        return {"status": "ok"}

    app.run(host="127.0.0.1", port=port, threaded=False, processes=1)


def start_flask(checkpoint: Path, threads: int) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--flask-server", str(checkpoint), "--port", str(port), "--threads", str(threads)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url + "/predict"
        except requests.RequestException:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("flask server did not start")


# ----------------------------------------------------------------------------- serve


# Serve variants measured in one run: topology x HTTP path. Each runs in its own process and Ray
# instance, because Ray reads the fast-path settings when its processes start.
SERVE_VARIANTS = {
    "serve split": ("split", False),
    "serve split+haproxy": ("split", True),  # + gRPC handles: segloop's default (SERVE_FAST_PATH_ENV)
    "serve fused": ("fused", False),
    "serve fused+haproxy": ("fused", True),
}
TOKEN = "bench-token"  # auth on, as a user exposing the endpoint runs it


def variant_env(haproxy: bool) -> dict[str, str]:
    from segloop.settings import SERVE_FAST_PATH_ENV, use_serve_fast_path

    env = {k: v for k, v in os.environ.items() if k not in SERVE_FAST_PATH_ENV}
    if haproxy:
        use_serve_fast_path(env)
    return env


def shipped_args(checkpoint: Path, args: argparse.Namespace, topology: str, data_dir: Path):
    """serve_config.yaml's app args (limits, timeouts, capture, sizing), with the bench's model."""
    import yaml

    from serve_app.config import AppArgs

    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    model = settings(checkpoint, args.batch, args.serve_threads or args.threads, args.wait_ms / 1000).model_dump()
    deployments = {d["name"]: d for d in app.get("deployments", [])}
    model_cpus = deployments.get("SegModel", {}).get("ray_actor_options", {}).get("num_cpus", 1)
    return AppArgs.model_validate(
        {
            **app["args"],
            "data_dir": str(data_dir),
            "model": model,
            "topology": topology,
            "model_num_replicas": args.replicas,
            "model_num_cpus": model_cpus,
            "auth_token": TOKEN,
            "auth_token_env": None,
            "model_max_ongoing_requests": max(args.batch, 16),
            "model_max_queued_requests": max(4 * max(args.concurrency_list), 64),
        }
    )


def serve_worker(args: argparse.Namespace) -> int:
    """One Serve variant (in its own process): deploy, warm up, drive every concurrency, print JSON."""
    import ray
    from ray import serve

    from monitoring.serving import deploy

    topology = SERVE_VARIANTS[args.serve_variant][0]
    images = make_images(args.images, args.source_size)
    tmp = Path(tempfile.mkdtemp(prefix="segloop-bench-serve-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    deploy(
        shipped_args(Path(args.checkpoint), args, topology, tmp),
        "segloop-bench",
        "/",
        http_options={"host": "127.0.0.1", "port": port},
        timeout_s=240,
    )
    url, headers = f"http://127.0.0.1:{port}/predict", {"Authorization": f"Bearer {TOKEN}"}
    out = {}
    try:
        drive_http(url, images, max(args.batch * 4, 16), max(args.concurrency_list), headers)
        for c in args.concurrency_list:
            out[c] = median_run(
                lambda c=c: drive_http(url, images, args.requests, c, headers, layers=True), args.rounds
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    print("RESULT " + json.dumps(out))
    return 0


def run_serve_variant(name: str, checkpoint: Path, argv: list[str]) -> dict:
    haproxy = SERVE_VARIANTS[name][1]
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--serve-variant", name, "--checkpoint", str(checkpoint)],
        env=variant_env(haproxy),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return {int(c): r for c, r in json.loads(lines[-1][7:]).items()}


# ----------------------------------------------------------------------------- report


def table(info: dict, results: dict, concurrency: list[int], batch: int, args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}, torch {info['torch']}, "
        f"1-min load before the run: {info['load_1min']}",
        f"Model: {args.model} (untrained), input {args.image_size}px, uploads {args.source_size}px JPEG, "
        f"{args.requests} requests per cell (median of {args.rounds} rounds), torch threads {args.threads} "
        f"(serve: {args.replicas} model replicas x {args.serve_threads or args.threads} threads; serve_config.yaml's "
        f"args, bearer auth, capture and metrics on), max batch {batch}",
        "",
        "| system | concurrency | throughput (img/s) | p50 (ms) | p95 (ms) | p99 (ms) | CPU ms/img | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (system, c), r in results.items():
        lines.append(
            f"| {system} | {c} | {r['throughput']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
            f"{r['cpu_ms']:.1f} | {r['errors']} |"
        )
    layered = [(k, r) for k, r in results.items() if "layers" in r]
    if layered:
        lines += ["", "CPU ms per image by layer (busy CPU of each process over the cell / images answered):", ""]
        lines += ["| system | concurrency | " + " | ".join(LAYERS) + " |", "|---|---:|" + "---:|" * len(LAYERS)]
        for (system, c), r in layered:
            lines.append(f"| {system} | {c} | " + " | ".join(f"{r['layers'][k]:.1f}" for k in LAYERS) + " |")
    lines += ["", *ratios(results, concurrency, batch)]
    return "\n".join(lines)


def ratios(results: dict, concurrency: list[int], batch: int) -> list[str]:
    """Each Serve variant against the Flask design and the in-process limit, at every concurrency."""
    limits = [r for (system, how), r in results.items() if system == "in-process (batched)" and how != "batch 1"]
    limit = max(limits, key=lambda r: r["throughput"]) if limits else None  # the faster way to use the cores
    out = []
    for name in SERVE_VARIANTS:
        for c in concurrency:
            s, f = results.get((name, c)), results.get(("flask", c))
            if not s:
                continue
            parts = []
            if f:
                r = s["throughput"] / f["throughput"]
                parts.append(
                    f"/flask = {r:.2f}" + (f" (target >= 1.3: {'met' if r >= 1.3 else 'NOT met'})" if c == 8 else "")
                )
            if limit:
                r = s["throughput"] / limit["throughput"]
                parts.append(
                    f"/in-process = {r:.2f}"
                    + (f" (target >= 0.9: {'met' if r >= 0.9 else 'NOT met'})" if c == 8 else "")
                )
            out.append(f"- {name} at concurrency {c}: " + ", ".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="requests per (system, concurrency) cell")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--model", default="lraspp_mobilenet_v3_large")
    p.add_argument("--image-size", type=int, default=256, help="model input size (semantic resize)")
    p.add_argument("--source-size", type=int, default=256, help="size of the uploaded JPEGs")
    p.add_argument("--batch", type=int, default=8, help="max batch size (serve and in-process)")
    p.add_argument("--wait-ms", type=float, default=5.0, help="serve batch_wait_timeout_s in ms")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads everywhere")
    p.add_argument("--replicas", type=int, default=2, help="serve: model replicas")
    p.add_argument("--serve-threads", type=int, default=1, help="serve: torch threads per replica (0 = --threads)")
    p.add_argument("--systems", default="in-process,flask," + ",".join(SERVE_VARIANTS))
    p.add_argument("--rounds", type=int, default=1, help="run every cell this often and report the median")
    p.add_argument("--images", type=int, default=32, help="distinct images cycled through")
    p.add_argument("--checkpoint", help="use this segloop checkpoint instead of an untrained model")
    p.add_argument("--flask-server", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("--serve-variant", choices=list(SERVE_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c]
    if args.flask_server:
        flask_server(args.flask_server, args.port, args.threads)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.serve_variant:
        return serve_worker(args)

    concurrency = args.concurrency_list
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"in-process", "flask", *SERVE_VARIANTS}
    if unknown:
        p.error(f"unknown --systems {sorted(unknown)}; choose from in-process, flask, {', '.join(SERVE_VARIANTS)}")
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="segloop-bench-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.model, args.image_size, tmp)
    images = make_images(args.images, args.source_size)
    warm = max(args.batch * 2, 8)
    results: dict = {}

    if "in-process" in systems:
        print("in-process ...", file=sys.stderr, flush=True)
        results[("in-process (batched)", f"batch {args.batch}")] = median_run(
            lambda: bench_in_process(checkpoint, images, args.requests, args.batch, args.threads), args.rounds
        )
        results[("in-process (batched)", f"batch {args.batch}, {args.replicas} procs x 1 thread")] = median_run(
            lambda: bench_in_process(checkpoint, images, args.requests, args.batch, 1, args.replicas), args.rounds
        )
        results[("in-process (batched)", "batch 1")] = median_run(
            lambda: bench_in_process(checkpoint, images, max(args.requests // 2, 1), 1, args.threads), args.rounds
        )
    if "flask" in systems:
        print("flask ...", file=sys.stderr, flush=True)
        proc, url = start_flask(checkpoint, args.threads)
        try:
            drive_http(url, images, warm, 1)
            for c in concurrency:
                results[("flask", c)] = median_run(lambda c=c: drive_http(url, images, args.requests, c), args.rounds)
        finally:
            proc.kill()
            proc.wait()
    passthrough = _drop_values(argv, ("--systems", "--checkpoint"))
    for name in SERVE_VARIANTS:
        if name in systems:
            print(f"{name} ...", file=sys.stderr, flush=True)
            for c, r in run_serve_variant(name, checkpoint, passthrough).items():
                results[(name, c)] = r
    print(table(info, results, concurrency, args.batch, args))
    return 0


def _drop_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without ``options`` and their values (``--x v`` or ``--x=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
