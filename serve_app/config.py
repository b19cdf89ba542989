"""Typed configuration of the serving application.

``AppArgs`` is what ``serve_config.yaml`` passes as ``args`` to ``build_app``; Serve
validates the dict against it before calling the builder. It splits into two parts that
travel differently:

* ``ModelSettings`` is the model deployment's ``user_config``: Serve hands it to
  ``reconfigure`` on start and again, *in place*, whenever it changes. Everything that
  may change while serving (which model, batching, thresholds) lives here.
* The rest (limits, auth, replica sizing) is fixed for the life of the deployment.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from train.model_ref import parse_model_uri


class ModelSettings(BaseModel):
    """The model deployment's ``user_config`` (changes are applied in place by ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(
        "models:/segloop-pets@champion", description="models:/NAME@ALIAS, models:/NAME/VERSION or checkpoint:/path.pt"
    )
    mlflow_tracking_uri: Optional[str] = Field(
        None, description="MLflow store; replicas are separate processes, so it is passed explicitly"
    )
    poll_interval_s: float = Field(
        5.0, ge=0, description="re-resolve an alias this often and hot-swap on change (0 = off)"
    )
    # only for checkpoint:/ files that lack a training config
    model_name: Optional[str] = None
    task: Optional[Literal["semantic", "instance"]] = None
    class_names: Optional[list[str]] = None
    image_size: Optional[int] = Field(None, ge=32, le=4096)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    # batching (max_ongoing_requests of the deployment caps the real batch size)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)
    # inference
    device: Literal["auto", "cpu", "cuda"] = "auto"
    half: bool = Field(True, description="float16 autocast on GPU (ignored on CPU)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads in the replica (0 = leave as is)")
    channels_last: bool = Field(
        True,
        description="semantic: run the model in NHWC memory format (faster convolutions with oneDNN on CPU and tensor cores on GPU)",
    )
    score_threshold: float = Field(0.05, ge=0, le=1, description="instance: detections below this are not returned")

    @field_validator("model_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parse_model_uri(v)
        return v

    @property
    def alias(self) -> str | None:
        """The alias the model_uri follows, None for a pinned version or a checkpoint."""
        kind, _, ref = parse_model_uri(self.model_uri)
        return ref if kind == "registry" and ref is not None and not ref.isdigit() else None

    def model_source(self) -> tuple[str, ...]:
        """What identifies the weights to load (a change means: load a new model)."""
        return (
            self.model_uri,
            self.mlflow_tracking_uri or "",
            self.model_name or "",
            self.task or "",
            tuple(self.class_names or ()),
            self.image_size or 0,
            repr(sorted(self.model_kwargs.items())),
            self.device,
            self.half,
            self.channels_last,
        )


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="allow")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self


class CaptureArgs(BaseModel):
    """Active-learning capture in the model replicas (serve_app.capture.Capturer)."""

    model_config = ConfigDict(extra="forbid")

    store: Optional[dict] = Field(
        None, description="dataplane.store.StoreConfig; None: SEGLOOP_STORE or ./.segloop/store"
    )
    policy: dict = Field(default_factory=lambda: {"mode": "off"}, description="initial policy; the store's copy wins")
    queue_size: int = Field(256, ge=1)
    max_retries: int = Field(5, ge=0)
    policy_poll_s: float = Field(5.0, gt=0, description="how often replicas re-read control/capture_policy.json")
    budget: Optional[dict] = Field(
        None, description="dataplane.capture.CaptureBudget: objects_per_day / bytes_per_day across all replicas"
    )

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: Optional[dict]) -> Optional[dict]:
        from dataplane.capture import CaptureBudget

        return None if v is None else CaptureBudget.model_validate(v).model_dump()


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args`` of ``serve_config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    data_dir: Optional[str] = Field(
        None, description="segloop data dir: the default MLflow store is <data_dir>/mlflow.db"
    )
    capture: Optional[CaptureArgs] = Field(default_factory=CaptureArgs, description="None disables capture")
    # request limits
    max_body_bytes: int = Field(10 * 2**20, ge=1024)
    max_pixels: int = Field(4096 * 4096, ge=64)
    auth_token_env: Optional[str] = Field(None, description="name of an env var holding the bearer token for /predict")
    auth_token: Optional[str] = Field(None, description="bearer token for /predict (prefer auth_token_env)")
    request_timeout_s: float = Field(60, gt=0, description="ingress gives up on the model after this long (504)")
    body_timeout_s: float = Field(30, gt=0, description="the whole request body must arrive within this (else 408)")
    drain_body_bytes: int = Field(
        128 * 2**20,
        ge=0,
        description="a too-large body is read and dropped up to this size before the 413, so clients that "
        "send the whole body before reading the answer get the JSON 413 instead of a connection reset",
    )
    topology: Literal["split", "fused"] = Field(
        "split",
        description="split: an HTTP deployment (SegIngress) calls the model deployment (SegModel); "
        "fused: one deployment (SegModel) does both, with no actor call per request",
    )
    # model deployment sizing
    model_autoscaling: Optional[Autoscaling] = Field(default_factory=Autoscaling)
    model_num_replicas: Optional[int] = Field(None, ge=1, description="fixed replica count instead of autoscaling")
    model_max_ongoing_requests: int = Field(16, ge=1)
    model_max_queued_requests: int = Field(64, ge=-1)
    model_num_cpus: float = Field(0.75, ge=0, description="0.5 + 2 x 0.75: two model replicas fit a 2-CPU node")
    model_num_gpus: float = Field(0, ge=0)
    # ingress sizing
    ingress_num_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(256, ge=1)
    ingress_max_queued_requests: int = Field(-1, ge=-1)
    ingress_num_cpus: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.model_max_ongoing_requests < self.model.max_batch_size:
            raise ValueError(
                f"model_max_ongoing_requests ({self.model_max_ongoing_requests}) caps the batch size; "
                f"it must be >= model.max_batch_size ({self.model.max_batch_size})"
            )
        if self.model_num_replicas is not None:
            self.model_autoscaling = None
        return self

    def resolved_model_settings(self) -> ModelSettings:
        """The user_config the replicas get: the tracking URI made explicit (replicas are other processes)."""
        uri = self.model.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri and self.data_dir:
            from segloop.settings import tracking_uri

            uri = tracking_uri(self.data_dir)
        return self.model.model_copy(update={"mlflow_tracking_uri": uri})

    def token(self) -> str | None:
        if self.auth_token_env:
            value = os.environ.get(self.auth_token_env)
            if not value:
                raise ValueError(f"auth_token_env {self.auth_token_env!r} is set but the environment variable is empty")
            return value
        return self.auth_token or None
