"""The MLflow model registry: logging, loading, champion/challenger promotion, rollback.

A segloop model version is an MLflow pyfunc whose artifacts are a ``state_dict.pt`` and a
``segloop_model.json`` (architecture name, task, classes, input size). Loading rebuilds
the architecture from the registry (``train.models``) and reads the weights with
``torch.load(weights_only=True)``: no pickled code is executed, whoever wrote the file.

Promotion uses aliases (stages are deprecated): the version holding ``champion`` serves.
A challenger takes the alias only if it beats the champion by ``margin`` on the same
held-out data; the decision, both scores and the reason are tags on the challenger.
``python -m train rollback --model NAME`` moves ``champion`` back to the version it
replaced.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segloop.errors import ModelError, ServiceError
from train.model_ref import META_FILE, WEIGHTS_FILE, ModelMeta
from train.predict import build_from_state

CHAMPION = "champion"


@dataclass
class Decision:
    """Outcome of one champion/challenger comparison (also written as version tags)."""

    promoted: bool
    challenger_version: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    margin: float
    metric: str
    reason: str


def log_model(
    state_dict: dict[str, torch.Tensor],
    meta: ModelMeta,
    registered_model: str,
    example: np.ndarray,
) -> str:
    """Log the model to the active run (MLflow 3 ``name=``) and register it; returns the version."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    with tempfile.TemporaryDirectory() as d:
        wpath, mpath = Path(d) / WEIGHTS_FILE, Path(d) / META_FILE
        torch.save(state_dict, wpath)
        meta.write(mpath)
        inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
        outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]) if meta.task == "semantic" else None
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: nothing pickled
            artifacts={"weights": str(wpath), "meta": str(mpath)},
            signature=ModelSignature(inputs=inputs, outputs=outputs),
            input_example=example,
            registered_model_name=registered_model,
            pip_requirements=["segloop", "torch", "torchvision", "mlflow"],
        )
    version = str(info.registered_model_version)
    _wait_ready(registered_model, version)
    return version


def _wait_ready(name: str, version: str, timeout_s: float = 60) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.2)
    raise ModelError(f"model {name} version {version} did not become READY in {timeout_s}s")


def champion_version(name: str) -> str | None:
    """The version holding ``champion``; None only when MLflow says there is none.

    Any other failure (a locked SQLite file, an unreachable server) is a ServiceError, never
    "no champion": reading it as none would promote a challenger nobody compared.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as err:
        if _no_such_alias(err):
            return None
        raise ServiceError(f"cannot read the champion of {name!r} from MLflow: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - a database or network error below MLflow
        raise ServiceError(f"cannot read the champion of {name!r} from MLflow: {type(err).__name__}: {err}") from None


def _no_such_alias(err: Any) -> bool:
    """MLflow's two answers for "no champion": no such model (404) or no such alias (400)."""
    if err.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return err.error_code == "INVALID_PARAMETER_VALUE" and "alias" in err.message and "not found" in err.message


class _Leases:
    """Named leases with an expiry, held in one Ray actor: calls run one at a time, so an
    acquire is a compare-and-set; a holder that dies loses its lease when it expires."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, owner: str, ttl_s: float) -> str | None:
        """Take ``key`` for ``owner``; returns None on success, else the current holder."""
        now = time.time()
        holder = self._held.get(key)
        if holder is None or holder[1] < now or holder[0] == owner:
            self._held[key] = (owner, now + ttl_s)
            return None
        return holder[0]

    def release(self, key: str, owner: str) -> None:
        if self._held.get(key, ("", 0.0))[0] == owner:
            del self._held[key]


LEASES_ACTOR = "segloop-leases"


@contextmanager
def promotion_lock(name: str, *, wait_s: float = 900.0, ttl_s: float = 1800.0) -> Iterator[None]:
    """Serialise champion comparisons of model ``name`` across jobs (through the Ray GCS).

    Two jobs finishing together would each compare with the same champion and the last
    alias move would win, even if worse; under the lock the second compares with the first's
    result. Raises ServiceError when the lock stays held for ``wait_s``.
    """
    import ray

    leases = (
        ray.remote(num_cpus=0, max_restarts=-1)(_Leases)
        .options(name=LEASES_ACTOR, namespace="segloop", lifetime="detached", get_if_exists=True)
        .remote()
    )
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while (holder := ray.get(leases.acquire.remote(name, owner, ttl_s))) is not None:
        if time.monotonic() > deadline:
            raise ServiceError(f"the promotion lock of {name!r} has been held by {holder} for over {wait_s:.0f}s")
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            ray.get(leases.release.remote(name, owner))
        except Exception:  # noqa: BLE001 - the lease expires on its own
            pass


def resolve_version(name: str, ref: str | int | None = None) -> str:
    """``ref`` may be a version number, an alias (``champion``) or None (= champion)."""
    ref = CHAMPION if ref in (None, "") else str(ref)
    if ref.isdigit():
        return ref
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, ref).version)
    except MlflowException as err:
        raise ModelError(f"registered model {name!r} has no version with alias {ref!r}: {err.message}") from None


def load_version(name: str, ref: str | int | None = None) -> tuple[torch.nn.Module, ModelMeta, str]:
    """Rebuild ``name`` at version/alias ``ref`` from the registry (weights_only load)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    version = resolve_version(name, ref)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    except MlflowException as err:
        raise ModelError(f"cannot download model {name} version {version}: {err.message}") from None
    weights = next(local.rglob(WEIGHTS_FILE), None)
    meta_file = next(local.rglob(META_FILE), None)
    if weights is None or meta_file is None:
        raise ModelError(f"model {name} version {version} is not a segloop model (no {WEIGHTS_FILE}/{META_FILE})")
    meta = ModelMeta.read(meta_file)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return build_from_state(meta, state), meta, version


def decide(challenger_score: float, champion_score: float | None, margin: float) -> tuple[bool, str]:
    """Pure promotion rule: promote when there is no champion or challenger >= champion + margin."""
    if champion_score is None:
        return True, "no champion yet: the first model becomes champion"
    if not math.isfinite(challenger_score):
        return False, f"challenger score is {challenger_score}"
    if challenger_score >= champion_score + margin and (margin > 0 or challenger_score > champion_score):
        return True, f"challenger {challenger_score:.4f} beats champion {champion_score:.4f} by >= {margin}"
    return False, f"challenger {challenger_score:.4f} does not beat champion {champion_score:.4f} by {margin} (margin)"


def record_decision(name: str, d: Decision, move_alias: bool = True) -> None:
    """Write the decision as tags on the challenger and move ``champion`` if promoted."""
    import mlflow

    client = mlflow.MlflowClient()
    tags = {
        "segloop.decision": "promoted" if d.promoted else "rejected",
        "segloop.reason": d.reason,
        "segloop.metric": d.metric,
        "segloop.challenger_score": f"{d.challenger_score:.6f}",
        "segloop.champion_score": "" if d.champion_score is None else f"{d.champion_score:.6f}",
        "segloop.champion_version": d.champion_version or "",
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, d.challenger_version, k, v)
    if d.promoted and move_alias:
        if d.champion_version:
            client.set_model_version_tag(name, d.challenger_version, "segloop.previous_champion", d.champion_version)
        client.set_registered_model_alias(name, CHAMPION, d.challenger_version)


def rollback(name: str) -> tuple[str, str]:
    """Move ``champion`` back to the version the current champion replaced. Returns (from, to)."""
    import mlflow

    client = mlflow.MlflowClient()
    current = champion_version(name)
    if current is None:
        raise ModelError(f"registered model {name!r} has no champion to roll back")
    previous = client.get_model_version(name, current).tags.get("segloop.previous_champion")
    if not previous:
        raise ModelError(f"{name} version {current} replaced no earlier champion; nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current, "segloop.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%S"))
    return current, previous
