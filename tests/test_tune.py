"""``python -m tune``: search-space validation, ASHA over Ray Train, MLflow parent/child runs, resume.

Bad input is checked without Ray. The two slow tests run real searches on the session's
local Ray cluster (4 logical CPUs, 1-worker trials, 64 px synthetic pets).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segloop.errors import ConfigError
from tune.config import ParamSpec, SearchConfig, in_space, load_search_config, resolve, to_tune_space

REPO = Path(__file__).resolve().parents[1]


def base_cfg(pets_root: Path | str, data_dir: Path | str, **kw) -> dict:
    base = dict(
        task="semantic",
        dataset=str(pets_root),
        image_size=64,
        epochs=3,
        batch_size=8,
        lr=0.005,
        bn_momentum=0.1,
        num_workers=1,
        data_dir=str(data_dir),
        experiment="test-tune",
        registered_model="test-tune",
        patience=0,
        seed=0,
    )
    base.update(kw)
    return base


def search(tmp_path: Path, **kw) -> SearchConfig:
    data = dict(
        base=base_cfg(tmp_path / "pets", tmp_path), space={"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    )
    data.update(kw)
    return SearchConfig.model_validate(data)


def write(tmp_path: Path, data: dict) -> Path:
    f = tmp_path / "tune.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


# ----------------------------------------------------------------------------- bad input, no Ray needed
def test_empty_space_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="search space is empty"):
        resolve(search(tmp_path, space={}))
    with pytest.raises(ConfigError, match="search space is empty"):
        load_search_config(write(tmp_path, {"base": base_cfg("x", tmp_path)}))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"type": "uniform", "low": 0.1, "high": 0.01}, "low must be < high"),
        ({"type": "loguniform", "low": 0.0, "high": 0.01}, "loguniform needs low > 0"),
        ({"type": "uniform", "low": 0.1}, "needs both `low` and `high`"),
        ({"type": "choice"}, "non-empty list `values`"),
        ({"type": "choice", "values": []}, "non-empty list `values`"),
        ({"type": "quniform", "low": 0.0, "high": 1.0}, "quniform needs `q`"),
        ({"type": "normal", "low": 0.0, "high": 1.0}, "space.lr.type"),
        ({"type": "uniform", "low": 0.001, "high": 0.01, "step": 2}, "space.lr.step"),
        (0.01, "space.lr"),
    ],
)
def test_malformed_space_entries_are_clear_errors(tmp_path: Path, entry: object, message: str) -> None:
    f = write(tmp_path, {"base": base_cfg("x", tmp_path), "space": {"lr": entry}})
    with pytest.raises(ConfigError, match="space.lr") as e:
        load_search_config(f)
    assert message in str(e.value)


def test_space_must_be_a_mapping(tmp_path: Path) -> None:
    f = write(tmp_path, {"base": base_cfg("x", tmp_path), "space": ["lr"]})
    with pytest.raises(ConfigError, match="space: must be a mapping"):
        load_search_config(f)


def test_unknown_hyperparameter_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(search(tmp_path, space={"learning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}}))
    msg = str(e.value)
    assert "space.learning_rate: unknown hyperparameter" in msg and "lr" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match="space.epochs: not tunable .*max_t"):
        resolve(search(tmp_path, space={"epochs": {"type": "randint", "low": 1, "high": 5}}))


def test_values_are_checked_against_the_training_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="space.image_size: value 8 is not a valid image_size"):
        resolve(search(tmp_path, space={"image_size": {"type": "choice", "values": [64, 8]}}))
    with pytest.raises(ConfigError, match="space.batch_size: integer field"):
        resolve(search(tmp_path, space={"batch_size": {"type": "loguniform", "low": 4, "high": 32}}))
    with pytest.raises(ConfigError, match="space.optimizer: .*use type choice"):
        resolve(search(tmp_path, space={"optimizer": {"type": "uniform", "low": 0, "high": 1}}))
    with pytest.raises(ConfigError, match="space.optimizer: value 'lion'"):
        resolve(search(tmp_path, space={"optimizer": {"type": "choice", "values": ["adamw", "lion"]}}))
    with pytest.raises(ConfigError, match="not semantic models"):
        resolve(search(tmp_path, space={"model": {"type": "choice", "values": ["maskrcnn_resnet50_fpn_v2"]}}))
    with pytest.raises(ConfigError, match="ce_weight and dice_weight can both be 0"):
        resolve(
            search(
                tmp_path,
                space={
                    "ce_weight": {"type": "uniform", "low": 0, "high": 1},
                    "dice_weight": {"type": "choice", "values": [0, 0.5]},
                },
            )
        )


def test_num_samples_and_asha_settings(tmp_path: Path) -> None:
    f = write(
        tmp_path, {"base": base_cfg("x", tmp_path), "space": {"lr": {"type": "uniform", "low": 0.001, "high": 0.01}}}
    )
    with pytest.raises(ConfigError, match="num_samples"):
        load_search_config(f, ["num_samples=0"])
    with pytest.raises(ConfigError, match="grace_period=5 must be <= max_t=3"):
        load_search_config(f, ["grace_period=5"])
    with pytest.raises(ConfigError, match="max_t=9 is larger than the base config's epochs=3"):
        load_search_config(f, ["max_t=9"])
    rs = load_search_config(f, ["num_samples=3", "base.epochs=5", "mode=min", "metric=val_loss"])
    assert (rs.search.num_samples, rs.max_t, rs.metric, rs.search.mode) == (3, 5, "val_loss", "min")
    assert load_search_config(f).metric == "val_miou"  # the base task's metric by default


def test_cli_reports_bad_input_before_any_trial(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        {"base": base_cfg(tmp_path / "missing", tmp_path / "dd"), "space": {"foo": {"type": "choice", "values": [1]}}},
    )
    out = subprocess.run(
        [sys.executable, "-m", "tune", "--config", str(f), "--num-samples", "4"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "space.foo: unknown hyperparameter" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "tune", "--config", str(f), "--num-samples", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2 and "num_samples" in out.stderr
    assert not (tmp_path / "dd").exists()  # nothing started: no MLflow store, no Ray results


def test_shipped_config_and_base_path(tmp_path: Path) -> None:
    rs = load_search_config(REPO / "configs" / "tune_pets.yaml", ["base.epochs=4", "num_samples=2"])
    assert rs.base.model == "lraspp_mobilenet_v3_large" and rs.max_t == 4 and rs.search.num_samples == 2
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.yaml").write_text(yaml.safe_dump(base_cfg("x", tmp_path)))
    f = write(
        tmp_path / "sub", {"base": "train.yaml", "space": {"lr": {"type": "uniform", "low": 0.001, "high": 0.01}}}
    )
    assert load_search_config(f, ["base.lr=0.5"]).base.lr == 0.5  # relative to the search file; base.* overrides
    with pytest.raises(ConfigError, match="base config 'nope.yaml' not found"):
        load_search_config(f, ["base=nope.yaml"])


def test_sampling_stays_in_space() -> None:
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    space = {
        "lr": ParamSpec(type="loguniform", low=1e-4, high=1e-2),
        "batch_size": ParamSpec(type="quniform", low=4, high=32, q=4),
        "seed": ParamSpec(type="randint", low=0, high=3),
        "dice_weight": ParamSpec(type="uniform", low=0.0, high=1.0),
        "optimizer": ParamSpec(type="choice", values=["adamw", "sgd"]),
    }
    rng = _BackwardsCompatibleNumpyRng(0)
    for _ in range(50):
        _, spec = next(generate_variants({"config": to_tune_space(space)}, random_state=rng))
        params = spec["config"]
        assert in_space(space, params), params
        assert isinstance(params["batch_size"], int) and params["batch_size"] % 4 == 0
        assert isinstance(params["seed"], int) and params["seed"] in (0, 1, 2)
    assert not in_space(space, {**params, "lr": 0.5})


def test_resume_decision(tmp_path: Path) -> None:
    from ray.tune.impl.tuner_internal import _TUNER_PKL

    from tune.search import FINGERPRINT_FILE, resume_decision

    exp = tmp_path / "tune_results" / "s"
    assert resume_decision(exp, resume=False) == "fresh"
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_decision(exp, resume=True)
    exp.mkdir(parents=True)
    assert resume_decision(exp, resume=False) == "fresh"  # a directory without Tune state
    (exp / _TUNER_PKL).write_bytes(b"")  # what Tuner.can_restore looks for
    (exp / FINGERPRINT_FILE).write_text(json.dumps({"num_samples": 4, "space": {"lr": {"type": "uniform"}}}))
    assert (
        resume_decision(exp, resume=True, current={"num_samples": 4, "space": {"lr": {"type": "uniform"}}}) == "restore"
    )
    with pytest.raises(ConfigError, match="different config .*num_samples"):
        resume_decision(exp, resume=False, current={"num_samples": 8, "space": {"lr": {"type": "uniform"}}})


def test_concurrency_fits_the_cluster(tmp_path: Path) -> None:
    from tune.search import max_concurrency, trial_resources

    head = {"node:__internal_head__": 1.0}
    rs = resolve(search(tmp_path, num_samples=8, base=base_cfg("x", tmp_path, num_workers=2)))
    assert trial_resources({"CPU": 8, **head}) == {"node:__internal_head__": 0.001}
    assert max_concurrency(rs, {"CPU": 8, **head}, use_gpu=False) == 4
    assert max_concurrency(rs, {"CPU": 8}, use_gpu=False) == 2  # no head resource: each trial takes 1 CPU too
    assert max_concurrency(rs, {"CPU": 64, "GPU": 4, **head}, use_gpu=True) == 2
    rs.search.max_concurrent_trials = 1
    assert max_concurrency(rs, {"CPU": 8, **head}, use_gpu=False) == 1


def test_summary_table_counts_saved_trial_epochs() -> None:
    from tune.search import SearchResult, TrialRow, format_table, markdown_table

    rows = [
        TrialRow("t0", {"lr": 0.01}, 0.5, 0.55, 3, "completed"),
        TrialRow("t1", {"lr": 0.001}, 0.3, 0.3, 1, "asha"),
        TrialRow("t2", {"lr": 0.002}, 0.4, 0.4, 2, "asha"),
        TrialRow("t3", {"lr": 0.003}, None, None, 0, "error"),
    ]
    res = SearchResult("s", "/x", "p", "val_miou", "max", 3, 4, rows, rows[0], interrupted=False)
    assert (res.trial_epochs, res.budget, round(res.saved_pct)) == (6, 12, 50)
    table = format_table(res)
    assert "t0 *" in table and "yes (ASHA)" in table and "trial-epochs run: 6 of 12" in table and "(50%)" in table
    assert "| t1 | 0.001 |" in markdown_table(res)


# ----------------------------------------------------------------------------- real searches
@pytest.fixture()
def own_mlflow_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI, which tracking_uri() prefers over
    ``data_dir``: drop what an earlier test in this process left, so this test gets its own store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _children(client, exp_id: str, parent_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_search_asha_mlflow_register_and_rerun(
    ray_cluster, pets_root: Path, data_dir: Path, own_mlflow_store, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    from tune.search import run_search

    # lr 1e-7 barely moves the weights; seed 30 samples the two lr=0.01 trials first, so the
    # weak ones reach ASHA's first rung after good results are recorded there (ASHA's cut
    # depends on arrival order). val_loss separates the two clearly after one epoch.
    cfg = SearchConfig(
        base=base_cfg(pets_root, data_dir),
        space={
            "lr": {"type": "choice", "values": [0.01, 1e-7]},
            "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-3},
        },
        num_samples=4,
        max_concurrent_trials=2,
        grace_period=1,
        reduction_factor=2,
        metric="val_loss",
        mode="min",
        seed=30,
        name="pets-asha",
        register_best=True,
    )
    rs = resolve(cfg)
    res = run_search(rs)
    out = capsys.readouterr().out

    assert not res.interrupted and len(res.rows) == 4
    assert all(r.status in ("completed", "asha") for r in res.rows), res.rows
    stopped = [r for r in res.rows if r.status == "asha"]
    assert stopped and all(r.epochs < 3 for r in stopped)
    assert res.trial_epochs < res.budget == 12
    assert res.best is not None and in_space(rs.search.space, res.best.params)
    assert res.best.best == min(r.best for r in res.rows if r.best is not None)
    assert "stopped early" in out and f"trial-epochs run: {res.trial_epochs} of 12" in out

    client = mlflow.MlflowClient(f"sqlite:///{data_dir / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("test-tune").experiment_id
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["segloop.search"] == "pets-asha"
    assert parent.data.params["best.lr"] == str(res.best.params["lr"])
    assert parent.data.metrics["best_val_loss"] == pytest.approx(res.best.best)
    assert parent.data.metrics["trial_epochs_run"] == res.trial_epochs
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {"summary.md", "summary.csv"}
    children = _children(client, exp_id, res.parent_run_id)
    assert len(children) == 4
    by_trial = {c.data.tags["segloop.trial_id"]: c for c in children}
    for row in res.rows:
        child = by_trial[row.trial_id]
        assert child.data.params["lr"] == str(row.params["lr"]) and child.data.params["epochs"] == "3"
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert len(history) >= row.epochs >= 1
        assert child.info.status == ("KILLED" if row.status == "asha" else "FINISHED")
        assert child.data.tags["segloop.stopped_early"] == str(row.status == "asha").lower()

    # --register-best: the best trial's model went through the normal promotion (first model -> champion)
    assert res.model_version == "1" and res.promoted
    best_child = client.get_run(res.best.run_id)
    assert best_child.data.tags["segloop.model_version"] == "1" and "holdout_miou" in best_child.data.metrics
    mv = client.get_model_version_by_alias("test-tune", "champion")
    assert str(mv.version) == "1" and mv.run_id == res.best.run_id

    # the same name again: Tune restores the finished experiment, nothing is re-run
    cfg.register_best = False
    again = run_search(resolve(cfg))
    assert again.parent_run_id == res.parent_run_id
    assert [(r.trial_id, r.epochs, r.status) for r in again.rows] == [
        (r.trial_id, r.epochs, r.status) for r in res.rows
    ]
    assert len(_children(client, exp_id, res.parent_run_id)) == 4


@pytest.mark.slow
def test_failed_search_resumes_from_train_checkpoints(
    ray_cluster, pets_root: Path, data_dir: Path, own_mlflow_store
) -> None:
    import mlflow

    from tune.search import run_search

    # The trial dies at epoch 1 (test hook, no Train retries); running the same name again
    # resumes the errored trial, whose Train run continues from its epoch-0 checkpoint.
    cfg = SearchConfig(
        base=base_cfg(pets_root, data_dir, epochs=2, fail_at_epoch=1, max_failures=0),
        space={"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
        num_samples=1,
        grace_period=2,
        name="pets-resume",
    )
    first = run_search(resolve(cfg))
    assert [(r.status, r.epochs) for r in first.rows] == [("error", 1)]

    second = run_search(resolve(cfg))
    assert second.parent_run_id == first.parent_run_id
    assert [r.trial_id for r in second.rows] == [r.trial_id for r in first.rows]
    assert [(r.status, r.epochs) for r in second.rows] == [("completed", 2)]

    client = mlflow.MlflowClient(f"sqlite:///{data_dir / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("test-tune").experiment_id
    children = _children(client, exp_id, first.parent_run_id)
    assert len(children) == 1  # the resumed trial kept its child run
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_miou")]
        assert sorted(steps) == [0, 1]  # epoch 0 before the failure, epoch 1 after the resume, none twice
        assert child.info.status == "FINISHED"
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
