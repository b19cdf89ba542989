"""``make demo``: the whole loop on the embedded default, narrated step by step.

    segloop demo [--task pets|coco] --data-dir .segloop/demo [--size 64 --n 160 --epochs 8] [--stay -1]

Local Ray (dashboard on 127.0.0.1), MLflow on ``<data-dir>/mlflow.db``, the object store in
``<data-dir>/store``. Steps: generate data -> dataset version -> train v1 (Ray Train) ->
serve v1 -> normal traffic -> shifted traffic -> the monitoring actor's alert fires and
switches capture on -> the annotation queue picks a batch (a selection strategy over
uncertainty and embeddings) and a simulated annotator labels it from the generator's ground
truth -> new dataset version -> the actor submits retraining as a Ray
job -> v2 is compared with v1 on the same held-out data and promoted -> Serve follows the
alias -> confidence on shifted traffic recovers. Ends with a summary table and the URLs.
``--task coco`` runs the same loop for instance segmentation (:mod:`segloop.demo_tasks`).
``--label-studio [URL]`` sends the batch to Label Studio instead (a local server from
``.venv-labelstudio`` unless a URL is given): a person annotates it there, or
``--simulate-annotator`` submits the ground truth through Label Studio's API, and the
monitoring actor pulls the finished annotations into the new version itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane.annotation.selection import DEFAULT_STRATEGY, STRATEGIES
from segloop.demo_tasks import TASKS, DemoTask, demo_task
from segloop.errors import SegloopError, StoreError, exit_code

APP = "segloop"


_T0 = [time.time()]  # when the demo started; each step's header says how long it has run


def say(step: str, text: str = "") -> None:
    m, sec = divmod(int(time.time() - _T0[0]), 60)
    print(f"\n=== {step} === [{m}:{sec:02d}]" + (f"\n{text}" if text else ""), flush=True)


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


def wait_until(pred, timeout_s: float, every_s: float = 2.0, tick=None) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if tick:
            tick()
        if pred():
            return True
        time.sleep(every_s)
    return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="segloop demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="pets",
        help="pets: semantic segmentation (Oxford-IIIT Pet trimaps); coco: instance segmentation (COCO8-seg "
        "layout, Mask R-CNN)",
    )
    p.add_argument("--data-dir", default=".segloop/demo", help="wiped and recreated: the demo's own directory")
    p.add_argument("--size", type=int, help="image size (pets 64, coco 96)")
    p.add_argument("--n", type=int, help="default-style images, train and held-out (pets 160, coco 160)")
    p.add_argument("--shift-n", type=int, help="shifted-style images used as traffic (pets 160, coco 128)")
    p.add_argument(
        "--epochs",
        type=int,
        help="training epochs of v1 (pets 12, coco 10; coco's retraining fine-tunes v1 for half as many)",
    )
    p.add_argument("--annotate", type=int, help="captures sent to the (simulated) annotator (48)")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=DEFAULT_STRATEGY,
        help="how the annotation queue picks them (bench/label_efficiency.py measures the choices)",
    )
    p.add_argument("--timeout", type=float, default=900, help="give up waiting for the retraining after this")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on a simulated two-node cluster that shares no disk: a num_cpus=0 head and a node in its "
        "own mount namespace (root), an S3 server and a real MLflow server (make demo-cluster)",
    )
    p.add_argument(
        "--label-studio",
        nargs="?",
        const="local",
        metavar="URL",
        help="annotate in Label Studio: start a local one (.venv-labelstudio, data in <data-dir>/label-studio), "
        "or use the server at URL (API key from LABEL_STUDIO_API_KEY); the monitoring actor pulls the "
        "finished annotations and retrains",
    )
    p.add_argument(
        "--simulate-annotator",
        action="store_true",
        help="with --label-studio: submit the ground truth through Label Studio's API; without it the demo "
        "waits for a person to annotate the batch there",
    )
    p.add_argument(
        "--stay",
        type=float,
        default=0,
        metavar="SECONDS",
        help="keep Ray, Serve and the monitoring actor up this long after the summary to look around "
        "in the dashboards (-1: until Ctrl-C); everything stops when the demo exits",
    )
    args = p.parse_args(argv)
    if args.simulate_annotator and not args.label_studio:
        p.error("--simulate-annotator goes with --label-studio (without it the demo's annotator is simulated anyway)")
    sizes = demo_task(args.task).sizes
    for key in ("size", "n", "shift_n", "epochs", "annotate"):
        value = getattr(args, key)
        if value is None:
            setattr(args, key, getattr(sizes, key))
        elif value < 1:
            p.error(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    return args


class DemoFailed(RuntimeError):
    """A step of the loop did not do what it should; the demo stops and says which."""


@dataclass
class Demo:
    """What the steps hand each other."""

    args: argparse.Namespace
    data: Path
    t: DemoTask = field(default_factory=DemoTask)
    store: Any = None
    normal: Path | None = None
    shifted: Path | None = None
    v0: Any = None
    v1: Any = None
    dashboard: str = ""
    url: str = "http://127.0.0.1:8000"
    traffic: Traffic | None = None
    monitor: Any = None
    base_conf: float = float("nan")
    base_ent: float = float("nan")
    drift: list[dict] = field(default_factory=list)
    latest: Any = None
    champion: str | None = None
    sim: Any = None  # segloop.simcluster.SimCluster with --cluster
    ls_server: Any = None  # dataplane.annotation.ls_server.LocalLabelStudio with --label-studio
    ls_target: Any = None  # dataplane.annotation.ls_project.LabelStudioTarget with --label-studio

    def status(self) -> dict[str, Any]:
        import ray

        return ray.get(self.monitor.status.remote())


def step_data(d: Demo) -> None:
    from dataplane.versions import create_version
    from segloop.settings import data_store

    a, t = d.args, d.t
    say("1. generate data", f"{t.describe_data(a.n, a.shift_n)}, in {d.data / 'data'}")
    d.normal = t.generate(d.data / "data" / t.name, a.n, 0, a.size, shift=False)
    d.shifted = t.generate(d.data / "data" / f"{t.name}_shift", a.shift_n, 1, a.size, shift=True)
    d.store = data_store(d.data)
    d.v0 = create_version(d.store, t.name, d.normal, t.task)
    samples = sum(len(s) for s in d.v0.splits.values())
    print(f"dataset version {t.name}@{d.v0.version}: {samples} samples, store {d.store.describe()}")


def step_ray(d: Demo) -> None:
    import ray

    from monitoring.actor import NAMESPACE
    from segloop.settings import use_serve_fast_path

    if d.sim is not None:
        cpus = ray.cluster_resources().get("CPU", 0)
        say("2. Ray", "the simulated cluster: a head with no CPUs (Serve's controller and proxy, Jobs API, monitor)")
        print(f"and node {d.sim.node_id[:12]} ({cpus:g} CPUs), which sees none of the driver's files")
        print(f"object store {d.store.describe()}, MLflow server {d.sim.mlflow_uri}")
        d.dashboard = d.sim.dashboard
        return
    say("2. start Ray", "local cluster, dashboard on 127.0.0.1, Serve's HAProxy fast path")
    use_serve_fast_path()  # Ray's processes read it when they start
    ctx = ray.init(
        num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", namespace=NAMESPACE, log_to_driver=False
    )
    d.dashboard = ctx.dashboard_url if ctx.dashboard_url.startswith("http") else f"http://{ctx.dashboard_url}"


def where(d: Demo, class_part: str, what: str, alive_only: bool = False) -> None:
    """With --cluster: on which nodes the actors of a kind ran (the isolated node, or the head)."""
    if d.sim is None:
        return
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive_only else None
    nodes = [
        a.node_id for a in list_actors(filters=filters, detail=True, limit=10_000) if class_part in (a.class_name or "")
    ]
    isolated = sum(n == d.sim.node_id for n in nodes)
    print(f"{what}: {isolated} of {len(nodes)} on the isolated node {d.sim.node_id[:12]}")


def step_train(d: Demo) -> Path:
    """Train v1; returns the config file the monitor's retraining job will use."""
    import torch

    from segloop.config import dump_config
    from train.config import TrainConfig
    from train.job import run

    a, t = d.args, d.t
    train_cfg = t.train_config(a.size, a.epochs, use_gpu=torch.cuda.is_available()) | dict(
        dataset_version=d.v0.version, dataset_name=t.name, patience=0, data_dir=str(d.data),
        experiment=f"segloop-demo-{t.name}", registered_model=t.registered_model,
    )  # fmt: skip
    cfg = TrainConfig(**train_cfg)
    say(
        f"3. train v1 with Ray Train ({cfg.model}, {cfg.num_workers} worker{'s' * (cfg.num_workers > 1)}), "
        "track in MLflow, register"
    )
    d.v1 = run(cfg)
    print(f"v{d.v1.model_version}: held-out {t.score} {d.v1.holdout[cfg.promotion_key]:.3f} -> {d.v1.reason}")
    where(d, "RayTrainWorker", "training workers")
    retrain_yaml = d.data / "retrain.yaml"
    changes = t.retrain_changes(train_cfg)
    dump_config(TrainConfig(**(train_cfg | changes)), retrain_yaml)
    if changes:
        print("the retraining job will: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
    return retrain_yaml


def step_serve(d: Demo) -> None:
    from monitoring.serving import deploy

    uri = f"models:/{d.t.registered_model}@champion"
    say("4. serve v1 with Ray Serve", f"replicas follow {uri} (polled every 2 s)")
    app_args = dict(
        data_dir=str(d.data), model={"model_uri": uri, "poll_interval_s": 2, **dict(d.t.serve)},
        model_num_replicas=1, capture={"policy": {"mode": "off"}, "policy_poll_s": 2},
    )  # fmt: skip
    deploy(app_args, APP, "/", http_options={"host": "127.0.0.1", "port": 8000})
    d.traffic = Traffic(d.url)
    where(d, "SegModel", "model replicas", alive_only=True)


def step_normal_traffic(d: Demo) -> None:
    say("5. normal traffic", "default-style held-out images")
    normal = d.traffic.send(d.t.images(d.normal, d.t.holdout_split) * 2)
    d.base_conf, d.base_ent = mean(normal, "confidence"), mean(normal, "entropy")
    print(
        f"{len(normal)} predictions by v{normal[0]['model_version']}: mean confidence {d.base_conf:.3f}, "
        f"mean entropy {d.base_ent:.3f}"
    )
    refused = d.traffic.send_bad(d.t.images(d.normal, d.t.holdout_split)[0])
    print(
        "bad uploads are refused, each with its reason, and serving goes on: "
        + ", ".join(f"{code} {reason}" for code, reason in refused)
    )


def step_monitor(d: Demo, retrain_yaml: Path) -> None:
    from monitoring import actor

    m = d.t.alert_margin
    say(
        "6. the monitoring actor",
        f"rules calibrated on the normal traffic: alert when mean confidence drops {m} below it or mean entropy "
        f"rises {m} above it; on alert capture images more uncertain than normal traffic",
    )
    common = {"window_s": 20, "for_s": 4, "hysteresis": 0.02, "cooldown_s": 3600}
    rules = [
        {"name": "low_confidence", "signal": "mean_confidence", "op": "<", "threshold": round(d.base_conf - m, 4)},
        {"name": "high_entropy", "signal": "mean_entropy", "op": ">", "threshold": round(d.base_ent + m, 4)},
    ]
    config = {
        "interval_s": 2, "rules": [{**r, **common} for r in rules], "app_name": APP, "dataset_name": d.t.name,
        "capture_on_alert": {"mode": "entropy", "threshold": round(d.base_ent, 4)},
        "min_new_samples": d.args.annotate, "train_config": str(retrain_yaml), "registered_model": d.t.registered_model,
        "data_dir": str(d.data), "dashboard_url": d.dashboard,
    }  # fmt: skip
    if d.ls_target is not None:
        config["label_studio"] = {"url": d.ls_target.url, "project": d.ls_target.project, "interval_s": 2}
    d.monitor = actor.start(config, restart=True)
    time.sleep(6)  # the actor's first read sets its baseline


def step_drift(d: Demo) -> list[Path]:
    """Shifted traffic until the alert fires; returns the shifted images."""
    from dataplane.capture import write_policy

    say("7. shifted traffic (drift)", "the generator's --shift style: other colours and textures")
    t = d.t
    shift_imgs = t.images(d.shifted, t.train_split) + t.images(d.shifted, t.holdout_split)
    fired = wait_until(
        lambda: bool(d.status()["firing"]), 180, every_s=1, tick=lambda: d.drift.extend(d.traffic.send(shift_imgs[:24]))
    )
    print(
        f"on shifted traffic: mean confidence {mean(d.drift, 'confidence'):.3f} (normal {d.base_conf:.3f}), "
        f"mean entropy {mean(d.drift, 'entropy'):.3f} (normal {d.base_ent:.3f}); "
        f"alert {'FIRED: ' + ', '.join(d.status()['firing']) if fired else 'did not fire'}"
    )
    if not fired:
        write_policy(d.store, {"mode": "entropy", "threshold": round(d.base_ent, 4)})
        print("(switching capture on by hand so the demo can go on)")
    print(f"capture policy now: {d.status()['capture']}")
    return shift_imgs


def unique_captures(store: Any) -> list:
    """Captures, most uncertain first, each image once (the same image sent twice is annotated once)."""
    from dataplane.annotation import list_captures

    seen: set[str] = set()
    out = []
    for c in list_captures(store):
        sha = c.meta.get("image_sha256")
        if sha not in seen:
            seen.add(sha)
            out.append(c)
    return out


def step_collect(d: Demo, shift_imgs: list[Path]) -> None:
    from dataplane.annotation import list_captures

    say("8. collect", "shifted traffic continues; uncertain images go to the object store")
    want = d.args.annotate + 16
    wait_until(lambda: len(unique_captures(d.store)) >= want, 300, every_s=1, tick=lambda: d.traffic.send(shift_imgs))
    caps = list_captures(d.store)
    print(f"{len(caps)} captures; top entropy {caps[0].entropy:.3f}, lowest {caps[-1].entropy:.3f}")


def step_annotate(d: Demo) -> None:
    import random

    from dataplane.annotation import export, import_annotations, simulate_annotation, truth_from_dataset
    from dataplane.annotation.selection import SelectionSpec, select_captures
    from dataplane.versions import latest_version

    t, spec = d.t, SelectionSpec(strategy=d.args.strategy, budget=d.args.annotate)
    say(
        "9. annotate and version",
        f"the annotation queue picks {spec.budget} captures by {spec.strategy} ({spec.score}, embeddings of the "
        "serving model) and writes them with the model's predictions as pre-annotations; "
        + (
            "they go to Label Studio, where "
            + (
                "a simulated annotator submits the ground truth (from the generator)"
                if d.args.simulate_annotator
                else "you annotate them"
            )
            if d.ls_target is not None
            else "a simulated annotator labels them (ground truth from the generator)"
        )
        + "; 16 others, at random, go to the held-out split (labelled by the simulator)",
    )
    truth = truth_from_dataset(d.shifted)
    unique = unique_captures(d.store)
    chosen = select_captures(unique, spec)
    batch = export(d.store, d.data / "annotation_batch", records=chosen.records)
    print(preannotation_line(batch))
    picked = {r.id for r in chosen.records}
    rest = [c for c in unique if c.id not in picked]
    held_out = random.Random(0).sample(rest, min(16, len(rest)))
    test_dir = simulate_annotation(d.store, held_out, truth, d.data / "annot_test")
    v_test = import_annotations(d.store, t.name, d.v0.version, test_dir, split=t.holdout_split)
    if d.ls_target is not None:
        annotate_in_label_studio(d, chosen, truth)
        return
    train_dir = simulate_annotation(d.store, chosen.records, truth, d.data / "annot_train")
    v_new = import_annotations(d.store, t.name, v_test.version, train_dir, split=t.train_split)
    print(
        f"{t.name}@{v_new.version} (parent {v_new.parent}): {sum(len(s) for s in v_new.splits.values())} samples; "
        f"latest is {latest_version(d.store, t.name).version}"
    )


def annotate_in_label_studio(d: Demo, chosen: Any, truth: Any) -> None:
    """Push the batch to Label Studio; the simulated annotator (or a person) annotates it there."""
    from dataplane.annotation.ls_project import push
    from dataplane.annotation.ls_server import wait_until_up
    from dataplane.annotation.simulate import annotate_in_label_studio as annotate

    if d.ls_server is not None:
        wait_until_up(d.ls_server)
    scores = {r.id: p.uncertainty for r, p in zip(chosen.records, chosen.picks)}
    res = push(d.store, d.ls_target, chosen.records, scores)
    print(
        f"pushed {len(res.added)} tasks, most useful first, to Label Studio project {res.project_id}: {res.project_url}"
    )
    if d.args.simulate_annotator:
        n = annotate(d.ls_target.client(), res.project_id, d.store, truth)
        print(f"the simulated annotator submitted {n} annotations through Label Studio's API")
        return
    login = (
        f"log in as {d.ls_server.username} (password in {d.ls_server.data_dir / 'credentials.json'})"
        if d.ls_server is not None
        else "log in with your account"
    )
    print(
        f"annotate them at {res.project_url} ({login}); when all {len(res.added)} are submitted the monitoring "
        "actor pulls them into a new dataset version and retrains"
    )


def preannotation_line(batch: Any) -> str:
    """What the annotators get: the batch's files and how many predicted regions they start from."""
    import json

    tasks = json.loads(batch.label_studio.read_text())
    regions = sum(len(p["result"]) for task in tasks for p in task.get("predictions", []))
    what = "predicted instances" if batch.task == "instance" else "predicted regions"
    return (
        f"annotation batch: {len(tasks)} tasks with {regions} {what} as pre-annotations "
        f"({batch.label_studio.name}, {batch.coco.name} in {batch.out_dir})"
    )


def wait_for_annotations(d: Demo) -> None:
    """Until the monitoring actor has pulled the batch from Label Studio: a line per change in progress."""
    want, shown = d.args.annotate, [None]

    def pulled() -> bool:
        ls = d.status().get("label_studio") or {}
        now = (ls.get("finished"), ls.get("error"))
        if now != shown[0] and ls.get("finished") is not None:
            print(
                f"  {ls['finished']}/{want} annotated in Label Studio"
                + (f" ({ls['error']})" if ls.get("error") else "")
            )
            shown[0] = now
        return bool(d.status()["jobs"])  # the pull's new version is submitted in the same tick

    timeout = d.args.timeout if d.args.simulate_annotator else 7 * 86400.0
    if not wait_until(pulled, timeout, every_s=2):
        raise DemoFailed(f"the batch was not annotated and pulled within {timeout:g} s")
    from dataplane.versions import latest_version

    v = latest_version(d.store, d.t.name)
    pulled_n = len(v.notes.get("import", {}).get("captures", []))
    print(
        f"pulled {pulled_n} annotations: {d.t.name}@{v.version} (parent {v.parent}), {v.notes.get('import', {}).get('from')}"
    )


def step_retrain(d: Demo) -> None:
    if d.ls_target is not None:
        say(
            "10. pull and retrain",
            "the monitoring actor pulls the finished annotations into a new version, then submits a Ray job",
        )
        wait_for_annotations(d)
    else:
        say("10. retrain", "the monitoring actor sees >= min_new_samples new samples and submits a Ray job")
    done = ("SUCCEEDED", "FAILED", "STOPPED")
    ok = wait_until(lambda: any(j["status"] in done for j in d.status()["jobs"]), d.args.timeout, every_s=5)
    jobs = d.status()["jobs"]
    for j in jobs:
        print(f"job {j['id']}: {j['status']} on {d.t.name}@{j['dataset_version']} ({j['reason']})")
    if not ok:
        raise DemoFailed(f"the retraining job did not finish in {d.args.timeout:g} s; see {d.dashboard}")
    finished = next(j for j in jobs if j["status"] in done)
    if finished["status"] != "SUCCEEDED":
        from ray.job_submission import JobSubmissionClient

        tail = JobSubmissionClient(d.dashboard).get_job_logs(finished["id"]).splitlines()[-25:]
        print("\n".join(f"  | {line}" for line in tail))
        raise DemoFailed(f"retraining job {finished['id']} {finished['status']} (its log's end is above)")
    # the monitor reads the job's decision from the registry a moment later (its totals feed the dashboards)
    if not wait_until(lambda: any(j.get("decision_recorded") for j in d.status()["jobs"]), 120):
        raise DemoFailed("the monitoring actor did not read the retraining job's decision within 120 s")
    where(d, "RayTrainWorker", "training workers, v1 and the retraining job")


def step_promote(d: Demo) -> None:
    import mlflow
    import requests

    from segloop.settings import tracking_uri
    from train import registry

    say("11. promote and switch")
    mlflow.set_tracking_uri(tracking_uri(d.data))
    d.champion = registry.champion_version(d.t.registered_model)
    versions = mlflow.MlflowClient().search_model_versions(f"name='{d.t.registered_model}'")
    d.latest = max(versions, key=lambda m: int(m.version))
    print(f"v{d.latest.version}: {d.latest.tags.get('segloop.decision')} — {d.latest.tags.get('segloop.reason')}")

    def served() -> str | None:
        return requests.get(d.url + "/model", timeout=30).json().get("version")

    switched = wait_until(lambda: served() == d.champion, 60)
    print(f"Serve answers with v{served()} (champion v{d.champion})" + ("" if switched else " — not switched yet"))


def step_summary(d: Demo, t_start: float) -> None:

    from segloop.settings import tracking_uri

    say("12. shifted traffic after retraining")
    after = d.traffic.send(d.t.images(d.shifted, d.t.holdout_split))
    before = d.drift[: len(after)]

    say("summary")
    tags = d.latest.tags
    rows = [
        (
            "held-out score (same data)",
            tags.get("segloop.champion_score", "-"),
            tags.get("segloop.challenger_score", "-"),
        ),
        ("mean confidence, shifted traffic", f"{mean(before, 'confidence'):.3f}", f"{mean(after, 'confidence'):.3f}"),
        ("mean entropy, shifted traffic", f"{mean(before, 'entropy'):.3f}", f"{mean(after, 'entropy'):.3f}"),
        ("mean entropy, normal traffic", f"{d.base_ent:.3f}", "-"),
    ]
    print(f"| | v{d.v1.model_version} | v{d.latest.version} |\n| --- | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    print(f"(held-out score: {tags.get('segloop.metric', d.t.score)}, both models on the new version's held-out split)")
    print(
        f"\nrequests served: {d.traffic.sent}, failed requests: {d.traffic.failed}, "
        f"champion: v{d.champion}, wall time {time.time() - t_start:.0f}s"
    )
    ui = (
        d.sim.mlflow_uri
        if d.sim is not None
        else (
            f".venv/bin/mlflow ui --backend-store-uri {tracking_uri(d.data)} --host 127.0.0.1  (then http://127.0.0.1:5000)"
        )
    )
    print(f"Ray dashboard: {d.dashboard}\nMLflow UI: {ui}\nServe: {d.url}/predict")
    if d.ls_target is not None:
        print(f"Label Studio: {d.ls_target.url} (project {d.ls_target.project!r})")


def stay(seconds: float) -> None:
    if not seconds:
        print("(the demo's Ray cluster stops now; `--stay -1` keeps it up until Ctrl-C)")
        return
    print("staying up " + ("until Ctrl-C" if seconds < 0 else f"for {seconds:.0f}s") + "; then Ray stops", flush=True)
    try:
        time.sleep(seconds if seconds >= 0 else 10**9)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = _T0[0] = time.time()
    data = Path(args.data_dir).resolve()
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Ray 2.60's default for a local cluster, said explicitly (before Ray is imported) so Ray
    # does not warn about it; RAY_AUTH_MODE=disabled from the environment still wins.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    d = Demo(args, data, demo_task(args.task))
    if args.label_studio:
        try:
            start_label_studio(d)
        except SegloopError as err:
            print(f"error: {err}", file=sys.stderr)
            return exit_code(err)
    if args.cluster:
        from segloop.simcluster import Unavailable

        try:
            d.sim = start_sim(data)
        except Unavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        os.environ["SEGLOOP_STORE"] = str(data / "store")  # the retraining job (another process) finds it
    try:
        return run_loop(d, t_start)
    finally:
        if d.ls_server is not None:
            d.ls_server.stop()
        if d.sim is not None:
            from segloop import simcluster

            simcluster.stop(d.sim)


def start_label_studio(d: Demo) -> None:
    """Label Studio for the annotation step: launched now (its first start takes ~30 s, hidden
    behind training), or the server the user named (API key from LABEL_STUDIO_API_KEY)."""
    from dataplane.annotation.ls_project import LabelStudioTarget
    from dataplane.annotation.ls_server import launch_label_studio

    project = f"segloop demo ({d.args.task})"
    if d.args.label_studio == "local":
        d.ls_server = launch_label_studio(d.data / "label-studio")
        os.environ["LABEL_STUDIO_API_KEY"] = d.ls_server.api_key  # the monitoring actor pulls with it
        d.ls_target = LabelStudioTarget(d.ls_server.url, project, api_key=d.ls_server.api_key)
    else:
        d.ls_target = LabelStudioTarget(d.args.label_studio, project)
        try:
            d.ls_target.client()  # a refused key is said now, not after training
        except StoreError as err:
            print(f"warning: {err}; trying again at the annotation step", file=sys.stderr)


def start_sim(data: Path) -> Any:
    """The simulated two-node cluster; this process gets the cluster profile."""
    import tempfile

    from monitoring.actor import NAMESPACE
    from segloop import simcluster
    from segloop.settings import node_cache_dir

    say("0. a simulated two-node cluster", "S3 server, MLflow server, a num_cpus=0 head, an isolated node")
    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="segloop-sim-", dir="/tmp"))  # short: Ray's socket paths live here
    sim = simcluster.start(base, simcluster.MotoS3(), "segloop-demo", hidden=[data, cache], cpus=6, namespace=NAMESPACE)
    for k in (
        "SEGLOOP_STORE",
        "SEGLOOP_S3_ENDPOINT",
        "SEGLOOP_S3_ACCESS_KEY",
        "SEGLOOP_S3_SECRET_KEY",
        "MLFLOW_TRACKING_URI",
    ):
        os.environ[k] = sim.env[k]
    return sim


def run_loop(d: Demo, t_start: float) -> int:
    step_data(d)
    step_ray(d)
    retrain_yaml = step_train(d)
    step_serve(d)
    step_normal_traffic(d)
    step_monitor(d, retrain_yaml)
    shift_imgs = step_drift(d)
    step_collect(d, shift_imgs)
    step_annotate(d)
    try:
        step_retrain(d)
    except DemoFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    step_promote(d)
    step_summary(d, t_start)
    stay(d.args.stay)  # the monitor keeps publishing its totals meanwhile (Ray drops a gauge not set for 10 s)
    import ray

    ray.get(d.monitor.stop.remote())
    return 0 if d.traffic.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
