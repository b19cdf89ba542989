"""The replicas' inference core (``serve_app.model.load_model`` / ``run_batch``) without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_app.config import ModelSettings
from serve_app.imaging import ImageLimits, decode_image
from serve_app.model import load_model, run_batch
from serve_app.postprocess import decode_png
from tests.serve_helpers import INSTANCE, SEMANTIC, image_bytes, save_checkpoint


@pytest.fixture(scope="module")
def semantic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from train.models import build_model

    torch.manual_seed(0)
    model = build_model(SEMANTIC["model"], len(SEMANTIC["class_names"]))
    # An untrained head answers one class everywhere; louder heads give masks with several
    # classes, where a difference in layout would show.
    for head in (model.model.classifier.low_classifier, model.model.classifier.high_classifier):
        torch.nn.init.normal_(head.weight, std=3.0)
        torch.nn.init.zeros_(head.bias)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "semantic.pt", SEMANTIC, model)


def test_channels_last_gives_the_same_predictions(semantic_checkpoint: Path) -> None:
    images = [decode_image(image_bytes(seed, size=(80, 64)), ImageLimits()) for seed in range(4)]
    results = {}
    for channels_last in (False, True):
        lm = load_model(ModelSettings(model_uri=f"checkpoint:{semantic_checkpoint}", channels_last=channels_last))
        assert lm.channels_last is channels_last and lm.info()["channels_last"] is channels_last
        results[channels_last], _ = run_batch(lm, images)
    for plain, nhwc in zip(results[False], results[True]):
        a, b = decode_png_b64(plain["mask_png_base64"]), decode_png_b64(nhwc["mask_png_base64"])
        assert a.shape == b.shape == (64, 80)
        assert (a == b).mean() > 0.999  # float rounding may flip a near-tie pixel, nothing more
        assert len(np.unique(a)) > 1
        assert nhwc["confidence"] == pytest.approx(plain["confidence"], abs=1e-5)
        assert nhwc["entropy"] == pytest.approx(plain["entropy"], abs=1e-5)


def test_channels_last_is_semantic_only(tmp_path: Path) -> None:
    """Mask R-CNN batches images itself; the option leaves it in its own layout."""
    path = save_checkpoint(tmp_path / "instance.pt", INSTANCE)
    lm = load_model(ModelSettings(model_uri=f"checkpoint:{path}"))
    assert lm.meta.task == "instance" and lm.channels_last is False
    (result,), _ = run_batch(lm, [decode_image(image_bytes(0, size=(96, 96)), ImageLimits())])
    assert result["task"] == "instance"
    # a changed layout is a different model source: replicas reload
    assert (
        ModelSettings(model_uri="checkpoint:/x.pt", channels_last=False).model_source()
        != ModelSettings(model_uri="checkpoint:/x.pt").model_source()
    )


def decode_png_b64(data: str) -> np.ndarray:
    import base64

    return decode_png(base64.b64decode(data))


MEMORY_PROBE = """
import resource, sys, numpy as np, torch
from train.models import build_model
from train.model_ref import ModelMeta
from train.predict import Predictor
from serve_app.model import run_batch
kw = {"min_size": 96, "max_size": 128, "box_detections_per_img": 100, "box_score_thresh": 0.0}
torch.manual_seed(0)
model = build_model("maskrcnn_mobilenet_v3_large_fpn", 4, **kw).eval()
meta = ModelMeta(model="maskrcnn_mobilenet_v3_large_fpn", task="instance", num_classes=4,
                 class_names=["background", "a", "b", "c"], image_size=96, model_kwargs=kw)
predictor = Predictor.from_state(meta, model.state_dict())
side = int(sys.argv[1])
image = np.frombuffer(np.random.default_rng(0).bytes(side * side * 3), np.uint8).reshape(side, side, 3).copy()
run_batch(predictor, [np.zeros((64, 64, 3), np.uint8)], [True], 0.0)  # warm-up: allocator pools, lazy imports
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(result,), _ = run_batch(predictor, [image], [True], 0.0)  # JSON fields and the label PNG
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result["num_instances"], (after - before) // 1024, len(result["mask_png"]))
"""


@pytest.mark.slow
def test_instance_masks_of_a_large_image_stay_within_a_memory_budget():
    """~100 detections on a 4096 x 4096 upload: float32 masks at full size were 6.7 GB (and copies)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, "4096"], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    instances, growth_mb = int(out[0]), int(out[1])
    assert instances >= 80, f"the probe needs many detections, got {instances}"
    assert growth_mb < 512, f"peak memory grew by {growth_mb} MB answering one large image"
