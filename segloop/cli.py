"""``segloop`` — one command for every step of the loop.

    segloop demo                 the whole loop on this machine (what `make demo` runs)
    segloop data synth|check     generate or check a dataset (Oxford-IIIT Pet / COCO layouts)
    segloop train --config configs/pets.yaml [key=value ...]     (also: train rollback|champion)
    segloop tune --config configs/tune_pets.yaml [--num-samples N]
    segloop serve deploy|switch|status
    segloop monitor start|status|stop --config configs/monitor.yaml
    segloop queue list|export|push|pull|label-studio|import|simulate
    segloop versions list|show|create|diff|materialize|verify

Each subcommand has ``--help``. Exit codes are the same everywhere: 0 ok, 1 a service (object
store, MLflow, Ray) failed, 2 bad input (flag, config, dataset, annotation), 130 Ctrl-C.
``python -m train`` / ``python -m tune`` stay for ``ray job submit`` on a cluster whose
``python`` has segloop installed but no ``segloop`` script on its PATH.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from segloop.errors import SegloopError, cli_error, exit_code


@dataclass(frozen=True)
class Command:
    module: str  # a module with ``main(argv) -> int``
    help: str


COMMANDS: dict[str, Command] = {
    "demo": Command("segloop.demo", "run the whole loop locally: data, train, serve, drift, capture, retrain, promote"),
    "data": Command("train.data.__main__", "generate a synthetic dataset or check one (Oxford-IIIT Pet, COCO)"),
    "train": Command("train.__main__", "train with Ray Train, track in MLflow, promote; rollback, champion"),
    "tune": Command("tune.__main__", "search hyperparameters with Ray Tune (ASHA)"),
    "serve": Command("monitoring.serving", "deploy the Serve app, switch its model, show what it serves"),
    "monitor": Command("monitoring.actor", "start, inspect or stop the monitoring actor"),
    "queue": Command(
        "segloop.queue",
        "the annotation queue: list, export (selection strategies), push|pull (Label Studio), import, simulate",
    ),
    "versions": Command("dataplane.versions", "immutable dataset versions: list, show, create, diff, materialize"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segloop",
        description="Keep an image-segmentation model good in production, on Ray.",
        epilog="`segloop COMMAND --help` for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints help, or the usage error (exit 2), and exits
        return 2
    command = COMMANDS[argv[0]]
    try:
        return int(importlib.import_module(command.module).main(argv[1:]) or 0)
    except SegloopError as err:
        return cli_error(err)
    except KeyboardInterrupt as err:
        print("interrupted", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
