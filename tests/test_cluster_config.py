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
