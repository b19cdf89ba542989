"""``segloop queue [--store URL] list|export|push|pull|label-studio|simulate|import|prune`` (also
``python -m dataplane.annotation``; store from ``--store``, else ``SEGLOOP_STORE``, else ``./.segloop/store``).

``push``/``pull`` drive a Label Studio server (:mod:`.ls_project`; API key from LABEL_STUDIO_API_KEY);
``label-studio`` starts a local one (:mod:`.ls_server`).

Exit codes: 0 ok, 1 store failure, 2 bad input (flags, captures, annotations).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from dataplane.annotation.exporter import export
from dataplane.annotation.formats import FORMATS, read_json
from dataplane.annotation.importer import import_annotations
from dataplane.annotation.ls_project import LabelStudioTarget
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
    ls_args = argparse.ArgumentParser(add_help=False)
    ls_args.add_argument(
        "--label-studio",
        metavar="URL",
        default=os.environ.get("LABEL_STUDIO_URL", "http://127.0.0.1:8080"),
        help="the Label Studio server (default $LABEL_STUDIO_URL or http://127.0.0.1:8080); "
        "API key from $LABEL_STUDIO_API_KEY",
    )
    ls_args.add_argument("--project", default="segloop annotation queue", help="the Label Studio project's title")
    p = sub.add_parser(
        "push",
        parents=[common, filters, ls_args],
        help="send a batch chosen by a selection strategy to a Label Studio project, predictions as pre-annotations",
    )
    _selection_args(p)
    p.add_argument(
        "--storage-endpoint",
        metavar="URL",
        help="the S3 endpoint as Label Studio and annotators' browsers reach it (default: the store's)",
    )
    p.add_argument(
        "--document-root",
        default="/",
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for a local store (default /)",
    )
    p = sub.add_parser(
        "pull",
        parents=[common, ls_args],
        help="finished Label Studio annotations -> a new dataset version (all or nothing)",
    )
    p.add_argument("dataset")
    p.add_argument("--split", help="default: trainval (semantic) / train (instance)")
    p = sub.add_parser(
        "label-studio",
        help="run a local Label Studio on 127.0.0.1 (from .venv-labelstudio) until Ctrl-C",
    )
    p.add_argument("--data-dir", default=".segloop/label-studio", help="its SQLite database, media and credentials")
    p.add_argument("--port", type=int, default=8080)
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


def _rescorer(
    args: argparse.Namespace, store: ObjectStore, rescorer_factory: Optional[RescorerFactory]
) -> Optional[Rescorer]:
    if not args.rescore:
        return None
    if rescorer_factory is None:
        raise ConfigError(f"--rescore needs the model code: run it as `segloop queue {args.cmd} ... --rescore URI`")
    return rescorer_factory(args.rescore, store)


def _cmd_export(store: ObjectStore, args: argparse.Namespace, rescorer_factory: Optional[RescorerFactory]) -> None:
    spec = _selection(args)
    rescore = _rescorer(args, store, rescorer_factory)
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


def _target(args: argparse.Namespace) -> LabelStudioTarget:
    return LabelStudioTarget(
        args.label_studio,
        args.project,
        storage_endpoint=getattr(args, "storage_endpoint", None),
        document_root=getattr(args, "document_root", "/"),
    )


def _cmd_push(store: ObjectStore, args: argparse.Namespace, rescorer_factory: Optional[RescorerFactory]) -> None:
    from dataplane.annotation.exporter import select_batch
    from dataplane.annotation.ls_project import find_project, project_tasks, push

    spec = _selection(args)
    target = _target(args)
    ls = target.client()
    project = find_project(ls, target.project)
    present = (
        {str((t.get("data") or {}).get("capture_id")) for t in project_tasks(ls, project.id)} if project else set()
    )
    rescore = _rescorer(args, store, rescorer_factory)
    chosen = select_batch(
        store,
        spec,
        args.task,
        args.since,
        args.until,
        args.model_version,
        exclude=_exclude(store, args.exclude_dataset),
        rescore=rescore,
        skip=frozenset(present),
    )
    scores = {r.id: p.uncertainty for r, p in zip(chosen.records, chosen.picks)}
    res = push(store, target, chosen.records, scores, ls=ls)
    for prob in chosen.problems + res.problems:
        print(f"warning: left out: {prob}", file=sys.stderr)
    print(
        f"pushed {len(res.added)} task(s) chosen by {spec.strategy} ({spec.score}) to Label Studio project "
        f"{res.project_id} ({len(present)} it already had were not candidates): {res.project_url}"
    )


def _cmd_pull(store: ObjectStore, args: argparse.Namespace) -> None:
    from dataplane.annotation.ls_project import pull

    manifest, status = pull(store, _target(args), args.dataset, split=args.split)
    if manifest is None:
        print(
            f"nothing new to pull from Label Studio project {status.project_id}: no finished annotation that "
            f"{args.dataset} does not hold ({status.waiting} task(s) unfinished or skipped)"
        )
        return
    added = manifest.notes.get("import", {}).get("captures", [])
    print(
        f"{manifest.ref}  parent={manifest.parent}  +{len(added)} sample(s) from Label Studio project "
        f"{status.project_id}; {status.waiting} task(s) unfinished or skipped stay there"
    )


def _cmd_label_studio(args: argparse.Namespace) -> int:
    import signal

    from dataplane.annotation.ls_server import start_label_studio

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `kill` stops the server too, as Ctrl-C does

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    server = start_label_studio(args.data_dir, port=args.port)
    print(
        f"Label Studio: {server.url}  (log in as {server.username}; the password and API key are in "
        f"{server.data_dir / 'credentials.json'}, or set LABEL_STUDIO_PASSWORD / LABEL_STUDIO_API_KEY)"
    )
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


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
    "pull": _cmd_pull,
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
    if args.cmd == "label-studio":
        return _cmd_label_studio(args)
    if args.cmd in ("export", "push"):
        cmd = _cmd_export if args.cmd == "export" else _cmd_push
        return run_store_command(getattr(args, "store", None), lambda store: cmd(store, args, rescorer_factory))
    return run_store_command(getattr(args, "store", None), lambda store: COMMANDS[args.cmd](store, args))


if __name__ == "__main__":
    raise SystemExit(main())
