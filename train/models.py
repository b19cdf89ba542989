"""Model registry: a name -> builder table for every segmentation model segloop trains.

Semantic models are torchvision segmentation networks wrapped so ``forward`` returns the
logits tensor ``[B, C, H, W]``; instance models are torchvision ``MaskRCNN``.

Pretrained weights are named like torchvision names them (``"DEFAULT"``,
``"COCO_WITH_VOC_LABELS_V1"`` or ``"LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"``)
and are only ever read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``): the
machines have no internet, so a missing file is a :class:`ModelError` that says which file
to place where, never a download.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, mobilenet_v3_large
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _validate_trainable_layers,
)
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.segmentation import (
    DeepLabV3_MobileNet_V3_Large_Weights,
    DeepLabV3_ResNet50_Weights,
    FCN_ResNet50_Weights,
    LRASPP_MobileNet_V3_Large_Weights,
    deeplabv3_mobilenet_v3_large,
    deeplabv3_resnet50,
    fcn_resnet50,
    lraspp_mobilenet_v3_large,
)
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segloop.errors import ModelError

__all__ = [
    "MODELS",
    "ModelSpec",
    "SemanticModel",
    "build_model",
    "count_parameters",
    "default_model",
    "list_models",
    "load_checkpoint",
    "model_task",
    "resolve_weights",
    "weights_file",
]

TASKS = ("semantic", "instance")


class SemanticModel(nn.Module):
    """Thin wrapper over a torchvision segmentation model that returns ``out`` logits only.

    torchvision returns ``{"out": ..., "aux": ...}``; the training loop, metrics and
    serving all want one ``[B, C, H, W]`` tensor at input resolution.
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build a model and which torchvision weights fit it."""

    name: str
    task: str
    builder: Callable[..., nn.Module]
    weights: tuple[type[WeightsEnum], ...]
    weights_backbone: tuple[type[WeightsEnum], ...]
    description: str = ""


# --------------------------------------------------------------------------- weights


def weights_file(weights: WeightsEnum) -> Path:
    """Where torch hub keeps (and torchvision looks for) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _weight_names(enums: tuple[type[WeightsEnum], ...]) -> list[str]:
    names = ["DEFAULT"] if enums else []
    return names + [f"{e.__name__}.{m.name}" for e in enums for m in e]


def resolve_weights(
    spec: str | WeightsEnum | None,
    enums: tuple[type[WeightsEnum], ...],
    *,
    what: str = "weights",
    model: str = "",
) -> WeightsEnum | None:
    """Turn a torchvision weight name into its enum member, checking it fits the model.

    Accepts ``None``/``"none"``, ``"DEFAULT"``, a bare member name (``"COCO_V1"``), a full
    name (``"MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"``) or an enum member.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "null")):
        return None
    valid = _weight_names(enums)
    where = f" for model {model!r}" if model else ""
    if not enums:
        raise ModelError(f"model {model!r} has no pretrained {what} to load; got {spec!r}, expected None")
    if isinstance(spec, WeightsEnum):
        if type(spec) in enums:
            return spec
        raise ModelError(f"{what} {spec!r} do not fit{where}; valid {what}: {', '.join(valid)}")
    if not isinstance(spec, str):
        raise ModelError(f"{what}{where} must be a torchvision weight name, got {type(spec).__name__} {spec!r}")
    text = spec.strip()
    enum_name, _, member = text.rpartition(".")
    candidates = enums if not enum_name else tuple(e for e in enums if e.__name__ == enum_name)
    for enum in candidates:
        try:
            return enum[member]  # "DEFAULT" is an alias member of every torchvision weights enum
        except KeyError:
            continue
    raise ModelError(f"unknown {what} {spec!r}{where}; valid {what}: {', '.join(valid)}")


def _check_cached(weights: WeightsEnum, model: str) -> Path:
    """Fail with a placeable-file message unless ``weights`` sit in the hub cache and are safe to load.

    The file is opened with ``weights_only=True`` (memory-mapped, so it is cheap) before torchvision
    reads it, so a corrupt or pickled-code file is a ModelError, not a stack trace.
    """
    path = weights_file(weights)
    if not path.is_file():
        raise ModelError(
            f"pretrained weights {type(weights).__name__}.{weights.name} for model {model!r} are not in the "
            f"torch hub cache and nothing is downloaded here: place the file {path.name} (from {weights.url}) "
            f"at {path} (set TORCH_HOME to move the cache; it is {os.environ.get('TORCH_HOME', 'unset')})"
        )
    _read_state_dict(path, what="pretrained weights file")
    return path


def _read_state_dict(path: Path, *, what: str) -> Mapping[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # old (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(
            f"{what} {path} cannot be read ({type(err).__name__}: {err}); expected a state_dict saved with torch.save"
        ) from err
    if not isinstance(obj, Mapping):
        raise ModelError(f"{what} {path} holds a {type(obj).__name__}, expected a state_dict (a dict of tensors)")
    return obj


def _delegate(builder: Callable[..., nn.Module], files: list[Path], model: str, **kwargs: Any) -> nn.Module:
    """Call a torchvision builder (which reads cached weights itself) and translate its errors."""
    try:
        return builder(progress=False, **kwargs)
    except RuntimeError as err:  # load_state_dict mismatch of a cached file
        raise ModelError(f"weights file(s) {', '.join(map(str, files))} do not match model {model!r}: {err}") from err


# --------------------------------------------------------------------------- heads


def _replace_semantic_head(model: nn.Module, num_classes: int) -> None:
    """Swap the final classifier conv(s) for fresh ones with ``num_classes`` outputs."""
    head = model.classifier
    if hasattr(head, "low_classifier"):  # LRASPP predicts from two branches that are summed
        head.low_classifier = nn.Conv2d(head.low_classifier.in_channels, num_classes, 1)
        head.high_classifier = nn.Conv2d(head.high_classifier.in_channels, num_classes, 1)
    else:  # DeepLabHead / FCNHead: a Sequential ending with a 1x1 conv
        last = head[-1]
        head[-1] = nn.Conv2d(last.in_channels, num_classes, 1)


def _replace_instance_heads(model: MaskRCNN, num_classes: int) -> None:
    """Swap box and mask predictors for fresh ones with ``num_classes`` (incl. background)."""
    heads = model.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    conv = heads.mask_predictor.conv5_mask
    heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes)


# --------------------------------------------------------------------------- builders


def _semantic_builder(tv_builder: Callable[..., nn.Module], has_aux: bool) -> Callable[..., nn.Module]:
    def build(
        name: str,
        num_classes: int | None,
        weights: WeightsEnum | None,
        weights_backbone: WeightsEnum | None,
        **kwargs: Any,
    ) -> nn.Module:
        if kwargs:
            raise ModelError(f"semantic model {name!r} takes no extra options, got {sorted(kwargs)}")
        if weights is not None:
            files = [_check_cached(weights, name)]
            # torchvision insists on its own class count and (for DeepLab/FCN) the aux head here
            model = _delegate(tv_builder, files, name, weights=weights, weights_backbone=None)
            if has_aux:
                model.aux_classifier = None
            n_pretrained = len(weights.meta["categories"])
            if num_classes is not None and num_classes != n_pretrained:
                _replace_semantic_head(model, num_classes)
            else:
                num_classes = n_pretrained
        else:
            num_classes = 21 if num_classes is None else num_classes
            files = [_check_cached(weights_backbone, name)] if weights_backbone is not None else []
            extra = {"aux_loss": False} if has_aux else {}
            model = _delegate(
                tv_builder,
                files,
                name,
                weights=None,
                weights_backbone=weights_backbone,
                num_classes=num_classes,
                **extra,
            )
        return SemanticModel(model, num_classes)

    return build


def _maskrcnn_options() -> frozenset[str]:
    """Keyword options MaskRCNN really uses (it swallows unknown ones silently via **kwargs)."""
    names = set()
    for fn in (MaskRCNN.__init__, FasterRCNN.__init__, GeneralizedRCNNTransform.__init__):
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(names - {"self", "backbone", "num_classes", "min_size", "max_size"}) | {
        "min_size",
        "max_size",
        "trainable_backbone_layers",
    }


def _maskrcnn_builder(tv_builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(
        name: str,
        num_classes: int | None,
        weights: WeightsEnum | None,
        weights_backbone: WeightsEnum | None,
        **kwargs: Any,
    ) -> nn.Module:
        unknown = sorted(set(kwargs) - _maskrcnn_options())
        if unknown:
            valid = ", ".join(sorted(_maskrcnn_options()))
            raise ModelError(f"unknown option(s) {unknown} for model {name!r}; valid options: {valid}")
        if weights is not None:
            files = [_check_cached(weights, name)]
            model = _delegate(tv_builder, files, name, weights=weights, weights_backbone=None, **kwargs)
            if num_classes is not None and num_classes != len(weights.meta["categories"]):
                _replace_instance_heads(model, num_classes)
            return model
        files = [_check_cached(weights_backbone, name)] if weights_backbone is not None else []
        num_classes = 91 if num_classes is None else num_classes
        return _delegate(
            tv_builder, files, name, weights=None, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
        )

    return build


# Small inputs and fewer proposals: this variant exists to train and serve on a CPU.
_LIGHT_MASKRCNN_DEFAULTS: dict[str, Any] = {
    "min_size": 320,
    "max_size": 640,
    "rpn_pre_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_train": 500,
    "rpn_pre_nms_top_n_test": 150,
    "rpn_post_nms_top_n_test": 150,
    "rpn_score_thresh": 0.05,
    "box_batch_size_per_image": 256,
}


def _maskrcnn_mobilenet_v3_large_fpn(
    *,
    weights: WeightsEnum | None = None,
    progress: bool = False,
    num_classes: int | None = None,
    weights_backbone: WeightsEnum | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on the MobileNetV3-Large FPN backbone of ``fasterrcnn_mobilenet_v3_large_fpn``.

    torchvision ships no Mask R-CNN for this backbone; the Faster R-CNN COCO weights cover
    everything but the mask branch, which then starts from scratch.
    """
    if weights is not None:
        weights_backbone = None
        n_pretrained = len(weights.meta["categories"])
        if num_classes is not None and num_classes != n_pretrained:
            raise ValueError(f"num_classes must be {n_pretrained} with weights {weights}, got {num_classes}")
        num_classes = n_pretrained
    elif num_classes is None:
        num_classes = 91
    is_trained = weights is not None or weights_backbone is not None
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers, 6, 3)
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d

    backbone = mobilenet_v3_large(weights=weights_backbone, progress=progress, norm_layer=norm_layer)
    backbone = _mobilenet_extractor(backbone, True, trainable_backbone_layers)
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    aspect_ratios = ((0.5, 1.0, 2.0),) * len(anchor_sizes)
    options = {**_LIGHT_MASKRCNN_DEFAULTS, **kwargs}
    anchors = AnchorGenerator(anchor_sizes, aspect_ratios)
    model = MaskRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **options)

    if weights is not None:
        path = weights_file(weights)
        state = _read_state_dict(path, what="pretrained weights file")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor."))]
        if missing or unexpected:
            raise ModelError(
                f"weights file {path} does not match model 'maskrcnn_mobilenet_v3_large_fpn': "
                f"missing keys {missing[:5]}, unexpected keys {list(unexpected)[:5]}"
            )
    return model


# The slim variant's sizes: measured on 96-128 px inputs on a 2-core CPU, a training step is ~4x
# faster than the light model's above (whose 256-channel RoI align and 1024-wide box head dominate).
_SLIM_CHANNELS = 64
_SLIM_REPRESENTATION = 256
_SLIM_MASK_LAYERS = (64, 64)
_SLIM_DEFAULTS: dict[str, Any] = {
    **_LIGHT_MASKRCNN_DEFAULTS,
    "min_size": 128,
    "max_size": 128,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 20,
}


def _maskrcnn_mobilenet_v3_large_fpn_slim(
    *,
    weights: WeightsEnum | None = None,
    progress: bool = False,
    num_classes: int | None = None,
    weights_backbone: WeightsEnum | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN for CPUs: MobileNetV3-Large, a 64-channel FPN on strides 8/16/32, slim heads.

    Strides 8-32 with one anchor size per level suit small images (the light model's FPN
    starts at stride 16). No full pretrained weights fit these heads; an ImageNet backbone does.
    """
    if weights is not None:
        raise ValueError("maskrcnn_mobilenet_v3_large_fpn_slim has no pretrained weights; use weights_backbone")
    num_classes = 91 if num_classes is None else num_classes
    is_trained = weights_backbone is not None
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers, 6, 3)
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    features = mobilenet_v3_large(weights=weights_backbone, progress=progress, norm_layer=norm_layer).features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    freeze_before = stages[len(stages) - trainable_backbone_layers] if trainable_backbone_layers else len(features)
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    returned = stages[-3:]  # strides 8, 16, 32
    backbone = BackboneWithFPN(
        features,
        {str(k): str(i) for i, k in enumerate(returned)},
        [features[k].out_channels for k in returned],
        _SLIM_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )
    levels = [str(i) for i in range(len(returned))]
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    return MaskRCNN(
        backbone,
        None,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(_SLIM_CHANNELS * 7 * 7, _SLIM_REPRESENTATION),
        box_predictor=FastRCNNPredictor(_SLIM_REPRESENTATION, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(_SLIM_CHANNELS, list(_SLIM_MASK_LAYERS), 1),
        mask_predictor=MaskRCNNPredictor(_SLIM_MASK_LAYERS[-1], _SLIM_MASK_LAYERS[-1], num_classes),
        **{**_SLIM_DEFAULTS, **kwargs},
    )


def _semantic(
    name: str,
    tv_builder: Callable[..., nn.Module],
    has_aux: bool,
    weights: tuple[type[WeightsEnum], ...],
    backbone: tuple[type[WeightsEnum], ...],
    description: str,
) -> ModelSpec:
    return ModelSpec(name, "semantic", _semantic_builder(tv_builder, has_aux), weights, backbone, description)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _semantic(
            "lraspp_mobilenet_v3_large",
            lraspp_mobilenet_v3_large,
            False,
            (LRASPP_MobileNet_V3_Large_Weights,),
            (MobileNet_V3_Large_Weights,),
            "LR-ASPP, MobileNetV3-Large (3.2M params); fastest, the CPU default",
        ),
        _semantic(
            "deeplabv3_mobilenet_v3_large",
            deeplabv3_mobilenet_v3_large,
            True,
            (DeepLabV3_MobileNet_V3_Large_Weights,),
            (MobileNet_V3_Large_Weights,),
            "DeepLabV3, MobileNetV3-Large (11M params)",
        ),
        _semantic(
            "deeplabv3_resnet50",
            deeplabv3_resnet50,
            True,
            (DeepLabV3_ResNet50_Weights,),
            (ResNet50_Weights,),
            "DeepLabV3, ResNet-50 (40M params); GPU",
        ),
        _semantic(
            "fcn_resnet50",
            fcn_resnet50,
            True,
            (FCN_ResNet50_Weights,),
            (ResNet50_Weights,),
            "FCN, ResNet-50 (33M params); GPU",
        ),
        ModelSpec(
            "maskrcnn_resnet50_fpn_v2",
            "instance",
            _maskrcnn_builder(maskrcnn_resnet50_fpn_v2),
            (MaskRCNN_ResNet50_FPN_V2_Weights,),
            (ResNet50_Weights,),
            "Mask R-CNN v2, ResNet-50 FPN (46M params); the COCO default, GPU",
        ),
        ModelSpec(
            "maskrcnn_mobilenet_v3_large_fpn",
            "instance",
            _maskrcnn_builder(_maskrcnn_mobilenet_v3_large_fpn),
            (FasterRCNN_MobileNet_V3_Large_FPN_Weights, FasterRCNN_MobileNet_V3_Large_320_FPN_Weights),
            (MobileNet_V3_Large_Weights,),
            "Mask R-CNN, MobileNetV3-Large FPN, small inputs (min_size=320); light, CPU-friendly",
        ),
        ModelSpec(
            "maskrcnn_mobilenet_v3_large_fpn_slim",
            "instance",
            _maskrcnn_builder(_maskrcnn_mobilenet_v3_large_fpn_slim),
            (),
            (MobileNet_V3_Large_Weights,),
            "Mask R-CNN, MobileNetV3-Large, 64-channel FPN (strides 8-32), slim heads, 128 px inputs "
            "(4.2M params); the CPU demo's and tests' instance model",
        ),
    )
}

_DEFAULTS = {"semantic": "lraspp_mobilenet_v3_large", "instance": "maskrcnn_resnet50_fpn_v2"}


# --------------------------------------------------------------------------- public API


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}") from None


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def model_task(name: str) -> str:
    """``"semantic"`` or ``"instance"`` for a registered model name."""
    return _spec(name).task


def list_models(task: str | None = None) -> list[str]:
    """Registered model names (sorted), optionally only those of one task."""
    if task is not None:
        _check_task(task)
    return sorted(n for n, s in MODELS.items() if task is None or s.task == task)


def default_model(task: str) -> str:
    """The model used when a config names none: fast on CPU for semantic, Mask R-CNN v2 for instance."""
    return _DEFAULTS[_check_task(task)]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    name: str,
    num_classes: int | None,
    *,
    weights: str | WeightsEnum | None = None,
    weights_backbone: str | WeightsEnum | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a key of :data:`MODELS` (see :func:`list_models`).
        num_classes: output classes including background; ``None`` keeps the pretrained count
            (or torchvision's default: 21 semantic, 91 instance).
        weights: torchvision weight name of the whole model; heads are replaced when
            ``num_classes`` differs from the weights' classes. Read from the hub cache only.
        weights_backbone: torchvision weight name of the backbone (ignored with ``weights``).
        checkpoint: a segloop checkpoint (``torch.save({"model": state_dict, ...})`` or a bare
            state_dict) loaded over the built model. Pretrained weights are then pointless and
            are not loaded (so serving needs no hub cache); the architecture is built as if from
            scratch (e.g. no frozen backbone layers).
        **kwargs: instance models only: options for torchvision ``MaskRCNN`` (``min_size``,
            ``max_size``, ``box_detections_per_img``, ``trainable_backbone_layers`` ...).
    """
    spec = _spec(name)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ModelError(
            f"num_classes for model {name!r} must be an integer >= 2 (incl. background), got {num_classes!r}"
        )
    if checkpoint is not None:
        weights = weights_backbone = None
    else:
        weights = resolve_weights(weights, spec.weights, what="weights", model=name)
        weights_backbone = resolve_weights(weights_backbone, spec.weights_backbone, what="weights_backbone", model=name)
        if weights is not None and weights_backbone is not None:
            weights_backbone = None  # the full weights already hold a (better) backbone
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Changing trainable_backbone_layers has no effect")
            model = spec.builder(name, num_classes, weights, weights_backbone, **kwargs)
    except TypeError as err:  # an option torchvision does not know
        raise ModelError(f"invalid option(s) {sorted(kwargs)} for model {name!r}: {err}") from err
    except ValueError as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"cannot build model {name!r}: {err}") from err
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name=name)
    return model


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file into ``model`` (strictly) and return the file's extra entries.

    Accepts ``{"model": state_dict, ...}`` or a bare state_dict; tolerates the ``module.``
    (DDP) and ``_orig_mod.`` (torch.compile) prefixes and, for :class:`SemanticModel`, a
    bare torchvision state_dict and an unused ``aux_classifier``. If the file records a
    ``model_name`` other than ``name``, that is an error.
    """
    path = Path(path)
    label = f"model {name!r}" if name else type(model).__name__
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist (needed to build {label})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "expected a file written by torch.save({'model': state_dict, ...})"
        ) from err
    extra: dict[str, Any] = {}
    state = obj
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state = obj["model"]
        extra = {k: v for k, v in obj.items() if k != "model"}
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"checkpoint {path} holds no state_dict: expected {{'model': state_dict, ...}} or a state_dict"
        )
    recorded = extra.get("model_name")
    if name is not None and isinstance(recorded, str) and recorded != name:
        raise ModelError(f"checkpoint {path} was saved from model {recorded!r}, cannot load it into {name!r}")

    state = _strip(_strip(state, "module."), "_orig_mod.")
    if isinstance(model, SemanticModel):
        if not any(k.startswith("model.") for k in state):
            state = {f"model.{k}": v for k, v in state.items()}
        if getattr(model.model, "aux_classifier", None) is None:
            state = {k: v for k, v in state.items() if not k.startswith("model.aux_classifier.")}

    expected = model.state_dict()
    # BatchNorm and FrozenBatchNorm2d differ only by this counter, which both fill in or drop themselves
    counter = "num_batches_tracked"
    missing = [k for k in expected if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in expected and not k.endswith(counter)]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape mismatches ({'; '.join(shapes[:3])}; a different num_classes?)")
        raise ModelError(f"checkpoint {path} does not fit {label}: {', '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return extra
