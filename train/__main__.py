"""``python -m train`` — the training job, and registry commands.

    python -m train --config configs/pets.yaml [key=value ...]
    ray job submit --working-dir . -- python -m train --config configs/pets.yaml epochs=20
    python -m train rollback --model segloop-pets [--data-dir .segloop]
    python -m train champion --model segloop-pets

Errors a user can fix (bad config, missing dataset, too few CPUs/GPUs, unreachable MLflow)
print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from segloop.errors import SegloopError, cli_error


def _train(argv: list[str]) -> int:
    from segloop.config import load_config
    from train.config import TrainConfig
    from train.job import run

    p = argparse.ArgumentParser(prog="segloop train", description="Train a segmentation model with Ray Train.")
    p.add_argument("--config", help="YAML file with TrainConfig keys (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 lr=3e-4 num_workers=2")
    args = p.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = run(cfg)
    print(
        f"run {result.run_name} ({result.run_id}): model version {result.model_version}, "
        f"{'promoted' if result.promoted else 'not promoted'} — {result.reason}"
    )
    return 0


def _registry(cmd: str, argv: list[str]) -> int:
    from train import registry, tracking

    p = argparse.ArgumentParser(prog=f"segloop train {cmd}")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument(
        "--data-dir", default=".segloop", help="embedded MLflow store location (ignored with MLFLOW_TRACKING_URI)"
    )
    args = p.parse_args(argv)
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(args.data_dir))
    if cmd == "rollback":
        old, new = registry.rollback(args.model)
        print(f"{args.model}: champion moved back from version {old} to version {new}")
    else:
        print(registry.champion_version(args.model) or "no champion")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("rollback", "champion"):
            return _registry(argv[0], argv[1:])
        return _train(argv)
    except SegloopError as err:
        return cli_error(err)


if __name__ == "__main__":
    sys.exit(main())
