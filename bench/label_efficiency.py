"""Label efficiency: entropy-ranked vs random selection of the samples sent to annotation.

    .venv/bin/python bench/label_efficiency.py [--k 32] [--reps 3] [--epochs 10] [--size 64]

The demo's setting: a model trained on default-style pets meets shifted-style traffic. From a
pool of shifted images, K are "annotated" (ground truth from the generator) and added to the
training data, either the K the current model is least sure of (mean normalised pixel entropy,
the serving code's formula) or K at random. Each choice retrains the same model from scratch
with the same seed and scores mIoU on a shifted held-out set never in the pool. Repeated with
different random draws / training seeds; prints a Markdown table with mean ± std.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_and_score(cfg, datasets, holdout, seed: int) -> tuple[object, float]:
    import torch
    from torch.utils.data import ConcatDataset

    from train.engine import evaluate_semantic, train_one_epoch
    from train.loop import build_optimizer, build_scheduler, make_loader, seed_everything, set_bn_momentum
    from train.losses import SegmentationLoss
    from train.models import build_model

    seed_everything(seed)
    model = build_model(cfg.model, 3)
    set_bn_momentum(model, 0.1)
    loader = make_loader(ConcatDataset(datasets), cfg, shuffle=True, task="semantic")
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, len(loader))
    crit = SegmentationLoss(cfg.ce_weight, cfg.dice_weight)
    cpu = torch.device("cpu")
    for _ in range(cfg.epochs):
        train_one_epoch(model, crit, opt, loader, cpu, task="semantic", scheduler=sched)
    metrics, _ = evaluate_semantic(
        model,
        make_loader(holdout, cfg, shuffle=False, task="semantic"),
        cpu,
        num_classes=3,
        class_names=("background", "pet", "border"),
    )
    return model, metrics["val_miou"]


def entropies(model, pool) -> list[float]:
    import torch

    from serve_app.postprocess import pixel_confidence_entropy

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(len(pool)):
            image, _ = pool[i]
            probs = model(image[None]).softmax(1)[0].numpy()
            out.append(pixel_confidence_entropy(probs)[1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=32, help="samples annotated")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=160, help="default-style training images")
    p.add_argument("--pool", type=int, default=160, help="shifted images (pool + held-out)")
    args = p.parse_args()

    import numpy as np
    import torch
    from torch.utils.data import Subset

    from bench.serve import machine_info
    from train.config import TrainConfig
    from train.data import build_dataset
    from train.data.synth import generate_pets
    from train.transforms import eval_transforms, train_transforms

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        base_root = generate_pets(Path(d) / "base", n=args.n, seed=0, size=args.size)
        shift_root = generate_pets(Path(d) / "shift", n=args.pool, seed=1, size=args.size, shift=True)
        cfg = TrainConfig(dataset=str(base_root), image_size=args.size, epochs=args.epochs, batch_size=8, lr=0.01)
        tt, et = train_transforms("semantic", args.size), eval_transforms("semantic", args.size)
        base = build_dataset("semantic", base_root, "trainval", tt)
        pool_train = build_dataset("semantic", shift_root, "trainval", tt)
        pool_eval = build_dataset("semantic", shift_root, "trainval", et)
        holdout = build_dataset("semantic", shift_root, "test", et)
        k = min(args.k, len(pool_train))

        v1, v1_score = train_and_score(cfg, [base], holdout, seed=0)
        ranked = np.argsort(entropies(v1, pool_eval))[::-1][:k].tolist()
        results: dict[str, list[float]] = {"entropy-ranked": [], "random": []}
        for rep in range(args.reps):
            rng = np.random.default_rng(100 + rep)
            picks = {"entropy-ranked": ranked, "random": rng.choice(len(pool_train), k, replace=False).tolist()}
            for name, idx in picks.items():
                _, score = train_and_score(cfg, [base, Subset(pool_train, idx)], holdout, seed=rep)
                results[name].append(score)

    m = machine_info()
    print(
        f"\n### Label efficiency — {k} annotated shifted samples, {args.reps} repetitions, "
        f"lraspp_mobilenet_v3_large {args.size}px, {args.epochs} epochs\n"
    )
    print(f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}\n")
    print("| selection | shifted held-out mIoU (mean ± std) | runs |")
    print("| --- | ---: | --- |")
    print(f"| none (v1, default-style data only) | {v1_score:.3f} | 1 |")
    for name, scores in results.items():
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(scores):.3f} ± {sd:.3f} | {', '.join(f'{s:.3f}' for s in scores)} |")
    ratio = statistics.fmean(results["entropy-ranked"]) / max(statistics.fmean(results["random"]), 1e-9)
    print(f"\nentropy-ranked / random: {ratio:.2f}x")


if __name__ == "__main__":
    main()
