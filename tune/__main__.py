"""``python -m tune`` — a hyperparameter search over the training job.

    python -m tune --config configs/tune_pets.yaml [--num-samples 16] [--register-best] [key=value ...]
    ray job submit --working-dir . -- python -m tune --config configs/tune_pets.yaml --num-samples 16
    python -m tune --config configs/tune_pets.yaml name=pets-lr --resume   # continue an interrupted search

Overrides use the train CLI's ``key=value`` form; ``base.<field>=value`` changes the base
training config (``base.epochs=5``). Errors a user can fix (bad search space, unknown
hyperparameter, missing dataset, too few CPUs, unreachable MLflow) print one message and
exit with status 2 before any trial starts; an interrupted search exits with 130.
"""

from __future__ import annotations

import argparse
import sys

from segloop.errors import SegloopError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segloop tune", description="Search hyperparameters with Ray Tune (ASHA).")
    p.add_argument("--config", help="YAML file with SearchConfig keys (see configs/tune_pets.yaml)")
    p.add_argument("--num-samples", type=int, help="trials to sample (overrides num_samples)")
    p.add_argument("--max-concurrent-trials", type=int, help="overrides max_concurrent_trials")
    p.add_argument("--name", help="experiment name; an existing one is resumed")
    p.add_argument("--resume", action="store_true", help="continue the search `name` (error if there is none)")
    p.add_argument(
        "--register-best",
        action="store_true",
        help="register the best trial's model and run champion/challenger promotion",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grace_period=2 base.epochs=6")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.num_samples, "num_samples"), (args.max_concurrent_trials, "max_concurrent_trials")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.name is not None:
        overrides.append("name='" + args.name.replace("'", "''") + "'")  # YAML-quoted: always a string
    if args.resume:
        overrides.append("resume=true")
    if args.register_best:
        overrides.append("register_best=true")
    try:
        from tune.config import load_search_config
        from tune.search import run_search

        rs = load_search_config(args.config, overrides)
        if rs.search.resume and not rs.search.name:
            print("error: --resume needs the search's name (--name NAME)", file=sys.stderr)
            return 2
        result = run_search(rs)
    except SegloopError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.interrupted:
        return 130
    if result.model_version:
        print(
            f"model version {result.model_version}: {'promoted' if result.promoted else 'not promoted'} — {result.reason}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
