"""The one predictor: load a segloop model, preprocess, forward, postprocess to masks.

The Serve replica (``serve_app.model``), the MLflow pyfunc (``train.registry``) and the
benchmarks (``bench/serve.py``) all predict through :class:`Predictor`, so a model scores,
serves and is benchmarked by the same code (channels-last, autocast, the argmax rule).

A model is named by a URI: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the MLflow
registry) or ``checkpoint:/path/to/file.pt`` (a Ray Train checkpoint file). Weights are read
with ``torch.load(weights_only=True)``: no pickled code runs, whoever wrote the file.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from dataplane.versions import sha256_file
from segloop.errors import ConfigError, ModelError
from train.metrics.semantic import class_indices
from train.model_ref import ModelMeta, parse_model_uri
from train.models import build_model, model_task
from train.transforms import eval_transforms
from train.uncertainty import instance_mask_entropies, instance_uncertainty, pooled_embedding, semantic_uncertainty


@dataclass(frozen=True)
class CheckpointHints:
    """What a ``checkpoint:/`` file may lack (files written by ``segloop train`` record it all)."""

    model_name: Optional[str] = None
    task: Optional[str] = None
    class_names: Optional[list[str]] = None
    image_size: Optional[int] = None
    model_kwargs: Optional[dict[str, Any]] = None


@dataclass
class SemanticOutput:
    """One image: class-index mask at the input size and softmax probabilities on the model grid."""

    mask: np.ndarray  # [H, W] uint8
    probs: np.ndarray  # [C, h, w] float32
    embedding: Optional[np.ndarray] = None  # [D] float16, L2-normalised pooled backbone features


@dataclass
class InstanceOutput:
    """One image: detections at or above the score threshold, boxes in input coordinates.

    ``masks`` are probabilities x 255 as uint8 on the model's working grid (at most
    ``min_size``/``max_size`` of its transform), not float32 at the input size: 100 masks of a
    4096 x 4096 image would be 6.7 GB. :func:`serve_app.postprocess` scales one at a time.
    """

    boxes: np.ndarray  # [N, 4] xyxy float32, input coordinates
    labels: np.ndarray  # [N] int64
    scores: np.ndarray  # [N] float32
    masks: np.ndarray  # [N, h, w] uint8, probability x 255 on the mask grid
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the input
    embedding: Optional[np.ndarray] = None  # [D] float16, L2-normalised pooled backbone features


Output = Union[SemanticOutput, InstanceOutput]


def output_uncertainty(out: Output, score_threshold: float = 0.05) -> dict[str, float]:
    """The uncertainty statistics of one output (:mod:`train.uncertainty`): what a replica records
    with a capture and what ``queue export --rescore`` recomputes, so both rank alike."""
    if isinstance(out, InstanceOutput):
        keep, mask_entropy = instance_mask_entropies(out.scores, out.masks, out.boxes, score_threshold, out.image_size)
        return instance_uncertainty(out.scores[keep], mask_entropy, out.labels[keep])
    return semantic_uncertainty(out.probs)


def build_from_state(meta: ModelMeta, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(meta.model, meta.num_classes, **meta.model_kwargs)
    model.load_state_dict(state_dict)
    return model.eval()


def pick_device(pref: str) -> str:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' requested but no GPU is visible to this process (set ray_actor_options.num_gpus)"
        )
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return pref


def _set_tracking_uri(uri: Optional[str]) -> None:
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)


def resolve_registry_version(name: str, ref: Optional[str], tracking_uri: Optional[str] = None) -> str:
    """The version ``models:/name@ref`` points at now (an alias resolved)."""
    from train.registry import resolve_version

    _set_tracking_uri(tracking_uri)
    return resolve_version(name, ref)


def _checkpoint_meta(path: str, hints: CheckpointHints) -> ModelMeta:
    """The model a checkpoint file records (config, classes), completed by ``hints``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj = obj if isinstance(obj, dict) else {}
    cfg = obj.get("config") or {}
    model_name = hints.model_name or cfg.get("model")
    class_names = hints.class_names or obj.get("class_names")
    image_size = hints.image_size or cfg.get("image_size")
    given = (("model_name", model_name), ("class_names", class_names), ("image_size", image_size))
    missing = [k for k, v in given if not v]
    if missing:
        raise ModelError(f"checkpoint {path} records no {missing}; set them in the model settings")
    return ModelMeta(
        model=model_name,
        task=hints.task or cfg.get("task") or model_task(model_name),
        num_classes=int(obj.get("num_classes") or len(class_names)),
        class_names=list(class_names),
        image_size=int(image_size),
        model_kwargs=dict(hints.model_kwargs or cfg.get("model_kwargs") or {}),
    )


def backbone_of(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The feature extractor of a torchvision segmentation model or detector (None if it has none)."""
    inner = getattr(model, "model", model)  # SemanticModel wraps the torchvision model
    backbone = getattr(inner, "backbone", None)
    return backbone if isinstance(backbone, torch.nn.Module) else None


@contextlib.contextmanager
def capture_embeddings(model: torch.nn.Module, into: list[np.ndarray]) -> Any:
    """While inside, every backbone forward appends its [B, D] pooled embedding to ``into``.

    The embedding comes from the forward pass that predicts (a hook, no second pass).
    """
    backbone = backbone_of(model)
    if backbone is None:
        yield
        return
    handle = backbone.register_forward_hook(lambda _m, _i, out: into.append(pooled_embedding(out)))
    try:
        yield
    finally:
        handle.remove()


def _chw(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW tensor (arrays that came through Ray's object store are read-only)."""
    return torch.from_numpy(img if img.flags.writeable else img.copy()).permute(2, 0, 1)


@dataclass
class Predictor:
    """A ready model plus what it takes to feed it; build with :meth:`load` or :meth:`from_state`."""

    model: torch.nn.Module  # eval mode, on ``device``
    meta: ModelMeta
    name: str
    version: str
    uri: str
    device: str = "cpu"
    half: bool = False
    channels_last: bool = False
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.transforms = eval_transforms(self.meta.task, self.meta.image_size)

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def from_state(
        cls,
        meta: ModelMeta,
        state: dict[str, torch.Tensor],
        *,
        name: str = "",
        version: str = "",
        uri: str = "",
        device: str = "cpu",
        half: bool = False,
        channels_last: bool = True,
    ) -> Predictor:
        """A predictor for weights already in memory (the pyfunc's artifacts, a fresh checkpoint)."""
        return cls._ready(build_from_state(meta, state), meta, name, version, uri, device, half, channels_last)

    @classmethod
    def load(
        cls,
        uri: str,
        *,
        tracking_uri: Optional[str] = None,
        device: str = "auto",
        half: bool = True,
        channels_last: bool = True,
        hints: CheckpointHints = CheckpointHints(),
    ) -> Predictor:
        """Build the model ``uri`` names (see the module docstring)."""
        kind, target, ref = parse_model_uri(uri)
        if kind == "registry":
            from train.registry import load_version

            _set_tracking_uri(tracking_uri)
            model, meta, version = load_version(target, ref)
            name = target
        else:
            if not os.path.isfile(target):
                raise ModelError(f"checkpoint {target} does not exist")
            meta = _checkpoint_meta(target, hints)
            model = build_model(meta.model, meta.num_classes, checkpoint=target, **meta.model_kwargs).eval()
            name, version = os.path.basename(target), "ckpt-" + sha256_file(target)[:12]
        return cls._ready(model, meta, name, str(version), uri, device, half, channels_last)

    @classmethod
    def _ready(cls, model, meta, name, version, uri, device, half, channels_last) -> Predictor:
        device = pick_device(device)
        model = model.to(device).eval()
        channels_last = bool(channels_last and meta.task == "semantic")
        if channels_last:  # same weights and results; ~1.5x faster on 2 CPU threads (bench/serve.py)
            model = model.to(memory_format=torch.channels_last)
        return cls(model, meta, name, version, uri, device, bool(half and device == "cuda"), channels_last)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "task": self.meta.task,
            "architecture": self.meta.model,
            "class_names": list(self.meta.class_names),
            "num_classes": int(self.meta.num_classes),
            "image_size": int(self.meta.image_size),
            "device": self.device,
            "half": self.half,
            "channels_last": self.channels_last,
            "loaded_at": self.loaded_at,
        }

    # -- inference ----------------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.float16) if self.half else contextlib.nullcontext()

    def predict(self, images: list[np.ndarray], score_threshold: float = 0.05) -> tuple[list[Output], float]:
        """Predict RGB uint8 images [H, W, 3]; returns (one output per image, forward seconds).

        Preprocessing is the training eval transform; semantic logits are upsampled back to
        each image's size before the argmax.
        """
        if self.meta.task == "semantic":
            return self._semantic(images)
        return self._instance(images, score_threshold)

    @torch.inference_mode()
    def _semantic(self, images: list[np.ndarray]) -> tuple[list[Output], float]:
        xs = [self.transforms(_chw(img), None)[0] for img in images]
        t0 = time.perf_counter()
        x = torch.stack(xs).to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        embedded: list[np.ndarray] = []
        with self._autocast(), capture_embeddings(self.model, embedded):
            logits = self.model(x).float()
        probs = logits.softmax(1).cpu().numpy()
        emb = embedded[0] if embedded else [None] * len(images)
        outs: list[Output] = []
        for i, img in enumerate(images):  # one at a time: full-size logits of a batch can be large
            up = F.interpolate(logits[i : i + 1], size=img.shape[:2], mode="bilinear", align_corners=False)
            outs.append(SemanticOutput(class_indices(up)[0].to(torch.uint8).cpu().numpy(), probs[i], emb[i]))
        return outs, time.perf_counter() - t0

    @torch.inference_mode()
    def _instance(self, images: list[np.ndarray], score_threshold: float) -> tuple[list[Output], float]:
        xs = [_to_working_size(self.transforms(_chw(img), None)[0], self.model) for img in images]
        # Same-size images go through the model together; mixing sizes would pad the smaller ones
        # and change their results, and a response must not depend on its batch neighbours.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(tuple(x.shape), []).append(i)
        outs: list[Optional[Output]] = [None] * len(xs)
        t0 = time.perf_counter()
        for shape, idx in groups.items():
            step = _images_per_forward(self.model, shape)  # caps the model's float32 masks per forward
            for k in range(0, len(idx), step):
                chunk = idx[k : k + step]
                embedded: list[np.ndarray] = []
                with self._autocast(), capture_embeddings(self.model, embedded):
                    raw = self.model([xs[i].to(self.device, non_blocking=True) for i in chunk])
                emb = embedded[0] if embedded else [None] * len(chunk)
                for j, (i, o) in enumerate(zip(chunk, raw)):
                    outs[i] = _instance_output(o, score_threshold, images[i].shape[:2])
                    outs[i].embedding = emb[j]
        return outs, time.perf_counter() - t0  # type: ignore[return-value]


MAX_MASK_BYTES = 256 * 2**20  # float32 masks Mask R-CNN may hold at once in one forward


def _to_working_size(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Downscale a large image to the size the detector's own transform would resize it to.

    The detector then pastes its masks on that grid instead of the input's (same scale rule
    as torchvision's ``GeneralizedRCNNTransform``); smaller images are left to the model.
    """
    transform = getattr(model, "transform", None)
    if transform is None:
        return x
    h, w = x.shape[-2:]
    scale = min(float(transform.min_size[-1]) / min(h, w), float(transform.max_size) / max(h, w))
    if scale >= 1 or int(h * scale) < 1 or int(w * scale) < 1:
        return x
    return F.interpolate(
        x[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def _images_per_forward(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    per_image = int(getattr(getattr(model, "roi_heads", None), "detections_per_img", 100)) * shape[-1] * shape[-2] * 4
    return max(1, MAX_MASK_BYTES // max(per_image, 1))


def _instance_output(o: dict[str, torch.Tensor], score_threshold: float, image_size: tuple[int, int]) -> InstanceOutput:
    keep = o["scores"] >= score_threshold
    masks = o["masks"][keep]
    grid = masks.shape[-2:]
    boxes = o["boxes"][keep].float()
    if tuple(grid) != tuple(image_size):  # boxes back to input coordinates
        sy, sx = image_size[0] / grid[0], image_size[1] / grid[1]
        boxes = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
    return InstanceOutput(
        boxes=boxes.cpu().numpy(),
        labels=o["labels"][keep].cpu().numpy(),
        scores=o["scores"][keep].float().cpu().numpy(),
        masks=(masks[:, 0].float() * 255).round_().to(torch.uint8).cpu().numpy(),
        image_size=(int(image_size[0]), int(image_size[1])),
    )
