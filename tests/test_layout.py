"""The layout contract: one home per concern, checked by reading every module's imports.

* nothing imports ``serve_app`` (the request path) but ``serve_app`` itself, tests and bench;
* the data plane (``dataplane``) imports neither training, search, serving nor the control plane;
* training (``train``) and search (``tune``) do not import the control plane (``monitoring``);
* the core (``segloop.errors``, ``segloop.config``, ``segloop.settings``) imports no layer above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segloop", "dataplane", "monitoring", "train", "tune", "serve_app")
CORE = ("segloop.errors", "segloop.config", "segloop.settings")

# (importer prefix, forbidden top-level packages)
FORBIDDEN = [
    ("dataplane", {"train", "tune", "serve_app", "monitoring"}),
    ("train", {"tune", "serve_app", "monitoring"}),
    ("tune", {"serve_app", "monitoring"}),
    ("monitoring", {"serve_app"}),
    ("segloop", {"serve_app"}),
    *[(core, {"train", "tune", "serve_app", "monitoring"}) for core in CORE],
]


def project_imports() -> dict[str, set[str]]:
    """``module -> {imported project modules}`` for every module outside tests/ and bench/."""
    out: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
            out[module] = {n for n in names if n.split(".")[0] in PACKAGES}
    return out


def violations(imports: dict[str, set[str]]) -> list[str]:
    found = []
    for module, names in imports.items():
        for prefix, banned in FORBIDDEN:
            if module == prefix or module.startswith(prefix + "."):
                found += [f"{module} imports {n}" for n in sorted(names) if n.split(".")[0] in banned]
    return sorted(set(found))


def test_import_directions():
    imports = project_imports()
    assert len(imports) > 40, "the scan found too few modules"
    assert violations(imports) == []


def test_the_check_catches_a_forbidden_import():
    assert violations({"dataplane.store": {"train.models"}}) == ["dataplane.store imports train.models"]
    assert violations({"monitoring.actor": {"serve_app.app"}}) == ["monitoring.actor imports serve_app.app"]
    assert violations({"segloop.settings": {"monitoring.actor"}}) == ["segloop.settings imports monitoring.actor"]
    assert violations({"serve_app.model": {"train.predict"}, "monitoring.serving": {"train.predict"}}) == []


@pytest.mark.parametrize(
    "path",
    [
        "serve_app",
        "train",
        "tune",
        "dataplane",
        "monitoring",
        "segloop",
        "bench",
        "configs",
        "tests",
        "cluster.yaml",
        "serve_config.yaml",
        "pyproject.toml",
        "Makefile",
        "README.md",
        ".ci/run",
        "configs/monitor.yaml",
    ],
)
def test_top_level_layout(path):
    assert (ROOT / path).exists()


def test_control_plane_names_match_the_app():
    """The control plane names the app by strings (it never imports it): they must be the app's."""
    import yaml

    from monitoring import serving
    from serve_app import app, model

    assert model.MODEL_DEPLOYMENT == serving.MODEL_DEPLOYMENT
    module, _, attr = serving.IMPORT_PATH.partition(":")
    assert module == app.__name__ and callable(getattr(app, attr))
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (entry,) = config["applications"]
    assert entry["name"] == serving.APP_NAME and entry["import_path"] == serving.IMPORT_PATH
    assert serving.MODEL_DEPLOYMENT in {d["name"] for d in entry["deployments"]}


def test_serve_deploy_reads_serve_config_with_overrides():
    """`segloop serve deploy` overrides: model.KEY goes to the model deployment's user_config, the rest to args."""
    from monitoring import serving
    from segloop.errors import ConfigError

    data = serving._load_serve_config(
        str(ROOT / "serve_config.yaml"), ["model.model_uri=models:/other/3", "max_pixels=4096"]
    )
    (app,) = data["applications"]
    model = next(d for d in app["deployments"] if d["name"] == serving.MODEL_DEPLOYMENT)
    assert model["user_config"]["model_uri"] == "models:/other/3"
    assert model["user_config"]["max_batch_size"] == 8  # the rest of the file's settings stay
    assert app["args"]["max_pixels"] == 4096 and app["args"]["data_dir"] == ".segloop"
    entry = serving.app_config({**app["args"], "model": {"model_uri": "models:/m/1"}})
    assert entry["import_path"] == serving.IMPORT_PATH and Path(entry["args"]["data_dir"]).is_absolute()
    assert entry["deployments"][0]["user_config"]["model_uri"] == "models:/m/1"
    with pytest.raises(ConfigError, match="does not exist"):
        serving._load_serve_config(str(ROOT / "no-such.yaml"), [])
    with pytest.raises(ConfigError, match="key=value"):
        serving._load_serve_config(str(ROOT / "serve_config.yaml"), ["oops"])
