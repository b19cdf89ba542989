"""``segloop queue [--store URL] list|export|simulate|import|prune`` (also ``python -m dataplane.annotation``;
store from ``--store``, else ``SEGLOOP_STORE``, else ``./.segloop/store``).

Exit codes: 0 ok, 1 store failure, 2 bad input (flags, captures, annotations).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from dataplane.annotation.exporter import export
from dataplane.annotation.formats import FORMATS, read_json
from dataplane.annotation.importer import import_annotations
from dataplane.annotation.records import get_capture, iso, list_captures
from dataplane.annotation.selection import SCORE_KEYS, STRATEGIES, Rescorer, SelectionSpec
from dataplane.annotation.simulate import simulate_annotation, truth_from_dataset
from dataplane.store import ObjectStore
from segloop.errors import ConfigError

if TYPE_CHECKING:
    from dataplane.versions import Manifest

RescorerFactory = Callable[[str, ObjectStore], Rescorer]


def _shared_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``(--store, the capture filters)``, as parents of the subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="store URL: a local directory or s3://BUCKET (endpoint from SEGLOOP_S3_ENDPOINT); "
        "default $SEGLOOP_STORE or ./.segloop/store",
    )
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", help="captured at or after (date or ISO time, UTC)")
    filters.add_argument("--until", help="captured before (a bare date includes that day)")
    filters.add_argument("--model-version", help="only captures predicted by this model version")
    filters.add_argument("--task", choices=("semantic", "instance"))
    filters.add_argument(
        "--exclude-dataset",
        metavar="NAME[@VERSION]",
        help="leave out captures already annotated into this dataset (default version: latest); export treats "
        "what it holds as labelled (kcenter/badge keep away from it)",
    )
    return common, filters


def build_parser() -> argparse.ArgumentParser:
    common, filters = _shared_parsers()
    parser = argparse.ArgumentParser(
        prog="segloop queue",
        parents=[common],
        description="Captured samples -> annotation -> new dataset versions.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("list", parents=[common, filters], help="captured samples, most uncertain first")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "export",
        parents=[common, filters],
        help="a batch chosen by a selection strategy, with pre-annotations (Label Studio, COCO, trimaps)",
    )
    _selection_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--image-url-prefix", default="images/", help="prefix of data.image in the Label Studio tasks")
    p = sub.add_parser(
        "simulate", parents=[common], help="write ground-truth annotations for an export (demo annotator)"
    )
    p.add_argument("export_dir")
    p.add_argument("--truth-root", required=True, help="the generated dataset root the served images came from")
    p.add_argument("--out", help="default: EXPORT_DIR/annotated")
    p = sub.add_parser(
        "import", parents=[common], help="validate corrected annotations and create a new dataset version"
    )
    p.add_argument("dataset")
    p.add_argument("annotations", help="Label Studio JSON export, COCO JSON, or a directory of <id>.png trimaps")
    p.add_argument("--parent", default="latest", help="parent version (id prefix or 'latest'); must be the head")
    p.add_argument("--branch", action="store_true", help="a side version off a parent that is not the head")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--split", help="default: trainval (semantic) / train (instance)")
    p.add_argument("--replace", action="store_true", help="allow re-annotating samples already in the parent")
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser(
        "prune", parents=[common], help="delete old captures that no export or dataset version uses (retention)"
    )
    p.add_argument("--older-than-days", type=float, required=True, help="keep every capture newer than this")
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    return parser


def _selection_args(p: argparse.ArgumentParser) -> None:
    d = SelectionSpec()
    p.add_argument("--budget", type=int, help="how many captures to send to annotators")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help=f"how to choose them (default {d.strategy}; see `dataplane/annotation/selection.py`)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random, power and badge draw with this seed")
    p.add_argument("--beta", type=float, default=d.beta, help="power: P ∝ uncertainty^beta")
    p.add_argument("--score", choices=SCORE_KEYS, default=None, help=f"the uncertainty used (default {d.score})")
    p.add_argument(
        "--dedupe-cosine",
        type=float,
        default=d.dedupe_cosine,
        help="drop candidates this close to a more uncertain one",
    )
    p.add_argument(
        "--rescore",
        metavar="MODEL_URI",
        help="re-score every capture with this model first (e.g. models:/NAME@champion)",
    )
    p.add_argument(
        "--top", type=int, help="the N most uncertain by recorded entropy (= --strategy top --score entropy --budget N)"
    )


def _selection(args: argparse.Namespace) -> SelectionSpec:
    if args.top is not None and (args.budget is not None or args.strategy not in (None, "top")):
        raise ConfigError("--top N is --strategy top --budget N; give either --top or --budget/--strategy")
    if args.top is None and args.budget is None:
        raise ConfigError("export needs --budget N (how many captures to send to annotators), or --top N")
    top = args.top is not None
    if top and args.top < 1:
        raise ConfigError(f"--top must be a positive integer, got {args.top}")
    spec = SelectionSpec(
        strategy="top" if top else (args.strategy or SelectionSpec.strategy),
        budget=args.top if top else args.budget,
        seed=args.seed,
        beta=args.beta,
        score=args.score or ("entropy" if top else SelectionSpec.score),
        dedupe_cosine=args.dedupe_cosine,
    )
    spec.check()
    return spec


def _exclude(store: ObjectStore, spec: Optional[str]) -> Optional[Manifest]:
    if not spec:
        return None
    from dataplane.versions import get_version

    name, _, version = spec.partition("@")
    return get_version(store, name, version or "latest")


def _cmd_list(store: ObjectStore, args: argparse.Namespace) -> None:
    recs = list_captures(
        store,
        args.since,
        args.until,
        args.model_version,
        task=args.task,
        exclude=_exclude(store, args.exclude_dataset),
        limit=args.limit,
    )
    if args.json:
        print(json.dumps([r.summary() for r in recs], indent=1))
        return
    for r in recs:
        ent = f"{r.entropy:.4f}" if r.entropy is not None else "-"
        conf = f"{r.confidence:.4f}" if r.confidence is not None else "-"
        print(
            f"{r.id}  {iso(r.time)}  entropy={ent}  confidence={conf}  "
            f"model={r.model_name}@{r.model_version}  task={r.task}  {r.width}x{r.height}"
        )
    print(f"{len(recs)} capture(s) in {store.describe()}", file=sys.stderr)


def _cmd_export(store: ObjectStore, args: argparse.Namespace, rescorer_factory: Optional[RescorerFactory]) -> None:
    spec = _selection(args)
    rescore = None
    if args.rescore:
        if rescorer_factory is None:
            raise ConfigError("--rescore needs the model code: run it as `segloop queue export ... --rescore URI`")
        rescore = rescorer_factory(args.rescore, store)
    res = export(
        store,
        args.out,
        task=args.task,
        since=args.since,
        until=args.until,
        model_version=args.model_version,
        exclude=_exclude(store, args.exclude_dataset),
        image_url_prefix=args.image_url_prefix,
        selection=spec,
        rescore=rescore,
    )
    for prob in res.problems:
        print(f"warning: left out: {prob}", file=sys.stderr)
    print(
        f"exported {len(res.records)} {res.task} sample(s) chosen by {spec.strategy} ({spec.score}"
        + (f", re-scored with {rescore.name}" if rescore is not None else "")
        + f") to {res.out_dir}: {res.label_studio.name}, {res.coco.name}"
        + (", trimaps/" if res.trimaps else "")
    )


def _cmd_simulate(store: ObjectStore, args: argparse.Namespace) -> None:
    exp = Path(args.export_dir)
    info = read_json(exp / "export.json")
    recs = [get_capture(store, c["id"]) for c in info.get("captures", [])]
    path = simulate_annotation(store, recs, truth_from_dataset(args.truth_root), args.out or exp / "annotated")
    print(path)


def _cmd_import(store: ObjectStore, args: argparse.Namespace) -> None:
    from dataplane.versions import parse_notes

    m = import_annotations(
        store,
        args.dataset,
        args.parent,
        args.annotations,
        fmt=args.format,
        split=args.split,
        replace=args.replace,
        branch=args.branch,
        notes=parse_notes(args.note),
    )
    added = m.notes.get("import", {}).get("captures", [])
    print(f"{m.ref}  parent={m.parent}  +{len(added)} sample(s)  files={len(m.files)}")


def _cmd_prune(store: ObjectStore, args: argparse.Namespace) -> None:
    from dataplane.retention import prune_captures

    r = prune_captures(store, args.older_than_days, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {len(r.deleted)} capture(s) ({r.objects_deleted} objects); kept {r.kept_in_use} in use "
        f"(exported or in a dataset version) and {r.kept_recent} newer than {args.older_than_days:g} days"
    )


COMMANDS: dict[str, Callable[[ObjectStore, argparse.Namespace], None]] = {
    "list": _cmd_list,
    "simulate": _cmd_simulate,
    "import": _cmd_import,
    "prune": _cmd_prune,
}


def main(argv: Optional[Sequence[str]] = None, rescorer_factory: Optional[RescorerFactory] = None) -> int:
    """CLI entry point. Exit codes: 0 ok, 1 store failure, 2 bad input.

    ``rescorer_factory(model_uri, store) -> Rescorer`` enables ``export --rescore``
    (``segloop queue`` passes :class:`train.rescore.ModelRescorer`).
    """
    from dataplane.store import run_store_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.cmd == "export":
        return run_store_command(getattr(args, "store", None), lambda store: _cmd_export(store, args, rescorer_factory))
    return run_store_command(getattr(args, "store", None), lambda store: COMMANDS[args.cmd](store, args))


if __name__ == "__main__":
    raise SystemExit(main())
