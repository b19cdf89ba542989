"""The instance loop end to end, as `make demo TASK=coco` runs it (small data).

The demo runs in a subprocess (its own Ray cluster); afterwards this test opens what it left
behind — the object store, the MLflow database, the annotation batch — and checks the parts a
log line cannot show: captures carry COCO-RLE pre-annotations that come back unchanged through
the queue's COCO file and, as polygons, through its Label Studio file; and a deliberately worse
challenger, registered and judged on the same held-out data by the promotion code, is rejected
with its reason while the champion stays.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "segloop-coco"


def run_demo(data: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SEGLOOP_STORE")}
    args = ["--task", "coco", "--data-dir", str(data), "--n", "96", "--shift-n", "96", "--epochs", "8"]
    out = subprocess.run(
        [sys.executable, "-m", "segloop", "demo", *args, "--annotate", "32", "--timeout", "900"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    return log


def check_log(log: str) -> None:
    assert "alert FIRED" in log, log[-6000:]
    m = re.search(r"mean entropy ([0-9.]+) \(normal ([0-9.]+)\); alert", log)
    assert m and float(m[1]) > float(m[2]), "the instance uncertainty must rise on the shifted style"
    assert re.search(r"annotation batch: 32 tasks with [1-9]\d* predicted instances as pre-annotations", log), log
    assert re.search(r"job \S+: SUCCEEDED on coco@", log), log[-6000:]
    assert "the retraining job will: init_checkpoint=models:/segloop-coco@champion" in log
    m = re.search(r"\| held-out score \(same data\) \| ([0-9.]+) \| ([0-9.]+) \|", log)
    assert m, log[-3000:]
    assert "(held-out score: val_segm_mAP50-95" in log
    # promoted exactly when its held-out segm mAP is higher (margin 0); at this small size a few
    # fine-tuning epochs do not always beat v1 (measured: 2 of 3 runs did), and either way the rule holds
    if float(m[2]) > float(m[1]):
        assert re.search(r"v2: promoted", log), log[-3000:]
        assert re.search(r"Serve answers with v2 \(champion v2\)", log), log[-3000:]
    else:
        assert re.search(r"v2: rejected — challenger \S+ does not beat champion", log), log[-3000:]
        assert re.search(r"Serve answers with v1 \(champion v1\)", log), log[-3000:]
    assert re.search(r"failed requests: 0\b", log)
    assert "creating index" not in log and "DONE (t=" not in log  # pycocotools' chatter stays out


def decoded(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def check_preannotations_round_trip(data: Path, tmp_path: Path) -> None:
    """The batch's COCO file gives back each capture's masks exactly; its Label Studio polygons closely."""
    from dataplane.annotation import get_capture
    from dataplane.annotation.coco import coco_to_instances, parse_coco
    from dataplane.annotation.labelstudio import parse_labelstudio, regions_to_instances
    from dataplane.store import LocalStore

    store = LocalStore(data / "store")
    batch = data / "annotation_batch"
    problems: list[str] = []
    from_coco = {a.capture_id: a for a in parse_coco(batch / "coco_preannotations.json", problems)}
    tasks = json.loads((batch / "label_studio_tasks.json").read_text())
    for task in tasks:  # an annotator who accepts every pre-annotation as it is
        task["annotations"] = [{"result": task["predictions"][0]["result"]}]
    (tmp_path / "accepted.json").write_text(json.dumps(tasks))
    parsed_ls, _ = parse_labelstudio(tmp_path / "accepted.json", problems)
    from_ls = {a.capture_id: a for a in parsed_ls}
    assert not problems and len(from_coco) == 32 and from_coco.keys() == from_ls.keys()
    ious = []
    for capture_id, parsed in from_coco.items():
        rec = get_capture(store, capture_id)
        assert rec.meta["task"] == "instance" and 0 <= rec.meta["uncertainty"]["entropy"] <= 1
        predicted = rec.meta["preannotation"]["instances"]
        known = {name: k for k, name in enumerate(rec.class_names)}
        h, w = rec.height, rec.width
        want = [decoded(p["segmentation"]) for p in predicted]
        got = [i.mask for i in coco_to_instances(parsed.payload, h, w, parsed.where, known)]
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))  # pixel for pixel
        ls = [i.mask for i in regions_to_instances(from_ls[capture_id].payload, h, w, parsed.where, known)]
        drawn = [m for m in want if m.any()]
        assert len(ls) == len(drawn)
        ious += [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(ls, drawn)]
    assert ious and float(np.mean(ious)) > 0.8, f"Label Studio polygons vs predicted masks: mean IoU {np.mean(ious)}"


def check_worse_challenger_rejected(data: Path) -> None:
    """An untrained challenger, judged by the promotion code on the same held-out data, is refused."""
    import mlflow
    import ray
    import torch

    from segloop.config import load_config
    from segloop.settings import store_config_dict
    from train import registry
    from train.config import TrainConfig
    from train.job import compare_and_promote, evaluate_on_holdout
    from train.models import build_model

    uri = f"sqlite:///{data / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    cfg = load_config(TrainConfig, data / "retrain.yaml", [])
    champion = registry.champion_version(MODEL)
    _, meta, _ = registry.load_version(MODEL, champion)
    # the data v2 was judged on, from the demo's object store
    source = {"name": "coco", "version": meta.dataset["version"], "store": store_config_dict(cfg.data_dir)}

    def score(state: object) -> float:
        held_out = evaluate_on_holdout(
            cfg.model_dump(mode="json"), source, state, meta.num_classes, meta.class_names, False
        )
        return held_out["metrics"][cfg.promotion_key]

    torch.manual_seed(0)
    worse = build_model(cfg.model, meta.num_classes, **cfg.model_kwargs).state_dict()
    mlflow.set_experiment("segloop-demo-coco")
    with mlflow.start_run(run_name="deliberately-worse"):
        version = registry.log_model(worse, meta, MODEL, np.zeros((1, 96, 96, 3), np.uint8))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # the promotion lock is a Ray actor
    try:
        decision = compare_and_promote(cfg, version, score(worse), lambda v: score(("registry", MODEL, v, uri)))
    finally:
        ray.shutdown()  # the session's cluster starts later, after every test that owns one
    assert not decision.promoted and decision.champion_version == champion, decision
    assert decision.metric == "val_segm_mAP50-95" and "does not beat champion" in decision.reason
    tags = mlflow.MlflowClient().get_model_version(MODEL, version).tags
    assert tags["segloop.decision"] == "rejected" and "does not beat" in tags["segloop.reason"]
    assert registry.champion_version(MODEL) == champion


@pytest.mark.slow
@pytest.mark.long  # 235-258 s: with it the clean-clone CI run took 1641 s, over the 25-min budget
@pytest.mark.own_ray_cluster
def test_instance_loop_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    log = run_demo(data)
    check_log(log)
    check_preannotations_round_trip(data, tmp_path)
    check_worse_challenger_rejected(data)
