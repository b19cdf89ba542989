"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema) and installs segloop."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_cluster_yaml_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import validate_config

    cfg = _prepared()
    validate_config(cfg)
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_schema_check_is_real() -> None:
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(_prepared())
    bad["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


# --- kuberay.yaml: a RayService whose serveConfigV2 is serve_config.yaml's application ---------------


def _serve_schema(cfg: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(cfg)


def _rayservice() -> dict:
    return yaml.safe_load((ROOT / "kuberay.yaml").read_text())


def test_serve_configs_pass_rays_serve_schema_and_app_args() -> None:
    from serve_app.config import AppArgs

    for cfg in (
        yaml.safe_load((ROOT / "serve_config.yaml").read_text()),
        yaml.safe_load(_rayservice()["spec"]["serveConfigV2"]),
    ):
        schema = _serve_schema(cfg)
        (app,) = schema.applications
        assert app.import_path == "serve_app.app:build_app"
        AppArgs.model_validate(app.args)  # what build_app will be called with


def test_serve_schema_check_is_real() -> None:
    import pydantic

    cfg = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    cfg["applications"][0]["deployments"][1]["max_ongoing_requests"] = "lots"
    with pytest.raises(pydantic.ValidationError):
        _serve_schema(cfg)


def test_rayservice_runs_the_same_app_as_serve_config() -> None:
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    kube = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"][0]
    for key in ("name", "route_prefix", "import_path"):
        assert kube[key] == local[key]
    deps = {d["name"]: d for d in local["deployments"]}
    for d in kube["deployments"]:
        assert d["name"] in deps
        assert d.get("user_config") == deps[d["name"]].get("user_config")
    # cluster-only differences: no local data_dir (MLflow/S3 come from the Secret), GPU model replicas
    assert "data_dir" not in kube["args"]
    assert {k: v for k, v in kube["args"].items()} == {k: v for k, v in local["args"].items() if k != "data_dir"}


def test_rayservice_cluster_shape() -> None:
    svc = _rayservice()
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    cluster = svc["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and groups["gpu"]["minReplicas"] == 0
    model = next(
        d
        for d in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"]
        if d["name"] == "SegModel"
    )
    assert model["ray_actor_options"]["num_gpus"] == 1
    for c in [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]
    ]:
        assert c["envFrom"] == [{"secretRef": {"name": "segloop"}}]  # secrets only from the environment
        assert not c.get("env")
