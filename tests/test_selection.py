"""Selection strategies (``dataplane.annotation.selection``) on hand-built embedding sets, the
capture signals they read (``train.uncertainty``, capture metadata), and ``queue export
--strategy`` on captures in a real S3 server (moto, through the ``minio`` SDK)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import dataplane.annotation as q
from dataplane.annotation.selection import (
    STRATEGIES,
    SelectionSpec,
    near_duplicates,
    select,
    select_captures,
    stored_signals,
)
from dataplane.capture import build_metadata, decode_embedding, encode_embedding, new_capture_id
from dataplane.store import LocalStore
from dataplane.versions import create_version
from segloop.errors import ConfigError
from serve_app.capture import Capturer, RecentCaptures
from serve_app.postprocess import encode_png
from train.uncertainty import instance_uncertainty, pooled_embedding, semantic_uncertainty

try:
    from tests.s3server import make_s3_store
    from tests.test_queue import CLASSES, pet_names, pets, trimap_of
except ImportError:  # tests/ on sys.path instead of the repo root
    from s3server import make_s3_store
    from test_queue import CLASSES, pet_names, pets, trimap_of

__all__ = ["pets"]  # the generated-pets fixture, shared with test_queue


def unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clusters(rng: np.random.Generator, centre: list[float], n: int, spread: float = 0.02) -> np.ndarray:
    return unit(*(np.asarray(centre) + rng.normal(0, spread, (n, len(centre)))))


# ----------------------------------------------------------------------------- strategies


def test_kcenter_takes_the_far_cluster_first_and_respects_the_labelled_set():
    rng = np.random.default_rng(0)
    near = clusters(rng, [1, 0, 0], 6)  # where the labelled samples are, and most uncertain
    far = clusters(rng, [0, 1, 0], 3)
    x = np.concatenate([near, far])
    u = np.array([0.9] * 6 + [0.5] * 3)
    labelled = clusters(rng, [1, 0, 0], 4)
    picks = select("kcenter", u, 2, embeddings=x, labelled=labelled)
    assert picks[0].index >= 6 and picks[0].distance > 0.5  # the far cluster, though less uncertain
    assert "far" in picks[0].reason
    assert select("top", u, 1)[0].index < 6  # top-k would have taken the near, more uncertain one
    # Without a labelled set the first pick is the most uncertain, the second the far cluster.
    free = select("kcenter", u, 2, embeddings=x)
    assert free[0].index < 6 and free[1].index >= 6


def test_kcenter_and_badge_never_pick_a_copy_of_a_labelled_sample_while_others_remain():
    rng = np.random.default_rng(1)
    labelled = clusters(rng, [1, 0, 0, 0], 3)
    x = np.concatenate([labelled, clusters(rng, [0, 0, 1, 0], 3)])  # three copies of labelled ones, three new
    u = np.array([1.0, 1.0, 1.0, 0.2, 0.2, 0.2])
    for strategy in ("kcenter", "badge"):
        for seed in range(20):
            picks = select(strategy, u, 3, embeddings=x, labelled=labelled, seed=seed)
            assert sorted(p.index for p in picks) == [3, 4, 5], strategy


def test_power_sampling_frequencies_follow_u_to_the_beta():
    u = np.array([0.1, 0.2, 0.3, 0.4])
    for beta in (1.0, 2.0):
        counts = Counter(select("power", u, 1, seed=s, beta=beta)[0].index for s in range(8000))
        expected = u**beta / (u**beta).sum()
        freq = np.array([counts[i] / 8000 for i in range(4)])
        assert np.abs(freq - expected).max() < 0.02, (beta, freq, expected)
    picks = select("power", u, 4, seed=3)
    assert sorted(p.index for p in picks) == [0, 1, 2, 3]  # without replacement
    assert picks[0].probability == pytest.approx(u[picks[0].index] / u.sum())


def test_badge_first_draw_follows_u_times_squared_distance():
    labelled = unit([1, 0])
    x = unit([1, 0.0001], [0, 1], [1, 1])  # d = ~0, 1, 1 - cos45
    u = np.array([0.9, 0.3, 0.6])
    d = 1 - x @ labelled[0]
    expected = u * d**2 / (u * d**2).sum()
    counts = Counter(select("badge", u, 1, embeddings=x, labelled=labelled, seed=s)[0].index for s in range(6000))
    freq = np.array([counts[i] / 6000 for i in range(3)])
    assert np.abs(freq - expected).max() < 0.02


def test_random_and_top_and_determinism():
    u = np.linspace(0, 1, 50)
    assert [p.index for p in select("top", u, 3)] == [49, 48, 47]
    r1, r2 = select("random", u, 10, seed=4), select("random", u, 10, seed=4)
    assert [p.index for p in r1] == [p.index for p in r2] and len({p.index for p in r1}) == 10
    assert [p.index for p in select("random", u, 10, seed=5)] != [p.index for p in r1]
    x = np.random.default_rng(0).normal(size=(50, 8))
    for strategy in STRATEGIES:
        picks = select(strategy, u, 60, embeddings=x, seed=1)  # budget above the pool: all of it once
        assert sorted(p.index for p in picks) == list(range(50)) and [p.rank for p in picks] == list(range(50))


def test_duplicates_are_dropped_keeping_the_most_uncertain():
    x = unit([1, 0, 0], [1, 0.001, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1])
    u = [0.2, 0.8, 0.5, 0.4, 0.9]
    keys = ["a", "b", "c", "d", "a"]  # 0 and 4 are the same bytes
    assert near_duplicates(x, u, 0.999, keys) == [0, 3]  # 0: copy of 1 (and of 4's bytes); 3: copy of 4
    assert near_duplicates(x, u, 1.0, keys) == [0]  # exact copies only
    recent = RecentCaptures(size=2)
    recent.add("a", x[0])
    assert recent.is_duplicate("a", None, 1.0) and recent.is_duplicate("z", x[1], 0.999)
    assert not recent.is_duplicate("z", x[1], 1.0) and not recent.is_duplicate("z", x[2], 0.999)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: select("best", [0.1], 1), "unknown selection strategy 'best'; expected one of random"),
        (lambda: select("top", [0.1], 0), "budget must be a positive integer"),
        (lambda: select("kcenter", [0.1, 0.2], 1), "needs embeddings; use random, top or power"),
        (lambda: select("power", [0.1], 1, beta=0), "beta"),
        (lambda: select("top", [float("nan")], 1), "finite"),
        (lambda: select("kcenter", [0.1], 1, embeddings=np.zeros((1, 3))), "zero or non-finite"),
        (lambda: select("kcenter", [0.1], 1, embeddings=np.ones((1, 3)), labelled=np.ones((1, 2))), "dimensions"),
    ],
)
def test_bad_selection_arguments_name_the_problem(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# ----------------------------------------------------------------------------- signals


def test_uncertainty_statistics_weigh_the_small_classes():
    probs = np.zeros((3, 10, 10), np.float32)
    probs[0] = 0.98  # background: sure
    probs[1:] = 0.01
    probs[:, :2, :2] = 1 / 3  # a 4-pixel pet region the model is lost on
    probs[1, :2, :2] += 0.01
    s = semantic_uncertainty(probs)
    assert s["entropy"] < 0.2 and s["class_balanced_entropy"] > 0.5  # the small class counts as much
    assert 0.4 < s["top_entropy"] < 0.6  # the 10 worst pixels: the 4 lost ones and 6 of the background
    assert s["margin"] == pytest.approx(1 - (96 * 0.97 + 4 * 0.01) / 100, abs=1e-3)
    inst = instance_uncertainty(np.array([0.5, 0.99]), [0.0, 0.0], np.array([1, 2]))
    assert inst["score_uncertainty"] == pytest.approx((0.5 + 0.01) / 2)
    assert inst["entropy"] == pytest.approx(0.5 * 0.0 + 0.5 * (0.5 + 0.01) / 2)
    assert inst["max_instance_entropy"] == pytest.approx(0.25) and inst["margin"] == pytest.approx(1 - 0.49)
    assert instance_uncertainty(np.zeros(0), [], np.zeros(0))["entropy"] == 1.0


def test_pooled_embedding_is_unit_float16_of_the_deepest_map():
    feats = {"low": torch.ones(2, 4, 8, 8), "high": torch.arange(2 * 3 * 4.0).reshape(2, 3, 2, 2)}
    e = pooled_embedding(feats)
    assert e.dtype == np.float16 and e.shape == (2, 3)
    assert np.allclose(np.linalg.norm(e.astype(np.float32), axis=1), 1, atol=1e-3)


def test_capture_metadata_carries_embedding_and_statistics_and_old_records_still_read():
    rec = {
        "task": "semantic",
        "entropy": 0.4,
        "class_names": list(CLASSES),
        "model_version": "3",
        "uncertainty": {"entropy": 0.4, "class_balanced_entropy": 0.7, "margin": float("nan")},
        "embedding": np.array([0.6, 0.8], np.float16),
        "selected_by": "random",
    }
    cid = new_capture_id()
    meta, _, key = build_metadata(cid, dt.datetime.now(dt.UTC), b"\xff\xd8\xff..", None, rec)
    meta = json.loads(json.dumps(meta))  # as stored
    assert meta["uncertainty"] == {"entropy": 0.4, "class_balanced_entropy": 0.7}  # NaN dropped
    assert meta["selected_by"] == "random" and meta["embedding"]["model_version"] == "3"
    assert np.allclose(decode_embedding(meta["embedding"]), [0.6, 0.8], atol=1e-3)
    record = q.CaptureRecord.from_meta(meta, key)
    sig = stored_signals(record)
    assert sig.uncertainty["class_balanced_entropy"] == 0.7 and sig.model_version == "3"
    # An older capture (no statistics, no embedding): entropy only.
    old = {k: v for k, v in meta.items() if k not in ("uncertainty", "embedding", "selected_by")}
    sig = stored_signals(q.CaptureRecord.from_meta(old, key))
    assert sig.uncertainty == {"entropy": 0.4} and sig.embedding is None
    assert decode_embedding({"dtype": "float16", "dim": 3, "data": "!!"}) is None
    assert encode_embedding(np.array([np.inf])) is None


def test_capturer_keeps_a_random_share_and_drops_copies():
    x = unit([1, 0, 0], [0, 1, 0])

    def record(entropy: float, emb: np.ndarray) -> dict:
        return {"task": "semantic", "entropy": entropy, "class_names": list(CLASSES), "embedding": emb}

    with tempfile.TemporaryDirectory() as d:
        policy = {"mode": "entropy", "threshold": 0.9, "random_fraction": 0.5, "near_duplicate_cosine": 0.99}
        with Capturer(LocalStore(Path(d)), policy) as cap:
            kept = [
                cap.offer(b"\xff\xd8\xff" + bytes([i % 250, i // 250]), None, record(0.1, None)) for i in range(400)
            ]
            assert 140 < sum(kept) < 260  # about half the traffic below the threshold
            assert cap.offer(b"\xff\xd8\xffA", None, record(0.95, x[0]))
            assert cap.offer(b"\xff\xd8\xffA", None, record(0.95, x[0]))  # same bytes: queued, not stored
            assert cap.offer(b"\xff\xd8\xffB", None, record(0.95, x[0] * 0.999 + x[1] * 0.001))  # near copy
            assert cap.offer(b"\xff\xd8\xffC", None, record(0.95, x[1]))
            assert cap.flush(20)
            stats = cap.stats()
        metas = [LocalStore(Path(d)).get_json(k) for k in LocalStore(Path(d)).list("captures/") if k.endswith(".json")]
    assert stats["duplicate"] == 2 and stats["stored"] == sum(kept) + 2
    assert Counter(m["selected_by"] for m in metas) == {"random": sum(kept), "policy": 2}


# ----------------------------------------------------------------------------- export on S3


def capture_with_signals(store, root: Path, names: list[str], version: str = "1") -> dict[str, str]:
    """Captures of the named pets whose embeddings put the first half in one cluster, the rest in another."""
    rng = np.random.default_rng(0)
    with Capturer(store, "all") as cap:
        for i, name in enumerate(names):
            labels = np.select([trimap_of(root, name) == 1, trimap_of(root, name) == 3], [1, 2], 0).astype(np.uint8)
            centre = [1.0, 0.0, 0.0] if i < len(names) // 2 else [0.0, 1.0, 0.0]
            rec = {
                "task": "semantic",
                "entropy": 0.9 - 0.05 * i,
                "confidence": 0.5,
                "class_names": list(CLASSES),
                "class_fractions": {c: 1 / 3 for c in CLASSES},
                "mask_png": encode_png(labels),
                "width": labels.shape[1],
                "height": labels.shape[0],
                "model": {"name": "segloop-pets", "version": version, "uri": "u"},
                "model_version": version,
                "uncertainty": {"entropy": 0.9 - 0.05 * i, "class_balanced_entropy": 0.9 - 0.05 * i},
                "embedding": clusters(rng, centre, 1)[0].astype(np.float16),
            }
            assert cap.offer((root / "images" / f"{name}.jpg").read_bytes(), "image/jpeg", rec)
        assert cap.flush(30) and cap.stats()["stored"] == len(names)
    by_sha = {hashlib.sha256((root / "images" / f"{n}.jpg").read_bytes()).hexdigest(): n for n in names}
    return {by_sha[r.meta["image_sha256"]]: r.id for r in q.list_captures(store) if r.meta["image_sha256"] in by_sha}


def test_export_cli_with_each_strategy_on_s3(s3_server, tmp_path, pets, monkeypatch, capsys):
    store = make_s3_store(s3_server)
    names = pet_names(pets)[:8]
    ids = capture_with_signals(store, pets, names)
    monkeypatch.setenv("SEGLOOP_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("SEGLOOP_S3_ACCESS_KEY", "testing")
    monkeypatch.setenv("SEGLOOP_S3_SECRET_KEY", "testing")
    url = f"s3://{store.bucket}"
    for strategy in STRATEGIES:
        out = tmp_path / strategy
        argv = ["--store", url, "export", "--strategy", strategy, "--budget", "2", "--seed", "1", "--out", str(out)]
        assert q.main(argv) == 0, strategy
        index = json.loads((out / "export.json").read_text())
        sel = index["selection"]
        assert sel["strategy"] == strategy and sel["budget"] == 2 and len(sel["picks"]) == 2
        assert [c["selection"]["rank"] for c in index["captures"]] == [0, 1]
        assert all({"uncertainty", "reason"} <= set(c["selection"]) for c in index["captures"])
        picked = {c["id"] for c in index["captures"]}
        if strategy == "top":
            assert picked == {ids[names[0]], ids[names[1]]}  # both from the first cluster
        if strategy == "kcenter":
            assert picked == {ids[names[0]], ids[names[4]]}  # the most uncertain, then the other cluster
        assert f"chosen by {strategy}" in capsys.readouterr().out
    # --top keeps its meaning; bad flags are named.
    assert q.main(["--store", url, "export", "--top", "3", "--out", str(tmp_path / "top3")]) == 0
    assert len(json.loads((tmp_path / "top3" / "export.json").read_text())["captures"]) == 3
    capsys.readouterr()
    assert q.main(["--store", url, "export", "--out", str(tmp_path / "x")]) == 2
    assert "needs --budget N" in capsys.readouterr().err
    assert (
        q.main(
            ["--store", url, "export", "--budget", "2", "--rescore", "models:/m@champion", "--out", str(tmp_path / "y")]
        )
        == 2
    )
    assert "--rescore needs the model code" in capsys.readouterr().err


def test_selection_refuses_embeddings_it_cannot_compare(tmp_path, pets):
    store = LocalStore(tmp_path / "s")
    names = pet_names(pets)
    capture_with_signals(store, pets, names[:4], version="1")
    capture_with_signals(store, pets, names[4:7], version="2")
    recs = q.list_captures(store)
    with pytest.raises(ConfigError, match=r"model versions \['1', '2'\].*--model-version V, or --rescore"):
        select_captures(recs, SelectionSpec("kcenter", 2))
    assert len(select_captures(recs, SelectionSpec("power", 2)).records) == 2  # no distances needed
    old = [q.CaptureRecord.from_meta({k: v for k, v in r.meta.items() if k != "embedding"}, r.json_key) for r in recs]
    with pytest.raises(ConfigError, match="have no embedding .*--rescore MODEL_URI or use --strategy random"):
        select_captures(old, SelectionSpec("badge", 2))
    # Captures already in a dataset are the labelled set: kcenter keeps away from their cluster.
    n0, n1, n2, _ = sorted((r for r in recs if r.model_version == "1"), key=lambda r: r.entropy, reverse=True)
    # n0 and n1 share one cluster, n2 is in the other; n1 is more uncertain than n2
    assert select_captures([n1, n2], SelectionSpec("top", 1), labelled=[n0]).records == [n1]
    chosen = select_captures([n1, n2], SelectionSpec("kcenter", 1), labelled=[n0])
    assert chosen.records == [n2] and chosen.picks[0].distance > 0.5
    assert select_captures([n1, n2], SelectionSpec("kcenter", 1)).records == [n1]  # nothing labelled
    with pytest.raises(ConfigError, match="no capture records the statistic 'max_instance_entropy'"):
        select_captures([n0, n1], SelectionSpec("top", 1, score="max_instance_entropy"))


# ----------------------------------------------------------------------------- the predictor and re-scoring


@pytest.mark.parametrize("spec, dim", [("SEMANTIC", 960), ("INSTANCE", 256)])
def test_the_predictor_embeds_from_the_same_forward_pass(spec, dim):
    from tests.serve_helpers import INSTANCE, SEMANTIC
    from train.model_ref import ModelMeta
    from train.models import build_model, model_task
    from train.rescore import output_signals

    s = {"SEMANTIC": SEMANTIC, "INSTANCE": INSTANCE}[spec]
    torch.manual_seed(0)
    model = build_model(s["model"], len(s["class_names"]), **s["model_kwargs"])
    meta = ModelMeta(
        s["model"], model_task(s["model"]), len(s["class_names"]), s["class_names"], s["image_size"], s["model_kwargs"]
    )
    from train.predict import Predictor

    pred = Predictor.from_state(meta, model.state_dict(), version="7")
    images = [np.random.default_rng(i).integers(0, 255, (80, 96, 3), dtype=np.uint8) for i in range(3)]
    outs, _ = pred.predict(images)
    embs = np.stack([o.embedding.astype(np.float32) for o in outs])
    assert embs.shape == (3, dim) and np.allclose(np.linalg.norm(embs, axis=1), 1, atol=1e-2)
    alone, _ = pred.predict(images[1:2])  # the batch does not change an image's embedding
    assert np.allclose(alone[0].embedding.astype(np.float32), embs[1], atol=2e-3)
    sig = output_signals(outs[0], pred.version)
    assert sig.model_version == "7" and 0 <= sig.uncertainty["entropy"] <= 1
    assert all(not m._forward_hooks for m in pred.model.modules())  # the hook is gone after the call


def test_rescore_selects_old_captures_with_the_current_model(tmp_path, pets, capsys):
    from segloop.cli import main as segloop
    from tests.serve_helpers import SEMANTIC, save_checkpoint
    from tests.test_queue import capture_pets

    store = LocalStore(tmp_path / "store")
    names = pet_names(pets)[:6]
    capture_pets(store, pets, {n: 0.5 for n in names})  # captured before embeddings were recorded
    base = ["queue", "--store", str(tmp_path / "store"), "export", "--strategy", "kcenter", "--budget", "3"]
    assert segloop([*base, "--out", str(tmp_path / "a")]) == 2
    assert "have no embedding" in capsys.readouterr().err
    ckpt = save_checkpoint(tmp_path / "m.pt", SEMANTIC)
    assert segloop([*base, "--rescore", f"checkpoint:{ckpt}", "--out", str(tmp_path / "b")]) == 0
    assert "re-scored with m.pt/ckpt-" in capsys.readouterr().out
    index = json.loads((tmp_path / "b" / "export.json").read_text())
    assert index["selection"]["rescored_with"].startswith("m.pt/ckpt-") and len(index["captures"]) == 3
    scores = [c["selection"]["uncertainty"] for c in index["captures"]]
    assert all(0 <= s <= 1 for s in scores) and len(set(scores)) == 3  # the model's numbers, not the stored 0.5
    assert index["selection"]["labelled_embeddings"] == 0
    # What a dataset version already holds is labelled: re-scoring embeds its images for kcenter.
    version = create_version(store, "pets", pets, task="semantic")
    argv = [*base, "--rescore", f"checkpoint:{ckpt}", "--exclude-dataset", f"pets@{version.version}"]
    assert segloop([*argv, "--out", str(tmp_path / "c")]) == 0
    index = json.loads((tmp_path / "c" / "export.json").read_text())
    assert index["selection"]["labelled_embeddings"] == len(list((pets / "images").glob("*.jpg")))


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_label_efficiency_bench_quick_runs(tmp_path):
    """``bench/label_efficiency.py --quick``: every strategy, both scenarios, the tables and the JSON."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "label_efficiency.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for needle in (
        "#### balanced pool",
        "#### production pool",
        "what each strategy picked",
        "labels to reach random@4",
    ):
        assert needle in text
    rows = json.loads(out.read_text())["rows"]
    per_run = Counter((r["scenario"], r["strategy"], r["k"]) for r in rows if r["scenario"] != "v1")
    assert set(per_run.values()) == {2}  # two paired repetitions of every cell
    assert {s for _, s, _ in per_run} == {*STRATEGIES, "full pool"}
    assert all(len(r["picked"]) == r["k"] for r in rows if r["strategy"] in STRATEGIES)


def test_capture_signals_never_fail_a_prediction(tmp_path, monkeypatch):
    import serve_app.model as sm
    import train.predict
    from serve_app.config import ModelSettings
    from tests.serve_helpers import SEMANTIC, save_checkpoint

    lm = sm.load_model(ModelSettings(model_uri=f"checkpoint:{save_checkpoint(tmp_path / 'm.pt', SEMANTIC)}"))
    image = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    (ok,), _ = sm.run_batch(lm, [image], capture=True)
    assert set(ok[sm.CAPTURE_KEY]) == {"uncertainty", "embedding"}

    def broken(probs):
        raise ValueError("statistics broke")

    monkeypatch.setattr(train.predict, "semantic_uncertainty", broken)  # a fault in the capture maths
    (res,), _ = sm.run_batch(lm, [image], capture=True)
    assert res[sm.CAPTURE_KEY] == {} and res["entropy"] == ok["entropy"]  # answered, without signals


def test_a_capture_dropped_over_budget_is_not_a_duplicate_later(tmp_path):
    answers = iter([False, True])
    with Capturer(LocalStore(tmp_path / "s"), "all", budget=lambda n: next(answers)) as cap:
        rec = {"task": "semantic", "entropy": 0.5, "class_names": list(CLASSES)}
        assert cap.offer(b"\xff\xd8\xffX", None, rec) and cap.flush(10)
        assert cap.offer(b"\xff\xd8\xffX", None, rec) and cap.flush(10)
        stats = cap.stats()
    assert (stats["over_budget"], stats["stored"], stats["duplicate"]) == (1, 1, 0)


def test_policies_without_the_new_fields_stay_readable_by_older_replicas(tmp_path):
    from pydantic import BaseModel, ConfigDict

    from dataplane.capture import write_policy

    class OldPolicy(BaseModel):  # the policy model replicas shipped with before selection
        model_config = ConfigDict(extra="forbid", frozen=True)
        mode: str = "off"
        threshold: float = 0.5
        fraction: float = 0.1
        window: int = 200

    store = LocalStore(tmp_path / "s")
    write_policy(store, {"mode": "entropy", "threshold": 0.3})
    assert OldPolicy.model_validate(store.get_json("control/capture_policy.json")).threshold == 0.3
    write_policy(store, {"mode": "entropy", "random_fraction": 0.05})
    assert store.get_json("control/capture_policy.json")["random_fraction"] == 0.05  # written when used


def test_rescore_leaves_out_a_capture_whose_image_is_gone(tmp_path, pets, capsys):
    from segloop.cli import main as segloop
    from tests.serve_helpers import SEMANTIC, save_checkpoint
    from tests.test_queue import capture_pets

    store = LocalStore(tmp_path / "store")
    ids = capture_pets(store, pets, {n: 0.5 for n in pet_names(pets)[:4]})
    gone = q.get_capture(store, next(iter(ids.values())))
    store.delete(gone.image_key)
    ckpt = save_checkpoint(tmp_path / "m.pt", SEMANTIC)
    argv = ["queue", "--store", str(tmp_path / "store"), "export", "--strategy", "badge", "--budget", "4"]
    assert segloop([*argv, "--rescore", f"checkpoint:{ckpt}", "--out", str(tmp_path / "out")]) == 0
    index = json.loads((tmp_path / "out" / "export.json").read_text())
    assert len(index["captures"]) == 3 and gone.id not in {c["id"] for c in index["captures"]}
    assert any(gone.id in p and "not re-scored" in p for p in index["problems"])
