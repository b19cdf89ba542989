"""The shipped example configs learn: a user's first model is better than a constant prediction.

Each test loads a file from ``configs/`` exactly as a user would and points only its data at
generated data (the README's ``python -m train.data synth`` output); the COCO config is
shortened to a CPU-sized Mask R-CNN, since its ResNet-50 v2 model is a GPU job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from segloop.config import load_config
from train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pets_config_learns_as_shipped(ray_cluster, tmp_path: Path, data_dir: Path) -> None:
    from train.data.synth import generate_pets
    from train.job import run

    # what `python -m train.data synth --task pets --out ... --n 200 --seed 0` writes (128 px)
    root = generate_pets(tmp_path / "pets", n=200, seed=0)
    cfg = load_config(TrainConfig, REPO / "configs" / "pets.yaml", [f"dataset={root}", f"data_dir={data_dir}"])
    result = run(cfg)

    held_out = result.holdout
    assert held_out["val_miou"] >= 0.6, held_out
    assert held_out["val_iou_pet"] > 0.4, held_out
    assert result.promoted and result.model_version == "1"


@pytest.mark.slow
@pytest.mark.long
def test_coco_config_learns_shortened(ray_cluster, tmp_path: Path, data_dir: Path) -> None:
    import torch

    from train.data.synth import generate_coco
    from train.job import evaluate_on_holdout, run
    from train.models import build_model
    from train.run import dataset_classes

    root = generate_coco(tmp_path / "coco", n=80, seed=0, size=96)
    overrides = [
        f"dataset={root}",
        f"data_dir={data_dir}",
        # shortened: the light Mask R-CNN on 160 px inputs, fewer sampled RoIs, 4 epochs, both CPUs
        # in the one worker; optimiser, learning rate, batch size and schedule as shipped
        "model=maskrcnn_mobilenet_v3_large_fpn",
        "model_kwargs={min_size: 160, max_size: 160, box_batch_size_per_image: 64}",
        "epochs=4",
        "cpus_per_worker=2",
    ]
    cfg = load_config(TrainConfig, REPO / "configs" / "coco.yaml", overrides)
    result = run(cfg)

    # the same architecture untrained, scored by the same held-out evaluation
    num_classes, class_names = dataset_classes(cfg, root)
    torch.manual_seed(0)
    untrained = evaluate_on_holdout(
        cfg.model_dump(mode="json"),
        {"name": "pets", "path": str(root)},  # a train.run.DatasetSource
        build_model(cfg.model, num_classes, **cfg.model_kwargs).state_dict(),
        num_classes,
        class_names,
        with_curves=False,
    )["metrics"]
    trained = result.holdout
    print(
        f"held-out segm mAP50-95 / mAP50: trained {trained['val_segm_mAP50-95']:.4f} / {trained['val_segm_mAP50']:.4f}, "
        f"untrained {untrained['val_segm_mAP50-95']:.4f} / {untrained['val_segm_mAP50']:.4f}"
    )
    # Untrained: ~1e-4 / ~1e-3. Measured trained runs of this setting: 0.0207 / 0.0881 and 0.0065 / 0.0305
    # (run to run variance is large at this budget); one with the default RoI sampling on 1 CPU: 0.035 / 0.075.
    assert trained["val_segm_mAP50-95"] >= untrained["val_segm_mAP50-95"] + 0.003, (trained, untrained)
    assert trained["val_segm_mAP50"] >= 5 * untrained["val_segm_mAP50"] + 0.01, (trained, untrained)
