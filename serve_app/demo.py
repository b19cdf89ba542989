"""``make demo``: the whole loop on the embedded default, narrated step by step.

    .venv/bin/python -m serve_app.demo --data-dir .segloop/demo [--size 64 --n 160 --epochs 8] [--stay -1]

Local Ray (dashboard on 127.0.0.1), MLflow on ``<data-dir>/mlflow.db``, the object store in
``<data-dir>/store``. Steps: generate data -> dataset version -> train v1 (Ray Train) ->
serve v1 -> normal traffic -> shifted traffic -> the monitoring actor's alert fires and
switches capture on -> a simulated annotator labels the most uncertain captures from the
generator's ground truth -> new dataset version -> the actor submits retraining as a Ray
job -> v2 is compared with v1 on the same held-out data and promoted -> Serve follows the
alias -> confidence on shifted traffic recovers. Ends with a summary table and the URLs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODEL = "segloop-pets"
APP = "segloop"


def say(step: str, text: str = "") -> None:
    print(f"\n=== {step} ===" + (f"\n{text}" if text else ""), flush=True)


class Traffic:
    """Sends images to /predict and keeps every outcome (failed requests are counted, never hidden)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed = 0

    def send(self, paths: list[Path], concurrency: int = 4) -> list[dict[str, Any]]:
        import requests

        def one(p: Path) -> dict[str, Any] | None:
            try:
                r = requests.post(self.url + "/predict", data=p.read_bytes(), timeout=120)
            except requests.RequestException:
                return None
            return r.json() if r.status_code == 200 else None

        with ThreadPoolExecutor(concurrency) as pool:
            out = list(pool.map(one, paths))
        self.sent += len(out)
        self.failed += sum(o is None for o in out)
        return [o for o in out if o is not None]

    def send_bad(self, good: Path) -> list[tuple[int, str]]:
        """Malformed uploads: each is refused with a status and a named reason (not a failed request)."""
        import requests

        bodies = [b"", b"this is not an image", good.read_bytes()[:200]]
        out = []
        for body in bodies:
            r = requests.post(self.url + "/predict", data=body, timeout=60)
            is_json = r.headers.get("content-type", "").startswith("application/json")
            out.append((r.status_code, r.json().get("reason", "?") if is_json else r.text[:80]))
        return out


def mean(results: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in results) if results else float("nan")


def images(root: Path, split: str) -> list[Path]:
    names = [ln.split()[0] for ln in (root / "annotations" / f"{split}.txt").read_text().splitlines() if ln.strip()]
    return [root / "images" / f"{n}.jpg" for n in names]


def wait_until(pred, timeout_s: float, every_s: float = 2.0, tick=None) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if tick:
            tick()
        if pred():
            return True
        time.sleep(every_s)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_app.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=".segloop/demo", help="wiped and recreated: the demo's own directory")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=160, help="default-style training images")
    p.add_argument("--shift-n", type=int, default=160, help="shifted-style images used as traffic")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--annotate", type=int, default=48, help="top-entropy captures sent to the annotator")
    p.add_argument("--timeout", type=float, default=900, help="give up waiting for the retraining after this")
    p.add_argument("--stay", type=float, default=0, metavar="SECONDS",
                   help="keep Ray, Serve and the monitoring actor up this long after the summary to look around "
                        "in the dashboards (-1: until Ctrl-C); everything stops when the demo exits")
    args = p.parse_args(argv)
    t_start = time.time()
    data = Path(args.data_dir).resolve()
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    os.environ["SEGLOOP_STORE"] = str(data / "store")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import requests

    from serve_app import monitor as mon
    from serve_app.app import deploy, set_capture_policy
    from serve_app.config import AppArgs
    from train import registry, tracking
    from train.config import TrainConfig, dump_config
    from train.data.synth import generate_pets
    from train.job import run
    from train.queue import import_annotations, list_captures, simulate_annotation, truth_from_dataset
    from train.store import store_from_env
    from train.versions import create_version, latest_version

    say("1. generate data", f"default-style pets ({args.n}) and shifted-style pets ({args.shift_n}) in {data / 'data'}")
    pets = generate_pets(data / "data" / "pets", n=args.n, seed=0, size=args.size)
    shifted = generate_pets(data / "data" / "pets_shift", n=args.shift_n, seed=1, size=args.size, shift=True)
    store = store_from_env()
    v0 = create_version(store, "pets", pets, "semantic")
    print(f"dataset version pets@{v0.version}: {sum(len(s) for s in v0.splits.values())} samples, store {store.describe()}")

    say("2. start Ray", "local cluster, dashboard on 127.0.0.1")
    ctx = ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", namespace=mon.NAMESPACE,
                   log_to_driver=False)
    dashboard = ctx.dashboard_url if ctx.dashboard_url.startswith("http") else f"http://{ctx.dashboard_url}"

    train_cfg = dict(task="semantic", dataset_version=v0.version, dataset_name="pets", image_size=args.size,
                     epochs=args.epochs, batch_size=8, lr=0.01, bn_momentum=0.1, num_workers=2, patience=0,
                     data_dir=str(data), experiment="segloop-demo", registered_model=MODEL)
    say("3. train v1 with Ray Train (2 workers), track in MLflow, register")
    v1 = run(TrainConfig(**train_cfg))
    print(f"v{v1.model_version}: held-out mIoU {v1.holdout['val_miou']:.3f} -> {v1.reason}")
    retrain_yaml = data / "retrain.yaml"
    dump_config(TrainConfig(**{**train_cfg, "dataset_version": v0.version}), retrain_yaml)

    say("4. serve v1 with Ray Serve", "replicas follow models:/segloop-pets@champion (polled every 2 s)")
    port = 8000
    deploy(AppArgs(data_dir=str(data), model={"model_uri": f"models:/{MODEL}@champion", "poll_interval_s": 2},
                   model_num_replicas=1, capture={"policy": {"mode": "off"}, "policy_poll_s": 2}),
           APP, "/", http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    traffic = Traffic(url)

    say("5. normal traffic", "default-style held-out images")
    normal = traffic.send(images(pets, "test") * 2)
    base_conf, base_ent = mean(normal, "confidence"), mean(normal, "entropy")
    print(f"{len(normal)} predictions by v{normal[0]['model_version']}: mean confidence {base_conf:.3f}, "
          f"mean entropy {base_ent:.3f}")
    refused = traffic.send_bad(images(pets, "test")[0])
    print("bad uploads are refused, each with its reason, and serving goes on: "
          + ", ".join(f"{code} {reason}" for code, reason in refused))

    say("6. the monitoring actor", "rules calibrated on the normal traffic: alert when mean confidence drops "
        "0.05 below it or mean entropy rises 0.05 above it; on alert capture images more uncertain than normal traffic")
    rules = [{"name": "low_confidence", "signal": "mean_confidence", "op": "<", "threshold": round(base_conf - 0.05, 4),
              "window_s": 20, "for_s": 4, "hysteresis": 0.02, "cooldown_s": 3600},
             {"name": "high_entropy", "signal": "mean_entropy", "op": ">", "threshold": round(base_ent + 0.05, 4),
              "window_s": 20, "for_s": 4, "hysteresis": 0.02, "cooldown_s": 3600}]
    monitor = mon.start({
        "interval_s": 2, "rules": rules, "app_name": APP, "dataset_name": "pets",
        "capture_on_alert": {"mode": "entropy", "threshold": round(base_ent, 4)},
        "min_new_samples": args.annotate, "train_config": str(retrain_yaml), "registered_model": MODEL,
        "data_dir": str(data), "dashboard_url": dashboard,
    }, restart=True)
    status = lambda: ray.get(monitor.status.remote())  # noqa: E731
    time.sleep(6)  # the actor's first read sets its baseline

    say("7. shifted traffic (drift)", "the generator's --shift style: other colours and textures")
    shift_imgs = images(shifted, "trainval") + images(shifted, "test")
    drift: list[dict] = []
    fired = wait_until(lambda: bool(status()["firing"]), 180, every_s=1,
                       tick=lambda: drift.extend(traffic.send(shift_imgs[:24])))
    print(f"mean confidence on shifted traffic {mean(drift, 'confidence'):.3f} (normal {base_conf:.3f}); "
          f"alert {'FIRED: ' + ', '.join(status()['firing']) if fired else 'did not fire'}")
    if not fired:
        set_capture_policy({"mode": "entropy", "threshold": round(base_ent, 4)}, store=store)
        print("(switching capture on by hand so the demo can go on)")
    print(f"capture policy now: {status()['capture']}")

    say("8. collect", "shifted traffic continues; uncertain images go to the object store")
    def unique_captures() -> list:
        seen: set[str] = set()
        return [c for c in list_captures(store) if not (c.meta.get("image_sha256") in seen
                                                         or seen.add(c.meta.get("image_sha256")))]

    wait_until(lambda: len(unique_captures()) >= args.annotate + 16, 300, every_s=1,
               tick=lambda: traffic.send(shift_imgs))
    caps = list_captures(store)
    print(f"{len(caps)} captures; top entropy {caps[0].entropy:.3f}, lowest {caps[-1].entropy:.3f}")

    say("9. annotate and version", f"a simulated annotator labels the top {args.annotate} captures "
        "(ground truth from the generator); 16 more go to the held-out split")
    truth = truth_from_dataset(shifted)
    unique = unique_captures()  # the same image sent twice is annotated once
    test_dir = simulate_annotation(store, unique[args.annotate:args.annotate + 16], truth, data / "annot_test")
    v_test = import_annotations(store, "pets", v0.version, test_dir, split="test")
    train_dir = simulate_annotation(store, unique[:args.annotate], truth, data / "annot_train")
    v_new = import_annotations(store, "pets", v_test.version, train_dir, split="trainval")
    print(f"pets@{v_new.version} (parent {v_new.parent}): {sum(len(s) for s in v_new.splits.values())} samples; "
          f"latest is {latest_version(store, 'pets').version}")

    say("10. retrain", "the monitoring actor sees >= min_new_samples new samples and submits a Ray job")
    ok = wait_until(lambda: any(j["status"] in ("SUCCEEDED", "FAILED", "STOPPED") for j in status()["jobs"]),
                    args.timeout, every_s=5)
    jobs = status()["jobs"]
    for j in jobs:
        print(f"job {j['id']}: {j['status']} on pets@{j['dataset_version']} ({j['reason']})")
    if not ok:
        print("the retraining job did not finish in time; see the Ray dashboard")

    say("11. promote and switch")
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(data))
    champion = registry.champion_version(MODEL)
    latest = max(mlflow.MlflowClient().search_model_versions(f"name='{MODEL}'"), key=lambda m: int(m.version))
    print(f"v{latest.version}: {latest.tags.get('segloop.decision')} — {latest.tags.get('segloop.reason')}")
    switched = wait_until(lambda: requests.get(url + "/model", timeout=30).json().get("version") == champion, 60)
    print(f"Serve answers with v{requests.get(url + '/model', timeout=30).json().get('version')} (champion v{champion})"
          + ("" if switched else " — not switched yet"))

    say("12. shifted traffic after retraining")
    after = traffic.send(images(shifted, "test"))
    before_same = [r for r in drift][: len(after)]
    ray.get(monitor.stop.remote())

    say("summary")
    rows = [
        ("held-out score (same data)", latest.tags.get("segloop.champion_score", "-"), latest.tags.get("segloop.challenger_score", "-")),
        ("mean confidence, shifted traffic", f"{mean(before_same, 'confidence'):.3f}", f"{mean(after, 'confidence'):.3f}"),
        ("mean entropy, shifted traffic", f"{mean(before_same, 'entropy'):.3f}", f"{mean(after, 'entropy'):.3f}"),
    ]
    print(f"| | v{v1.model_version} | v{latest.version} |\n| --- | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    print(f"\nrequests served: {traffic.sent}, failed requests: {traffic.failed}, "
          f"champion: v{champion}, wall time {time.time() - t_start:.0f}s")
    print(f"Ray dashboard: {dashboard}\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri(data)} "
          f"--host 127.0.0.1  (then http://127.0.0.1:5000)\nServe: {url}/predict")
    if args.stay:
        print("staying up " + ("until Ctrl-C" if args.stay < 0 else f"for {args.stay:.0f}s") + "; then Ray stops", flush=True)
        try:
            time.sleep(args.stay if args.stay >= 0 else 10**9)
        except KeyboardInterrupt:
            pass
    else:
        print("(the demo's Ray cluster stops now; `--stay -1` keeps it up until Ctrl-C)")
    return 0 if traffic.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
