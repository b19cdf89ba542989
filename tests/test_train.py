"""The Ray Train job end to end: MLflow tracking, registry, promotion, rollback, fault tolerance.

Runs on the session's local Ray cluster with 2 CPU workers and tiny synthetic data.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest

from segloop.config import load_config
from segloop.errors import ConfigError, DatasetError
from train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def pets_cfg(pets_root: Path, data_dir: Path, **kw) -> TrainConfig:
    base = dict(
        task="semantic",
        dataset=str(pets_root),
        image_size=64,
        epochs=8,
        batch_size=4,
        lr=0.01,
        bn_momentum=0.1,
        num_workers=2,
        data_dir=str(data_dir),
        experiment="test-pets",
        registered_model="test-pets",
        patience=0,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- bad input, no Ray needed
def test_config_rejects_unknown_keys_and_bad_types(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("dataset: x\nepochs: many\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, f)
    assert "epochs" in str(e.value) and "learning_rate: unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="dataset"):
        load_config(TrainConfig, None, ["epochs=2"])


def test_overrides_keep_string_fields_as_written() -> None:
    # a content id can be all digits (and start with 0): YAML would make it an int
    cfg = load_config(TrainConfig, None, ["dataset_version=0197602178452887", "epochs=3", "lr=1e-3", "weights=null"])
    assert cfg.dataset_version == "0197602178452887"
    assert (cfg.epochs, cfg.lr, cfg.weights) == (3, 0.001, None)
    with pytest.raises(ConfigError, match="epochs"):
        load_config(TrainConfig, None, ["dataset=x", "epochs=3.5"])

    from tune.config import load_search_config

    search = load_search_config(REPO / "configs" / "tune_pets.yaml", ["base.dataset_version=0012", "base.epochs=2"])
    assert (search.base.dataset_version, search.base.epochs) == ("0012", 2)


def test_cli_reports_config_errors_with_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("[not, a, mapping]\n")
    out = subprocess.run([sys.executable, "-m", "train", "--config", str(f)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "must hold a mapping" in out.stderr and "Traceback" not in out.stderr


def test_missing_dataset_fails_before_work(tmp_path: Path) -> None:
    from train.run import resolve_dataset

    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset(TrainConfig(dataset=str(tmp_path / "nope")))


def test_unreachable_mlflow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port
    from train import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    t0 = time.time()
    with pytest.raises(ConfigError, match="not reachable"):
        tracking.setup(tmp_path, "x")
    assert time.time() - t0 < 30


def test_promotion_rule() -> None:
    from train.registry import decide

    assert decide(0.5, None, 0.0)[0]
    assert decide(0.6, 0.5, 0.05)[0]
    assert not decide(0.52, 0.5, 0.05)[0]
    assert not decide(0.5, 0.5, 0.0)[0]  # a tie does not replace the champion
    assert not decide(float("nan"), 0.5, 0.0)[0]


def test_promotion_metric_defaults_per_task_and_names_the_choices(tmp_path: Path) -> None:
    assert TrainConfig(task="instance", dataset="d").promotion_key == "val_segm_mAP50-95"
    assert TrainConfig(task="instance", dataset="d").metric == "val_fitness"  # checkpoints stay on fitness
    assert TrainConfig(task="instance", dataset="d", promotion_metric="val_fitness").promotion_key == "val_fitness"
    assert TrainConfig(dataset="d").promotion_key == "val_miou"
    with pytest.raises(
        ValueError, match=r"not a held-out metric of task 'instance'; expected one of val_segm_mAP50-95"
    ):
        TrainConfig(task="instance", dataset="d", promotion_metric="val_miou")
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        TrainConfig(dataset="d", init_checkpoint="models:/a/b/c")


def test_fine_tuning_starts_from_the_pinned_registered_version(tmp_path: Path) -> None:
    import mlflow
    import torch

    from segloop.errors import ModelError
    from tests.serve_helpers import SEMANTIC, register_model
    from train.job import pin_init_checkpoint
    from train.loop import load_registered_weights
    from train.models import build_model

    register_model(tmp_path, "pets-ft", SEMANTIC, seed=1)  # v1 holds champion
    register_model(tmp_path, "pets-ft", SEMANTIC, seed=2, alias=None)  # v2 holds nothing
    cfg = TrainConfig(dataset="d", image_size=64, init_checkpoint="models:/pets-ft@champion")
    pinned = pin_init_checkpoint(cfg)
    assert pinned.init_checkpoint == "models:/pets-ft/1" and pin_init_checkpoint(pets_cfg(tmp_path, tmp_path)) == (
        pets_cfg(tmp_path, tmp_path)
    )
    model = build_model(cfg.model, 3)
    load_registered_weights(model, pinned, mlflow.get_tracking_uri(), 3)
    torch.manual_seed(1)
    want = build_model(cfg.model, 3).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(ModelError, match=r"models:/pets-ft/1 \(version 1\) is a lraspp_mobilenet_v3_large with 3"):
        load_registered_weights(build_model(cfg.model, 5), pinned, mlflow.get_tracking_uri(), 5)
    with pytest.raises(ModelError, match="no version with alias 'gone'"):
        pin_init_checkpoint(cfg.model_copy(update={"init_checkpoint": "models:/pets-ft@gone"}))


# ----------------------------------------------------------------------------- Ray
def test_too_many_workers_is_rejected(ray_cluster, pets_root: Path, data_dir: Path) -> None:
    from train.run import check_resources

    with pytest.raises(ConfigError, match="needs 64 CPUs"):
        check_resources(pets_cfg(pets_root, data_dir, num_workers=64), use_gpu=False)
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(pets_cfg(pets_root, data_dir, num_workers=1), use_gpu=True)


def _progress_lines(text: str, epochs: int) -> list[int]:
    """Epoch numbers of the project's progress lines (``epoch 3/8 | ... | img/s | ... | ETA ...``)."""
    pattern = re.compile(rf"epoch (\d+)/{epochs} \|.* img/s \|.*\| ETA \d+m\d\ds$")
    return [int(m.group(1)) for line in text.splitlines() if (m := pattern.search(line))]


@pytest.mark.slow
def test_pets_train_track_register_promote_rollback(
    ray_cluster, pets_root: Path, data_dir: Path, capfd: pytest.CaptureFixture
) -> None:
    import torch

    from train import registry
    from train.job import evaluate_on_holdout, run
    from train.models import build_model

    cfg = pets_cfg(pets_root, data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(cfg)

    # a quiet run: one progress line per epoch and the decision, no Ray Train report dumps,
    # no MLflow warnings about how the model is logged (workers' lines reach the driver asynchronously)
    out = ""
    deadline = time.time() + 15
    while time.time() < deadline:
        cap = capfd.readouterr()
        out += cap.out + cap.err
        if len(_progress_lines(out, cfg.epochs)) >= cfg.epochs:
            break
        time.sleep(0.5)
    assert _progress_lines(out, cfg.epochs) == list(range(1, cfg.epochs + 1)), out[-3000:]
    assert "model test-pets v1: holdout val_miou=" in out and "-> promoted to champion" in out
    for noise in ("Reporting training result", "TrainingReport(", "Checkpoint successfully created"):
        assert noise not in out, noise
    mlflow_warnings = [str(w.message) for w in caught if "mlflow" in w.filename.replace("\\", "/")]
    for text in [*mlflow_warnings, out]:
        assert "cloudpickle" not in text.lower() and "type hint" not in text.lower(), text[-2000:]
    # the finished run's Train controller does not live on in the driver (idle worker processes)
    from ray.util.state import list_actors

    alive = [("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]
    deadline = time.time() + 30
    while list_actors(filters=alive) and time.time() < deadline:
        time.sleep(1)
    assert not list_actors(filters=alive)

    # learned something: clearly better than the same architecture untrained, on held-out data
    torch.manual_seed(0)
    untrained = evaluate_on_holdout(
        cfg.model_dump(mode="json"),
        {"name": "pets", "path": str(pets_root)},  # a train.run.DatasetSource
        build_model(cfg.model, 3).state_dict(),
        3,
        ["background", "pet", "border"],
    )
    assert result.holdout["val_miou"] > untrained["metrics"]["val_miou"] + 0.1, (result.holdout, untrained["metrics"])
    assert result.promoted and result.model_version == "1"

    client = mlflow.MlflowClient()
    run_ = client.get_run(result.run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["lr"] == "0.01" and run_.data.params["num_workers"] == "2"
    hist = client.get_metric_history(result.run_id, "val_miou")
    assert [m.step for m in hist] == list(range(cfg.epochs))
    assert any(k.startswith("system/") for k in run_.data.metrics), "system metrics were not logged"
    assert math.isfinite(run_.data.metrics["holdout_miou"])
    arts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/report.md", "report/confusion_matrix.png", "report/training_curves.png"} <= arts
    inputs = run_.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "pets" and len(inputs[0].dataset.digest) > 8
    assert registry.champion_version("test-pets") == "1"
    model, meta, version = registry.load_version("test-pets", "champion")
    assert version == "1" and meta.class_names == ["background", "pet", "border"]

    # a deliberately worse challenger is not promoted, and says why
    worse = run(pets_cfg(pets_root, data_dir, epochs=1, lr=1e-6, num_workers=1))
    assert worse.promoted is False and worse.model_version == "2"
    mv = client.get_model_version("test-pets", "2")
    assert mv.tags["segloop.decision"] == "rejected" and "does not beat champion" in mv.tags["segloop.reason"]
    assert float(mv.tags["segloop.champion_score"]) > float(mv.tags["segloop.challenger_score"])
    assert registry.champion_version("test-pets") == "1"

    # rollback: promote v2 by hand (as an operator would), then roll back to v1 through the CLI
    registry.record_decision("test-pets", registry.Decision(True, "2", 0.0, "1", 0.0, 0.0, "val_miou", "manual"))
    assert registry.champion_version("test-pets") == "2"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    out = subprocess.run(
        [sys.executable, "-m", "train", "rollback", "--model", "test-pets"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "from version 2 to version 1" in out.stdout
    assert registry.champion_version("test-pets") == "1"


@pytest.mark.slow
def test_light_maskrcnn_trains_one_epoch_and_logs_coco_map(ray_cluster, coco_root: Path, data_dir: Path) -> None:
    from train.job import run

    cfg = TrainConfig(
        task="instance",
        dataset=str(coco_root),
        dataset_name="coco",
        model="maskrcnn_mobilenet_v3_large_fpn",
        model_kwargs={"min_size": 96, "max_size": 96},
        epochs=1,
        batch_size=4,
        lr=1e-3,
        num_workers=1,
        data_dir=str(data_dir),
        experiment="test-coco",
        registered_model="test-coco",
    )
    result = run(cfg)
    run_ = mlflow.MlflowClient().get_run(result.run_id)
    for key in ("val_segm_mAP50-95", "val_bbox_mAP50", "val_fitness", "holdout_segm_mAP50-95"):
        assert key in run_.data.metrics and math.isfinite(run_.data.metrics[key]), key
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "report")}
    assert {"report/pr_curve.png", "report/f1_confidence.png", "report/confusion_matrix.png"} <= arts
    assert result.model_version == "1" and result.promoted
