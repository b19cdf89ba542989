"""Tests of the model registry: real (tiny) forward/backward passes, weights from a fake hub cache, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V3_Large_Weights
from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights
from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights, LRASPP_MobileNet_V3_Large_Weights

from segloop.errors import ModelError
from train.models import (
    MODELS,
    SemanticModel,
    build_model,
    count_parameters,
    default_model,
    list_models,
    load_checkpoint,
    model_task,
    resolve_weights,
    weights_file,
)

SEMANTIC = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50"]
INSTANCE = ["maskrcnn_mobilenet_v3_large_fpn", "maskrcnn_mobilenet_v3_large_fpn_slim", "maskrcnn_resnet50_fpn_v2"]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache under tmp (``TORCH_HOME``): what a machine without internet sees."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert checkpoints.is_relative_to(tmp_path)
    checkpoints.mkdir(parents=True)
    return checkpoints


def _instance_batch(size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, size, size), torch.rand(3, size, size)]
    targets = []
    for boxes in ([[4, 4, 28, 30], [30, 20, 60, 50]], [[10, 12, 40, 44]]):
        masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            m[y0:y1, x0:x1] = 1
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.arange(1, len(boxes) + 1),
                "masks": masks,
            }
        )
    return images, targets


# --------------------------------------------------------------------------- registry


def test_registry_lists_tasks_and_defaults() -> None:
    assert sorted(SEMANTIC + INSTANCE) == list_models() == sorted(MODELS)
    assert list_models("semantic") == sorted(SEMANTIC)
    assert list_models("instance") == sorted(INSTANCE)
    assert all(model_task(n) == "semantic" for n in SEMANTIC)
    assert all(model_task(n) == "instance" for n in INSTANCE)
    assert default_model("semantic") == "lraspp_mobilenet_v3_large"
    assert default_model("instance") == "maskrcnn_resnet50_fpn_v2"
    with pytest.raises(ModelError, match="unknown task 'panoptic'"):
        list_models("panoptic")


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError) as err:
        build_model("unet_resnet34", 3)
    assert "unet_resnet34" in str(err.value)
    assert all(name in str(err.value) for name in MODELS)
    with pytest.raises(ModelError, match="valid models"):
        model_task("nope")


def test_bad_num_classes_and_options() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        build_model("lraspp_mobilenet_v3_large", 1)
    with pytest.raises(ModelError, match="no extra options"):
        build_model("lraspp_mobilenet_v3_large", 3, min_size=64)
    with pytest.raises(ModelError, match="bogus"):
        build_model("maskrcnn_mobilenet_v3_large_fpn", 3, bogus=1)


def test_count_parameters() -> None:
    model = torch.nn.Linear(4, 3)
    assert count_parameters(model) == 15
    model.bias.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 12


# --------------------------------------------------------------------------- forward / backward


def _semantic_step(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3)
    assert isinstance(model, SemanticModel) and model.num_classes == 3
    model.train()
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, 3, size, size)
    logits.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size + 8, size)).shape == (1, 3, size + 8, size)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_semantic_forward_backward(name: str) -> None:
    _semantic_step(name, 96)


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_semantic_resnet_forward_backward(name: str) -> None:
    _semantic_step(name, 64)


# few proposals and sampled RoIs keep the ResNet-50 heads cheap; v2 still takes ~10-20 s on 2 CPU cores
SMALL_RCNN = {
    "min_size": 64,
    "max_size": 64,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 10,
}


@pytest.mark.parametrize(
    "name",
    [
        "maskrcnn_mobilenet_v3_large_fpn",
        "maskrcnn_mobilenet_v3_large_fpn_slim",
        pytest.param("maskrcnn_resnet50_fpn_v2", marks=pytest.mark.slow),  # the seed's model, one step
    ],
)
def test_instance_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, **SMALL_RCNN)
    assert isinstance(model, torchvision.models.detection.MaskRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    images, targets = _instance_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o in out:
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        assert o["masks"].shape[1:] == (1, 64, 64)


def test_default_instance_model_builds_with_new_heads() -> None:
    # the train/eval pass of this model is marked slow; building it stays in the fast suite
    model = build_model(default_model("instance"), 4)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert 40e6 < count_parameters(model) < 50e6


def test_slim_maskrcnn_is_small_and_refuses_full_weights() -> None:
    model = build_model("maskrcnn_mobilenet_v3_large_fpn_slim", 3)
    assert model.backbone.out_channels == 64 and model.transform.min_size == (128,)
    assert model.roi_heads.detections_per_img == 20
    assert 3e6 < count_parameters(model) < 6e6
    assert build_model("maskrcnn_mobilenet_v3_large_fpn_slim", 3, min_size=96, max_size=96).transform.max_size == 96
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model("maskrcnn_mobilenet_v3_large_fpn_slim", 3, weights="DEFAULT")


def test_light_maskrcnn_defaults_are_small_and_overridable() -> None:
    model = build_model("maskrcnn_mobilenet_v3_large_fpn", 2)
    assert model.transform.min_size == (320,) and model.transform.max_size == 640
    assert model.rpn._pre_nms_top_n["testing"] <= 300
    model = build_model("maskrcnn_mobilenet_v3_large_fpn", 2, min_size=128, max_size=128, rpn_pre_nms_top_n_test=50)
    assert model.transform.min_size == (128,) and model.transform.max_size == 128
    assert model.rpn._pre_nms_top_n["testing"] == 50


# --------------------------------------------------------------------------- pretrained weights (fake hub cache)


def test_weight_name_resolution() -> None:
    enums = MODELS["lraspp_mobilenet_v3_large"].weights
    expected = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    assert resolve_weights("DEFAULT", enums) is expected
    assert resolve_weights("COCO_WITH_VOC_LABELS_V1", enums) is expected
    assert resolve_weights("LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1", enums) is expected
    assert resolve_weights(expected, enums) is expected
    assert resolve_weights(None, enums) is None
    with pytest.raises(ModelError, match="LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"):
        resolve_weights("IMAGENET1K_V7", enums)
    with pytest.raises(ModelError, match="unknown weights"):  # real torchvision weights, wrong model
        build_model("lraspp_mobilenet_v3_large", 3, weights="DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1")
    with pytest.raises(ModelError, match="do not fit"):
        build_model("lraspp_mobilenet_v3_large", 3, weights=DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT)
    assert weights_file(expected).name == Path(expected.url).name


def test_missing_weights_name_the_file_and_download_nothing(hub: Path) -> None:
    weights = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    path = hub / Path(weights.url).name
    assert weights_file(weights) == path
    with pytest.raises(ModelError) as err:
        build_model("lraspp_mobilenet_v3_large", 3, weights="DEFAULT")
    assert str(path) in str(err.value) and weights.url in str(err.value)
    backbone = hub / Path(MobileNet_V3_Large_Weights.IMAGENET1K_V1.url).name
    with pytest.raises(ModelError, match=str(backbone)):
        build_model("maskrcnn_mobilenet_v3_large_fpn", 3, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1")
    assert list(hub.iterdir()) == []


def test_pretrained_weights_load_from_cache_and_head_is_replaced(hub: Path) -> None:
    weights = LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    source = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=21)
    saved = source.state_dict()
    torch.save(saved, hub / Path(weights.url).name)

    same = build_model("lraspp_mobilenet_v3_large", None, weights="DEFAULT")
    assert same.num_classes == 21
    for key, value in same.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)

    model = build_model("lraspp_mobilenet_v3_large", 3, weights="DEFAULT")
    state = model.model.state_dict()
    assert state["classifier.low_classifier.weight"].shape[0] == 3
    assert state["classifier.high_classifier.weight"].shape[0] == 3
    backbone = [k for k in state if k.startswith("backbone.")]
    assert backbone
    for key in backbone:
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_pretrained_deeplab_drops_aux_head(hub: Path) -> None:
    weights = DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT
    source = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights_backbone=None, aux_loss=True)
    saved = source.state_dict()
    torch.save(saved, weights_file(weights))
    model = build_model("deeplabv3_mobilenet_v3_large", 3, weights=weights.name)
    assert model.model.aux_classifier is None
    assert model.model.classifier[-1].out_channels == 3
    torch.testing.assert_close(model.model.classifier[0].convs[0][0].weight, saved["classifier.0.convs.0.0.weight"])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_pretrained_backbone_loads_from_cache(hub: Path) -> None:
    saved = torchvision.models.mobilenet_v3_large().state_dict()
    torch.save(saved, weights_file(MobileNet_V3_Large_Weights.IMAGENET1K_V1))
    model = build_model("lraspp_mobilenet_v3_large", 3, weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(model.model.backbone["0"][0].weight, saved["features.0.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.model.backbone["16"][0].weight, saved["features.16.0.weight"], rtol=0, atol=0)


def test_corrupt_cached_weights_are_a_model_error(hub: Path) -> None:
    path = weights_file(LRASPP_MobileNet_V3_Large_Weights.DEFAULT)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=str(path)):
        build_model("lraspp_mobilenet_v3_large", 3, weights="DEFAULT")
    torch.save({"backbone.nope": torch.zeros(1)}, path)
    with pytest.raises(ModelError, match="do not match"):
        build_model("lraspp_mobilenet_v3_large", 3, weights="DEFAULT")


def test_light_maskrcnn_takes_fasterrcnn_weights(hub: Path) -> None:
    weights = FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
    source = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights_backbone=None, num_classes=91)
    saved = source.state_dict()
    torch.save(saved, weights_file(weights))
    model = build_model("maskrcnn_mobilenet_v3_large_fpn", 4, weights="DEFAULT", min_size=64, max_size=64)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    state = model.state_dict()
    for key in ("backbone.body.0.0.weight", "backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight"):
        torch.testing.assert_close(state[key], saved[key], rtol=0, atol=0)
    assert not model.backbone.body["0"][0].weight.requires_grad  # early layers frozen as torchvision does
    images, targets = _instance_batch()
    model.train()
    sum(model(images, targets).values()).backward()


# --------------------------------------------------------------------------- checkpoints


def test_semantic_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 3, "model_name": "lraspp_mobilenet_v3_large"}, path)
    loaded = build_model("lraspp_mobilenet_v3_large", 3, checkpoint=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)

    bare = tmp_path / "bare.pt"  # a bare state_dict from a DDP-wrapped model
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, bare)
    fresh = build_model("lraspp_mobilenet_v3_large", 3)
    assert load_checkpoint(fresh.eval(), bare) == {}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)


@pytest.mark.parametrize("name", ["maskrcnn_mobilenet_v3_large_fpn", "maskrcnn_mobilenet_v3_large_fpn_slim"])
def test_instance_checkpoint_round_trip_across_frozen_batchnorm(tmp_path: Path, hub: Path, name: str) -> None:
    # a model fine-tuned from a pretrained backbone (FrozenBatchNorm2d) must load into a plain build
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), weights_file(MobileNet_V3_Large_Weights.DEFAULT))
    model = build_model(name, 3, weights_backbone="DEFAULT", min_size=64, max_size=64)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded = build_model(name, 3, checkpoint=path, min_size=64, max_size=64)
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    images, _ = _instance_batch()
    model.eval(), loaded.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["boxes"], y["boxes"])


def test_bad_checkpoints_name_the_file(tmp_path: Path) -> None:
    name = "lraspp_mobilenet_v3_large"
    missing = tmp_path / "missing.pt"
    with pytest.raises(ModelError, match="does not exist"):
        build_model(name, 3, checkpoint=missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match=str(corrupt)):
        build_model(name, 3, checkpoint=corrupt)
    other = tmp_path / "five_classes.pt"
    torch.save({"model": build_model(name, 5).state_dict()}, other)
    with pytest.raises(ModelError, match="shape mismatches") as err:
        build_model(name, 3, checkpoint=other)
    assert str(other) in str(err.value)
    wrong = tmp_path / "wrong_model.pt"
    torch.save({"model": build_model("deeplabv3_mobilenet_v3_large", 3).state_dict()}, wrong)
    with pytest.raises(ModelError, match="missing keys"):
        build_model(name, 3, checkpoint=wrong)
    labelled = tmp_path / "labelled.pt"
    torch.save({"model": build_model(name, 3).state_dict(), "model_name": "fcn_resnet50"}, labelled)
    with pytest.raises(ModelError, match="fcn_resnet50"):
        build_model(name, 3, checkpoint=labelled)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": build_model(name, 3)}, pickled)  # a whole module, not a state_dict
    with pytest.raises(ModelError, match=str(pickled)):
        build_model(name, 3, checkpoint=pickled)
