"""Capture from a running Serve app into a real S3 server (moto, through the minio SDK).

The policy is switched at run time (no redeploy) the way the monitoring actor does it; an S3
outage mid-stream fails no request, drops are counted, and capture resumes by itself.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import free_port
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server, unique_bucket
from tests.serve_helpers import SEMANTIC, image_bytes, register_model

APP = "segloop-capture"


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from dataplane.store import open_store
    from monitoring.serving import deploy
    from serve_app.config import AppArgs

    srv = S3Server().start()
    store_cfg = {"kind": "s3", "endpoint": srv.endpoint, "bucket": unique_bucket(), "timeout": 1.0}
    data_dir = tmp_path_factory.mktemp("capture") / "segloop"
    register_model(data_dir, "capture-test", SEMANTIC, seed=0)
    port = free_port()
    args = AppArgs(
        data_dir=str(data_dir),
        model={"model_uri": "models:/capture-test@champion", "poll_interval_s": 0},
        model_num_replicas=1,
        model_num_cpus=1,
        ingress_num_cpus=0,
        capture={"store": store_cfg, "policy": {"mode": "off"}, "policy_poll_s": 0.5, "max_retries": 1},
    )
    env = {"env_vars": {"SEGLOOP_S3_ACCESS_KEY": ACCESS_KEY, "SEGLOOP_S3_SECRET_KEY": SECRET_KEY}}
    deploy(args, APP, "/cap", http_options={"host": "127.0.0.1", "port": port}, runtime_env=env)
    import os

    os.environ.update(env["env_vars"])
    store = open_store(store_cfg)
    yield {"url": f"http://127.0.0.1:{port}/cap", "store": store, "server": srv, "store_cfg": store_cfg}
    serve.delete(APP)
    serve.shutdown()  # the next module starts Serve on its own port
    setup_server = srv
    setup_server.stop()


def _captures(store) -> dict[str, dict]:
    return {k: store.get_json(k) for k in store.list("captures/") if k.endswith(".json")}


def _wait(pred, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.3)
    return False


@pytest.mark.slow
def test_entropy_policy_captures_exactly_the_uncertain_images(setup) -> None:
    from dataplane.capture import write_policy

    url, store = setup["url"], setup["store"]
    entropies = {}
    for seed in range(12):  # policy off: nothing captured
        r = requests.post(url + "/predict", data=image_bytes(seed), timeout=60)
        assert r.status_code == 200
        entropies[seed] = r.json()["entropy"]
    assert _captures(store) == {}

    values = sorted(entropies.values())
    threshold = (values[5] + values[6]) / 2  # half of the images above
    write_policy(store, {"mode": "entropy", "threshold": threshold})
    time.sleep(1.5)  # > policy_poll_s: every replica has the new policy
    sent = {}
    for seed in range(12):
        r = requests.post(url + "/predict", data=image_bytes(seed), timeout=60)
        assert r.status_code == 200
        sent[seed] = r.json()
    above = [s for s, body in sent.items() if body["entropy"] > threshold]
    assert _wait(lambda: len(_captures(store)) >= len(above))
    time.sleep(1.0)
    caps = _captures(store)
    assert len(caps) == len(above)
    got = sorted(round(m["entropy"], 6) for m in caps.values())
    assert got == sorted(round(sent[s]["entropy"], 6) for s in above)
    for meta in caps.values():
        assert meta["entropy"] > threshold and 0 <= meta["confidence"] <= 1
        assert meta["model_version"] == sent[0]["model_version"]
        assert store.exists(meta["image_key"]) and meta["preannotation"]["kind"] == "mask_png"
        assert store.get_bytes(meta["image_key"])[:3] == b"\xff\xd8\xff"  # the original JPEG bytes
        # what selection reads, from the same forward pass: statistics and the pooled backbone embedding
        assert set(meta["uncertainty"]) == {"entropy", "class_balanced_entropy", "top_entropy", "margin"}
        assert meta["uncertainty"]["entropy"] == pytest.approx(meta["entropy"], abs=1e-4)
        assert meta["embedding"]["dtype"] == "float16" and meta["embedding"]["dim"] > 0
        assert meta["embedding"]["model_version"] == meta["model_version"] and meta["selected_by"] == "policy"
    for body in sent.values():  # capture signals never reach the client
        assert not {"_capture", "embedding", "uncertainty"} & set(body)
    # The same image again is selected by the policy but not stored twice.
    assert requests.post(url + "/predict", data=image_bytes(above[0]), timeout=60).status_code == 200
    info = lambda: requests.get(url + "/model", timeout=30).json()["capture"]  # noqa: E731
    assert _wait(lambda: info()["duplicate"] == 1), info()
    assert len(_captures(store)) == len(above)


@pytest.mark.slow
def test_s3_outage_fails_no_request_counts_drops_and_resumes(setup) -> None:
    from dataplane.capture import write_policy

    url, store, srv = setup["url"], setup["store"], setup["server"]
    write_policy(store, {"mode": "all"})
    time.sleep(1.5)
    before = len(_captures(store))
    port = srv.port
    srv.stop()
    statuses = [requests.post(url + "/predict", data=image_bytes(100 + i), timeout=60).status_code for i in range(6)]
    assert statuses == [200] * 6
    info = lambda: requests.get(url + "/model", timeout=30).json()  # noqa: E731
    assert _wait(lambda: (info().get("capture") or {}).get("dropped", 0) >= 1, timeout=60), info()

    setup["server"] = S3Server(port=port).start()  # the store comes back (moto keeps its buckets)
    for i in range(4):
        assert requests.post(url + "/predict", data=image_bytes(200 + i), timeout=60).status_code == 200
    assert _wait(lambda: len(_captures(store)) >= before + 4, timeout=60)
