"""The launch files: cluster.yaml (Ray cluster launcher) and kuberay.yaml (KubeRay RayService + MinIO + MLflow).

Checked here, without a cloud or Kubernetes: Ray's own schemas, the cluster profile (object store, MLflow,
Ray token auth) on every Ray node, no literal secrets, the MLflow and MinIO services and their wiring, and
a monitor start command that the real CLI accepts. cluster.yaml's shell commands are run in a sandbox HOME
with fake ``hostname``/``mlflow``/``curl`` where they touch the machine.
"""

from __future__ import annotations

import copy
import re
import shlex
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from segloop.settings import SERVE_FAST_PATH_ENV

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY_YAML = ROOT / "kuberay.yaml"
PROFILE = ". ~/.segloop/profile.sh"
PROFILE_KEYS = ("SEGLOOP_STORE", "SEGLOOP_S3_ENDPOINT", "MLFLOW_TRACKING_URI")
CREDENTIAL_KEYS = ("SEGLOOP_S3_ACCESS_KEY", "SEGLOOP_S3_SECRET_KEY")


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(_cluster())


def _kube_docs(text: str | None = None) -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text() if text is None else text) if d is not None]


def _doc(kind: str, name: str | None = None, docs: list[dict] | None = None) -> dict:
    found = [d for d in (docs or _kube_docs()) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in kuberay.yaml, found {len(found)}"
    return found[0]


def _rayservice() -> dict:
    return _doc("RayService")


# --- cluster.yaml: Ray's schema --------------------------------------------------------------------------


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


# --- cluster.yaml: token and profile on every node ----------------------------------------------------------


def test_cluster_yaml_mounts_the_ray_token_and_the_profile_on_every_node() -> None:
    cfg = _cluster()
    home = f"/home/{cfg['auth']['ssh_user']}"
    mounts = cfg["file_mounts"]
    # Ray reads ~/.ray/auth_token when RAY_AUTH_TOKEN is unset (the token `ray get-auth-token --generate` wrote)
    assert mounts[f"{home}/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts[f"{home}/.segloop/cluster.env"] == "~/.segloop/cluster.env"
    assert not cfg.get("file_mounts_sync_continuously")
    # the header documents every key the profile needs, uncommented
    documented = set(re.findall(r"^#\s+([A-Z][A-Z0-9_]+)=", CLUSTER_YAML.read_text(), re.M))
    assert {"SEGLOOP_STORE", "SEGLOOP_S3_ENDPOINT", *CREDENTIAL_KEYS} <= documented


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def node(tmp_path: Path) -> SimpleNamespace:
    """A sandbox HOME with a fake `hostname -I` (the head's private IP) on PATH."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / ".segloop").mkdir(parents=True)
    bin_dir.mkdir()
    _executable(bin_dir / "hostname", 'echo "10.9.8.7 172.17.0.1"\n')
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C"}
    return SimpleNamespace(home=home, bin=bin_dir, env=env)


def _bash(script: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _write_cluster_env(node: SimpleNamespace, **extra: str) -> None:
    values = {
        "SEGLOOP_STORE": "s3://segloop",
        "SEGLOOP_S3_ENDPOINT": "minio.test:9000",
        "SEGLOOP_S3_ACCESS_KEY": "test-access",
        "SEGLOOP_S3_SECRET_KEY": "test-secret-value",
        **extra,
    }
    (node.home / ".segloop" / "cluster.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def _initialize(node: SimpleNamespace, head_ip: str | None) -> None:
    env = dict(node.env, **({"RAY_HEAD_IP": head_ip} if head_ip else {}))  # the launcher sets it on workers
    for cmd in _cluster()["initialization_commands"]:
        r = _bash(cmd, env)
        assert r.returncode == 0, r.stderr


def _profile_env(node: SimpleNamespace, via: str = PROFILE) -> dict[str, str]:
    r = _bash(f"{via} && env -0", node.env)
    assert r.returncode == 0, r.stderr
    return dict(item.split("=", 1) for item in r.stdout.split("\0") if "=" in item)


@pytest.mark.parametrize("role,head_ip", [("head", None), ("worker", "10.9.8.7")])
def test_cluster_yaml_profile_reaches_every_node(node: SimpleNamespace, role: str, head_ip: str | None) -> None:
    from dataplane.store import store_config_from_url
    from segloop.settings import shared_service_problems

    _initialize(node, head_ip)
    _initialize(node, head_ip)  # idempotent: `ray up` runs it again on changes
    assert (node.home / ".bashrc").read_text().count(PROFILE) == 1
    _write_cluster_env(node)
    for via in (PROFILE, ". ~/.bashrc"):  # explicit (start commands) and what every launcher shell sources
        env = _profile_env(node, via)
        assert env["RAY_AUTH_MODE"] == "token"
        assert {k: env.get(k) for k in SERVE_FAST_PATH_ENV} == SERVE_FAST_PATH_ENV  # before `ray start`
        assert env["SEGLOOP_S3_SECRET_KEY"] == "test-secret-value"
        # the head's MLflow on its private IP, the same URI on the head and on workers
        assert env["MLFLOW_TRACKING_URI"] == "http://10.9.8.7:5000"
        # what the code checks before any multi-node work
        assert (
            shared_service_problems(store_config_from_url(env["SEGLOOP_STORE"], env), env["MLFLOW_TRACKING_URI"]) == []
        )


def test_cluster_yaml_profile_keeps_an_external_mlflow_and_refuses_a_missing_env_file(node: SimpleNamespace) -> None:
    _initialize(node, "10.9.8.7")
    r = _bash(f"{PROFILE} && echo started", node.env)
    assert "started" not in r.stdout and "cluster.env is missing" in r.stderr  # no profile: no `ray start`
    _write_cluster_env(node, MLFLOW_TRACKING_URI="http://mlflow.example.internal:5000")
    assert _profile_env(node)["MLFLOW_TRACKING_URI"] == "http://mlflow.example.internal:5000"


_CALLS = re.compile(r"\bray (start|stop)\b|\bmonitoring\.actor\b|\bsegloop monitor\b|\bmlflow server\b")


def test_cluster_yaml_start_commands_source_the_profile_first() -> None:
    cfg = _cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        calls = [c for c in cfg[key] if _CALLS.search(c)]
        assert any("ray start" in c for c in calls), key
        for cmd in calls:
            assert PROFILE in cmd and cmd.index(PROFILE) < _CALLS.search(cmd).start(), f"{key}: {cmd!r}"
    head = cfg["head_start_ray_commands"]
    start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head[start]  # reached through `ray dashboard cluster.yaml`
    mlflow = next(i for i, c in enumerate(head) if "mlflow server" in c)
    monitor = next(i for i, c in enumerate(head) if "monitoring.actor" in c or "segloop monitor" in c)
    assert start < mlflow < monitor


def _run_head_mlflow(node: SimpleNamespace, **cluster_env: str) -> subprocess.CompletedProcess:
    _initialize(node, None)
    _write_cluster_env(node, **cluster_env)
    record = node.home / "mlflow.args"
    _executable(
        node.bin / "mlflow",
        f'{{ printf "%s\\n" "$@"; echo --env--; env | grep -E "^(AWS_|MLFLOW_S3_)" | sort; }} > {record}.tmp\n'
        f"mv {record}.tmp {record}\n",  # appears complete
    )
    _executable(node.bin / "curl", "exit 0\n")  # the health check
    cmd = next(c for c in _cluster()["head_start_ray_commands"] if "mlflow server" in c)
    return _bash(cmd, node.env)


@pytest.mark.parametrize("secure,scheme", [("", "http"), ("1", "https")])
def test_cluster_yaml_starts_mlflow_on_the_head(node: SimpleNamespace, secure: str, scheme: str) -> None:
    r = _run_head_mlflow(node, **({"SEGLOOP_S3_SECURE": secure} if secure else {}))
    assert r.returncode == 0, r.stderr
    record = node.home / "mlflow.args"
    for _ in range(100):  # the server is started in the background
        if record.exists():
            break
        time.sleep(0.05)
    args, _, env_part = record.read_text().partition("--env--\n")
    argv = args.split("\n")
    assert argv[0] == "server"
    assert argv[argv.index("--host") + 1] == "10.9.8.7"  # the private IP, not 0.0.0.0
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://segloop/mlartifacts"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{node.home}/.segloop/mlflow.db"
    assert "--no-serve-artifacts" not in argv
    env = dict(line.split("=", 1) for line in env_part.splitlines())
    assert env == {
        "AWS_ACCESS_KEY_ID": "test-access",
        "AWS_SECRET_ACCESS_KEY": "test-secret-value",
        "MLFLOW_S3_ENDPOINT_URL": f"{scheme}://minio.test:9000",
    }


def test_cluster_yaml_starts_no_mlflow_when_one_is_configured(node: SimpleNamespace) -> None:
    r = _run_head_mlflow(node, MLFLOW_TRACKING_URI="http://mlflow.example.internal:5000")
    assert r.returncode == 0, r.stderr
    time.sleep(0.2)
    assert not (node.home / "mlflow.args").exists()


# --- kuberay.yaml: a RayService whose serveConfigV2 is serve_config.yaml's application ---------------


def _serve_schema(cfg: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(cfg)


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
    # cluster-only differences: no local data_dir (MLflow/S3 come from the Secret), GPU model replicas,
    # and the bearer token: the RayService's proxy listens beyond loopback, where segloop refuses to serve
    # without one (the token itself comes from the Secret, which every Ray container gets with envFrom)
    assert "data_dir" not in kube["args"]
    assert kube["args"]["auth_token_env"] == "SEGLOOP_TOKEN"
    assert "SEGLOOP_TOKEN" in _secret_command()[1]
    cluster_only = ("data_dir", "auth_token_env")
    assert {k: v for k, v in kube["args"].items() if k not in cluster_only} == {
        k: v for k, v in local["args"].items() if k not in cluster_only
    }


def _ray_containers(svc: dict) -> list[tuple[str, dict]]:
    """(group, container) for the Ray container of the head and of every worker group (KubeRay: index 0)."""
    cluster = svc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    return [("head", head)] + [
        (g["groupName"], g["template"]["spec"]["containers"][0]) for g in cluster["workerGroupSpecs"]
    ]


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
    # a head without CPUs runs no training: some CPU worker group must always be there for retraining
    if cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0":
        assert any(
            g["minReplicas"] >= 1
            and "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
            for g in cluster["workerGroupSpecs"]
        )


# --- kuberay.yaml: one Secret, the profile and token auth on every Ray node ---------------------------------


def _secret_command(text: str | None = None) -> tuple[str, dict[str, str]]:
    """The header's `kubectl create secret generic NAME --from-literal=K=V ...`: (NAME, {K: V})."""
    text = KUBERAY_YAML.read_text() if text is None else text
    header = [line.lstrip("#").strip() for line in text.split("\n---", 1)[0].splitlines() if line.startswith("#")]
    joined = "\n".join(header).replace("\\\n", " ")
    (cmd,) = [line for line in joined.splitlines() if line.startswith("kubectl create secret generic ")]
    args = shlex.split(cmd)
    literals = [a.removeprefix("--from-literal=") for a in args if a.startswith("--from-literal=")]
    return args[4], dict(item.split("=", 1) for item in literals)


def _resolve_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom first, env entries override."""
    out: dict[str, str] = {}
    for src in container.get("envFrom", []):
        out.update(secrets[src["secretRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]], f"{e['name']}: key {ref['key']!r} is not in the Secret"
            out[e["name"]] = secrets[ref["name"]][ref["key"]]
    return out


def test_the_header_creates_the_one_secret_everything_reads() -> None:
    name, literals = _secret_command()
    assert {*PROFILE_KEYS, *CREDENTIAL_KEYS, "auth_token"} <= set(literals)
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("secretKeyRef", "secretRef"):
                if key in node:
                    refs.add(node[key]["name"])
                    if key == "secretKeyRef":
                        assert node[key]["key"] in literals, node
            node = list(node.values())
        if isinstance(node, list):
            for v in node:
                walk(v)

    walk(_kube_docs())
    assert refs == {name}  # one Secret, the one the header creates
    assert _rayservice()["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == name


def test_every_ray_node_has_token_auth_and_the_cluster_profile() -> None:
    from dataplane.store import store_config_from_url
    from segloop.settings import shared_service_problems

    name, literals = _secret_command()
    svc = _rayservice()
    auth = svc["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": name}  # KubeRay itself authenticates to the dashboard
    containers = _ray_containers(svc)
    assert len(containers) == 1 + len(svc["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    for group, c in containers:
        entries = {e["name"]: e for e in c.get("env", [])}
        assert entries["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, group
        # the key KubeRay's authOptions reads (`auth_token`), from the same Secret
        assert entries["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": name, "key": "auth_token"}}, group
        env = _resolve_env(c, {name: literals})
        for key in (*PROFILE_KEYS, *CREDENTIAL_KEYS):
            assert env.get(key), f"{group}: {key} missing"
        assert {k: env.get(k) for k in SERVE_FAST_PATH_ENV} == SERVE_FAST_PATH_ENV, group
        store = store_config_from_url(env["SEGLOOP_STORE"], env)
        assert shared_service_problems(store, env["MLFLOW_TRACKING_URI"]) == [], group


def test_profile_check_is_real() -> None:
    name, literals = _secret_command()
    svc = copy.deepcopy(_rayservice())
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["envFrom"] = []
    env = _resolve_env(worker, {name: literals})
    assert "SEGLOOP_STORE" not in env and "MLFLOW_TRACKING_URI" not in env
    from segloop.settings import shared_service_problems

    assert shared_service_problems(None, "sqlite:///tmp/mlflow.db")  # the code refuses what a node without it has


# --- kuberay.yaml: MinIO and MLflow ------------------------------------------------------------------------


def _container(deploy: dict, name: str) -> dict:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _service_url(docs: list[dict], name: str) -> tuple[str, int, dict]:
    """(service name, port, the Deployment it selects) after checking selector and ports line up."""
    svc = _doc("Service", name, docs)
    (port,) = svc["spec"]["ports"]
    deploys = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(deploys) == 1, f"Service {name} selects {len(deploys)} Deployments"
    (deploy,) = deploys
    assert deploy["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {p["containerPort"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert port.get("targetPort", port["port"]) in container_ports
    return svc["metadata"]["name"], port["port"], deploy


def test_minio_and_mlflow_services_exist_and_match_the_profile() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    docs = _kube_docs()
    _, literals = _secret_command()
    minio_host, minio_port, minio = _service_url(docs, "minio")
    mlflow_host, mlflow_port, mlflow = _service_url(docs, "mlflow")
    assert literals["SEGLOOP_S3_ENDPOINT"] == f"{minio_host}:{minio_port}"
    assert literals["MLFLOW_TRACKING_URI"] == f"http://{mlflow_host}:{mlflow_port}"
    bucket = literals["SEGLOOP_STORE"].removeprefix("s3://")

    # MinIO's root credentials are segloop's S3 credentials
    m = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in _container(minio, "minio")["env"]}
    assert m == {"MINIO_ROOT_USER": "SEGLOOP_S3_ACCESS_KEY", "MINIO_ROOT_PASSWORD": "SEGLOOP_S3_SECRET_KEY"}

    server = _container(mlflow, "mlflow")
    argv = server["command"]
    assert argv[:2] == ["mlflow", "server"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in argv[2:] if "=" in a)
    assert flags["host"] == "0.0.0.0" and int(flags["port"]) == mlflow_port
    assert flags["artifacts-destination"] == f"s3://{bucket}/mlartifacts"  # proxied: clients need no S3 keys
    assert "--no-serve-artifacts" not in argv
    # the backend store lives on the PVC
    db = flags["backend-store-uri"].removeprefix("sqlite:///")
    mounts = {v["mountPath"] for v in server["volumeMounts"]}
    assert any(db.startswith(m.rstrip("/") + "/") for m in mounts), db
    # MLflow 3 checks the Host header: what the Ray pods and a port-forward send must pass, others must not
    allowed = flags["allowed-hosts"].split(",")
    for host in (
        f"{mlflow_host}:{mlflow_port}",
        f"{mlflow_host}.segloop.svc.cluster.local:{mlflow_port}",
        "localhost:5000",
    ):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["key"] for e in server["env"]}
    assert env == {
        "MLFLOW_S3_ENDPOINT_URL": f"http://{literals['SEGLOOP_S3_ENDPOINT']}",
        "AWS_ACCESS_KEY_ID": "SEGLOOP_S3_ACCESS_KEY",
        "AWS_SECRET_ACCESS_KEY": "SEGLOOP_S3_SECRET_KEY",
    }
    # the bucket exists before MLflow writes to it
    init = " ".join(
        " ".join(c.get("command", []) + c.get("args", [])) for c in mlflow["spec"]["template"]["spec"]["initContainers"]
    )
    assert f"mc mb --ignore-existing segloop/{bucket}" in init and f"http://{literals['SEGLOOP_S3_ENDPOINT']}" in init

    import mlflow as mlflow_client

    tag = server["image"].rsplit(":", 1)[1]
    assert tag.lstrip("v").split(".")[0] == mlflow_client.__version__.split(".")[0]  # same major as the client

    # every PVC a Deployment mounts exists; a ReadWriteOnce volume's single writer is replaced, not rolled
    for deploy in (minio, mlflow):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in deploy["spec"]["template"]["spec"]["volumes"]]
        for claim in claims:
            assert _doc("PersistentVolumeClaim", claim, docs)["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert deploy["spec"]["strategy"]["type"] == "Recreate" and deploy["spec"]["replicas"] == 1


# --- no literal secrets in either file ---------------------------------------------------------------------

_SECRET_WORD = r"(?:SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL)"
_ASSIGNMENT = re.compile(r"(?<![\w-])([A-Za-z_]\w*)=(\S*)")
_SECRET_YAML_KEY = re.compile(r"(password|passwd|secret|secret_?key|access_?key|token|credentials?)$", re.I)
_IDENTIFIER = re.compile(r"^[A-Za-z_][\w-]*$")  # a YAML key that is a name (not a path, as in file_mounts)
_USERINFO = re.compile(r"://([^/\s:@]+):([^/\s@]+)@")


def _is_reference(value: str) -> bool:
    """A value that names where the secret comes from instead of holding it."""
    v = value.strip("\"'")
    return v == "" or v.startswith(("$", "<", "..."))


def _literal_secrets(text: str, docs: list[dict]) -> list[str]:
    found = []
    for name, value in _ASSIGNMENT.findall(text):  # shell lines, comments, commands
        if re.search(_SECRET_WORD, name, re.I) and not _is_reference(value) and name.upper() != "RAY_AUTH_MODE":
            found.append(f"{name}={value}")
    for user, password in _USERINFO.findall(text):
        if not (_is_reference(user) and _is_reference(password)):
            found.append(f"credentials in a URL ({user}:...)")

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
                found.append(f"{path}: a Secret with data")
            if isinstance(node.get("name"), str) and "value" in node and re.search(_SECRET_WORD, node["name"], re.I):
                if node["name"] != "RAY_AUTH_MODE":
                    found.append(f"{path}: env {node['name']} has a literal value")
            for k, v in node.items():
                if _IDENTIFIER.match(str(k)) and _SECRET_YAML_KEY.search(k) and isinstance(v, (str, int)) and str(v):
                    found.append(f"{path}.{k}: literal")
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(docs, "")
    return found


def test_no_literal_secrets_in_the_launch_files() -> None:
    assert _literal_secrets(CLUSTER_YAML.read_text(), [_cluster()]) == []
    assert _literal_secrets(KUBERAY_YAML.read_text(), _kube_docs()) == []


@pytest.mark.parametrize(
    "line",
    [
        "# SEGLOOP_S3_SECRET_KEY=hunter2hunter2",
        "# MLFLOW_TRACKING_URI=http://admin:hunter2@mlflow:5000",
        "# --from-literal=auth_token=abc123",
    ],
)
def test_literal_secret_check_is_real(line: str) -> None:
    assert _literal_secrets(KUBERAY_YAML.read_text() + line + "\n", _kube_docs())
    docs = _kube_docs()
    head = _ray_containers(_doc("RayService", docs=docs))[0][1]
    head["env"] = [*head["env"], {"name": "SEGLOOP_S3_SECRET_KEY", "value": "hunter2hunter2"}]
    assert _literal_secrets(KUBERAY_YAML.read_text(), docs)
    assert _literal_secrets("", [{"provider": {"password": "hunter2"}}])
    assert _literal_secrets("", [{"kind": "Secret", "stringData": {"auth_token": "x"}}])


# --- the monitoring actor: started by both files, with a command the real CLI accepts ----------------------


def _monitor_commands() -> list[tuple[str, str]]:
    """(where, shell command) of each monitor start in the launch files."""
    out = [("cluster.yaml", c) for c in _cluster()["head_start_ray_commands"] if "monitor" in c]
    head = _ray_containers(_rayservice())[0][1]
    out.append(("kuberay.yaml", head["lifecycle"]["postStart"]["exec"]["command"][-1]))
    return out


def _cli_argv(cmd: str) -> tuple[str, list[str], str | None]:
    """(entry point, its argv, the directory the command cd's into first) of the monitor call in `cmd`."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)
    cwd = tokens[tokens.index("cd") + 1] if "cd" in tokens else None
    for i, tok in enumerate(tokens):
        if tok == "monitoring.actor" and tokens[i - 1] == "-m" and tokens[i - 2] in ("python", "python3"):
            entry, rest = "monitoring.actor", tokens[i + 1 :]
            break
        if tok == "segloop" and tokens[i + 1 : i + 2] == ["monitor"]:
            entry, rest = "segloop", tokens[i + 2 :]
            break
    else:
        raise AssertionError(f"no monitor start in {cmd!r}")
    argv = []
    for tok in rest:
        if set(tok) <= set("();<>|&"):
            break
        argv.append(tok)
    return entry, argv, cwd


def _run_monitor_cli(entry: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict]:
    """Run the real CLI's main with Ray and the actor stubbed out: parse, load the config, call start."""
    import ray

    import monitoring.actor as actor

    started: dict = {}
    monkeypatch.setattr(ray, "init", lambda **kw: SimpleNamespace(dashboard_url=None))
    monkeypatch.setattr(actor, "start", lambda config, restart=False: started.update(config=config, restart=restart))
    monkeypatch.chdir(ROOT)
    if entry == "segloop":
        from segloop.cli import main

        return main(["monitor", *argv]), started
    return actor.main(argv), started


@pytest.mark.parametrize("where", ["cluster.yaml", "kuberay.yaml"])
def test_monitor_start_command_uses_the_real_cli(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitoring.actor import MonitorConfig
    from segloop.config import load_config

    (cmd,) = [c for w, c in _monitor_commands() if w == where]
    entry, argv, cwd = _cli_argv(cmd)
    assert argv[0] == "start"
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file()
    # run from the repository root on the node (cluster.yaml: its file mount; kuberay.yaml: the image's copy)
    if where == "cluster.yaml":
        home = f"/home/{_cluster()['auth']['ssh_user']}"
        assert cwd.replace("~", home, 1) in _cluster()["file_mounts"]
    else:
        assert f"COPY --chown=ray:users . {cwd}" in KUBERAY_YAML.read_text()
    rc, started = _run_monitor_cli(entry, argv, monkeypatch)
    assert rc == 0
    assert started["config"] == load_config(MonitorConfig, config).model_dump(mode="json")


def test_monitor_cli_check_is_real(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as bad_flag:
        _run_monitor_cli("monitoring.actor", ["start", "--confg", "configs/monitor.yaml"], monkeypatch)
    assert bad_flag.value.code == 2
    with pytest.raises(SystemExit):
        _run_monitor_cli("segloop", ["begin"], monkeypatch)
    rc, started = _run_monitor_cli(
        "monitoring.actor", ["start", "nope=1", "--config", "configs/monitor.yaml"], monkeypatch
    )
    assert rc != 0 and not started  # an unknown config key: refused before the actor starts


def test_readme_exports_the_serve_fast_path_as_segloop_sets_it() -> None:
    """The README's `export` before `ray start` is the same set cluster.yaml, kuberay.yaml and the demo use."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("export RAY_SERVE_ENABLE_HA_PROXY")]
    exported = dict(item.split("=", 1) for item in shlex.split(line.split("#")[0])[1:])
    assert exported == SERVE_FAST_PATH_ENV
