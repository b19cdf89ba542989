"""``segloop data synth ...`` (or ``python -m train.data``) writes a synthetic dataset; ``check`` reads one fully.

segloop data synth --task pets --out data/pets --n 200 --seed 0 [--size 128] [--shift]
segloop data synth --task coco --out data/shapes --format yolo
segloop data check --task semantic --root data/pets --split trainval
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from segloop.errors import SegloopError


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be >= {lo}, got {v}")
        return v

    return parse


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segloop data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic dataset (Oxford pets layout or COCO / YOLO-seg shapes)")
    s.add_argument(
        "--task", required=True, choices=("pets", "coco"), help="pets: semantic trimaps; coco: instance shapes"
    )
    s.add_argument(
        "--out", required=True, type=Path, help="output directory (created; must be empty or a previous synth output)"
    )
    s.add_argument("--n", type=_int_at_least(1, "--n"), default=200, help="number of images (default 200)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument(
        "--size", type=_int_at_least(32, "--size"), default=128, help="image side in pixels, >= 32 (default 128)"
    )
    s.add_argument("--shift", action="store_true", help="render in the shifted style (drift simulation)")
    s.add_argument(
        "--mix",
        choices=("random", "balanced", "production"),
        default="random",
        help="pets only: each image draws its texture family and breed (random), every combination in turn "
        "(balanced), or a redundant stream: 2 common combinations make 85%% of it, each scene sent 4 times as "
        "near-copies, the others rare (production)",
    )
    s.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="held-out fraction: test.txt for pets, val for coco (default 0.2)",
    )
    s.add_argument(
        "--format",
        choices=("coco", "yolo", "both"),
        default=None,
        help="coco task only: annotation format (default coco)",
    )
    c = sub.add_parser("check", help="read every item of a dataset split and report the first problem")
    c.add_argument("--task", required=True, choices=("semantic", "instance"))
    c.add_argument("--root", required=True, type=Path)
    c.add_argument("--split", required=True)
    return p


def _synth(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from train.data.synth import generate_coco, generate_pets, read_meta

    if args.task == "pets":
        if args.format is not None:
            parser.error("--format applies only to --task coco")
        out = generate_pets(
            args.out,
            n=args.n,
            seed=args.seed,
            size=args.size,
            shift=args.shift,
            test_fraction=args.val_fraction,
            mix=args.mix,
        )
        splits = {}
        for split in ("trainval", "test"):
            splits[split] = sum(
                1 for line in (out / "annotations" / f"{split}.txt").read_text().splitlines() if line.strip()
            )
        print(
            f"wrote {args.n} synthetic pets ({args.size}x{args.size}, {'shifted' if args.shift else 'default'} style, seed {args.seed}) to {out}"
        )
        print(f"  images:   {out / 'images'}/<name>.jpg")
        print(f"  trimaps:  {out / 'annotations' / 'trimaps'}/<name>.png (1=pet, 2=background, 3=border)")
        for split, k in splits.items():
            print(f"  {split + ':':9} {out / 'annotations' / (split + '.txt')} ({k} samples)")
    else:
        if args.mix != "random":
            parser.error("--mix applies only to --task pets")
        fmt = args.format or "coco"
        out = generate_coco(
            args.out,
            n=args.n,
            seed=args.seed,
            size=args.size,
            shift=args.shift,
            val_fraction=args.val_fraction,
            fmt=fmt,
        )
        counts = {s: sum(1 for v in read_meta(out)["samples"].values() if v["split"] == s) for s in ("train", "val")}
        print(
            f"wrote {args.n} synthetic shape images ({args.size}x{args.size}, {'shifted' if args.shift else 'default'} style, seed {args.seed}, format {fmt}) to {out}"
        )
        for split, k in counts.items():
            print(f"  {split}: {k} images in {out / 'images' / split}")
            if fmt != "yolo":
                print(f"         annotations {out / 'annotations' / f'instances_{split}.json'}")
            if fmt != "coco":
                print(f"         labels {out / 'labels' / split}")
        if fmt != "coco":
            print(f"  classes: {out / 'data.yaml'}")
    print(f"  seeds:    {out / 'synth.json'}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from train.data import build_dataset

    ds = build_dataset(args.task, args.root, args.split)
    for i in range(len(ds)):
        ds[i]
    print(f"ok: {ds!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            return _synth(args, parser)
        return _check(args)
    except SegloopError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
