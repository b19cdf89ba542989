"""Training throughput: the Ray Train loop (1 and 2 workers) against a plain PyTorch loop.

    .venv/bin/python bench/train_throughput.py [--epochs 4] [--n 128] [--size 128] [--batch-size 8]
        [--model lraspp_mobilenet_v3_large] [--gpu] [--amp] [--two-node]

All run the same model, data, batch size and ``train.engine.train_one_epoch``; each reports
images/s of the training epochs after the first (warm-up), measured around
``train_one_epoch`` only. The Ray runs also report what rank 0 spent per epoch in
``ray.train.report`` saving and uploading its checkpoint: to local disk, or with
``--two-node`` to S3, from workers on a simulated second node that shares no disk with the
driver and downloads the dataset version itself (``segloop.simcluster``; root).
The machine's cores are split evenly: the plain loop and the 1-worker run get all of them
(torch threads), the 2-worker run one share per worker. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> str:
    from bench.serve import machine_info  # one description of the machine for every benchmark

    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}, torch {m['torch']}, load {m['load_1min']}"


def plain_loop(cfg, root: Path, threads: int) -> float:
    """The baseline: one process, no Ray, the same functions the Ray workers call."""
    import torch

    from train.engine import needs_grad_scaler, train_one_epoch
    from train.loop import build_datasets, build_optimizer, build_scheduler, make_loader, seed_everything
    from train.losses import SegmentationLoss
    from train.models import build_model

    torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu is True and torch.cuda.is_available() else "cpu")
    train_ds, _, info = build_datasets(cfg, root)
    model = build_model(cfg.model, info.num_classes).to(device)
    loader = make_loader(train_ds, cfg, shuffle=True, task=cfg.task)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, len(loader))
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, cfg.amp) else None
    crit = SegmentationLoss(cfg.ce_weight, cfg.dice_weight)
    rates = []
    for _ in range(cfg.epochs):
        r = train_one_epoch(
            model,
            crit,
            opt,
            loader,
            device,
            task=cfg.task,
            scheduler=sched,
            scaler=scaler,
            amp=cfg.amp and device.type == "cuda",
        )
        rates.append(r["images"] / r["seconds"])
    return statistics.mean(rates[1:])


def ray_loop(cfg, source: dict, workers: int, cpus_per_worker: float, storage=None) -> tuple[float, float]:
    """``train.loop.train_loop_per_worker`` under TorchTrainer, without MLflow.

    Returns (images/s of the epochs after the first, mean seconds per epoch that rank 0 spent in
    ``ray.train.report`` saving and uploading its checkpoint). ``storage``: a ``train.run.RunStorage``
    (default: a temporary local directory).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train.loop import load_checkpoint_state, train_loop_per_worker
    from train.run import RunStorage

    c = cfg.model_copy(update={"num_workers": workers, "cpus_per_worker": cpus_per_worker})
    loop_config = c.model_dump(mode="json") | {
        "dataset_source": source,
        "mlflow_run_id": None,
        "mlflow_tracking_uri": None,
        "num_classes": 3,
        "class_names": ["background", "pet", "border"],
    }
    with tempfile.TemporaryDirectory() as local:
        storage = storage or RunStorage(local)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=cfg.use_gpu is True, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=RunConfig(
                name=f"bench-{workers}-{os.getpid()}", storage_path=storage.path, storage_filesystem=storage.filesystem
            ),
        )
        result = trainer.fit()
        history = load_checkpoint_state(result.checkpoint)["history"]
    report_s = [h["report_s"] for h in history if "report_s" in h]
    return statistics.mean(h["images_per_s"] for h in history[1:]), statistics.mean(report_s)


def two_node_loop(cfg, root: Path, cores: int) -> tuple[float, float]:
    """2 workers on the simulated cluster's isolated node: the dataset as a version they download
    from S3, checkpoints to S3 (segloop.simcluster: a num_cpus=0 head, a node that shares no disk)."""
    from dataplane.versions import create_version
    from segloop import simcluster
    from segloop.settings import data_store, node_cache_dir, store_config_dict
    from train.run import run_storage

    base = Path(tempfile.mkdtemp(prefix="segloop-bench-", dir="/tmp"))
    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sim = simcluster.start(base, simcluster.MotoS3(), "segloop-bench", hidden=[root.parent, cache], cpus=cores)
    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in sim.env.items() if k.startswith(("SEGLOOP_", "MLFLOW_"))})
        version = create_version(data_store(), "pets", root, "semantic").version
        source = {"name": "pets", "version": version, "store": store_config_dict()}
        return ray_loop(cfg, source, 2, cores / 2, storage=run_storage(base))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        simcluster.stop(sim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n", type=int, default=128, help="synthetic images")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", default="lraspp_mobilenet_v3_large")
    p.add_argument("--gpu", action="store_true", help="train on GPU (plain loop and Ray workers)")
    p.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    p.add_argument(
        "--two-node",
        action="store_true",
        help="also on a simulated two-node cluster (root): workers on a node without the driver's files, "
        "the dataset version and checkpoints through an S3 server",
    )
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported: a driver joining a cluster sends it
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is warm-up)")

    import ray

    from train.config import TrainConfig
    from train.data.synth import generate_pets

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        root = generate_pets(Path(d) / "pets", n=args.n, seed=0, size=args.size)
        cfg = TrainConfig(
            dataset=str(root),
            model=args.model,
            image_size=args.size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            patience=0,
            use_gpu=bool(args.gpu),
            amp=args.amp,
        )
        plain = plain_loop(cfg, root, threads=cores)
        local = {"name": "pets", "path": str(root)}
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        one, one_ckpt = ray_loop(cfg, local, 1, float(cores))
        two, two_ckpt = (None, None)
        if not args.gpu or ray.cluster_resources().get("GPU", 0) >= 2:
            two, two_ckpt = ray_loop(cfg, local, 2, cores / 2)
        ray.shutdown()
        remote = two_node_loop(cfg, root, cores) if args.two_node else None

    print(
        f"\n### Training throughput — {args.model}, {args.size}px, batch {args.batch_size}, "
        f"{'GPU' if args.gpu else 'CPU'}{' AMP' if args.amp else ''}\n"
    )
    print(f"Machine: {machine()}\n")
    print("| system | images/s | ratio vs plain loop | checkpoint s/epoch |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| plain PyTorch loop (baseline, {cores} threads) | {plain:.1f} | 1.00 | - |")
    print(f"| Ray Train, 1 worker, checkpoints on local disk | {one:.1f} | {one / plain:.2f} | {one_ckpt:.3f} |")
    if two is not None:
        print(f"| Ray Train, 2 workers (DDP), local disk | {two:.1f} | {two / plain:.2f} | {two_ckpt:.3f} |")
    if remote is not None:
        rate, ckpt = remote
        print(
            f"| Ray Train, 2 workers on the isolated node, data and checkpoints via S3 | {rate:.1f} | "
            f"{rate / plain:.2f} | {ckpt:.3f} |"
        )
    print(f"\nTarget: 1-worker Ray >= 0.9x plain -> {'met' if one / plain >= 0.9 else 'NOT met'} ({one / plain:.2f}x)")


if __name__ == "__main__":
    main()
