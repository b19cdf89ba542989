"""The search driver: Ray Tune over Ray Train with ASHA, MLflow parent/child runs, a summary.

Ray 2.60 (Train V2) pattern: every Tune trial runs :func:`trial_driver`, a small function
that builds a ``TorchTrainer`` with ``train.run.make_trainer`` — the same trainer, around the
same ``train.loop.train_loop_per_worker``, that ``python -m train`` uses — and forwards each epoch's report to Tune with a
``TuneReportCallback``. The trial itself reserves no CPU (it only waits on its Train run,
on the head node); the Train workers hold the real resources and ``max_concurrent_trials``
keeps the number of Train runs to what the cluster fits. ``ASHAScheduler`` reads ``epochs_done`` and the
validation metric; a trial it stops is killed with its Train run.

MLflow: one parent run per search (tag ``segloop.search``), one child run per trial
(tag ``mlflow.parentRunId``), created in the trial and handed to the training loop like
``train.job`` does, so rank 0 logs per-epoch metrics into it. The parent gets the best
config (params ``best.<k>``), the best score and the summary table (Markdown + CSV).

Preflight is ``train.run.prepare`` on the base config (dataset, classes, MLflow, resources),
done once in the driver; its :class:`~train.run.RunContext` travels to every trial.

Resume: the Tune experiment lives in ``<data_dir>/tune_results/<name>``; running the same
``name`` again restores it (``Tuner.restore``), and a restarted trial's Train run continues
from its last checkpoint because its Train run name is derived from the trial id.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from segloop.errors import ConfigError
from train.config import TrainConfig
from train.run import RunContext, RunStorage
from tune.config import ResolvedSearch, in_space, space_summary, to_tune_space

SEARCH_TAG = "segloop.search"
TRIAL_TAG = "segloop.trial_id"
PARENT_TAG = "mlflow.parentRunId"
EPOCHS_DONE = "epochs_done"
FINGERPRINT_FILE = "segloop_search.json"


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SearchContext:
    """What every trial (and the driver's callbacks) needs: travels to the trials with the trainable."""

    name: str
    base: dict[str, Any]  # the base TrainConfig as JSON
    run: RunContext  # preflight of the base config: dataset, classes, MLflow, use_gpu
    parent_run_id: str
    metric: str
    mode: str
    train_storage: RunStorage  # where the trials' Train runs keep checkpoints


@dataclass
class TrialRow:
    """One line of the summary table."""

    trial_id: str
    params: dict[str, Any]
    final: float | None
    best: float | None
    epochs: int
    status: str  # completed | asha | patience | error | interrupted | pending
    run_id: str | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.status in ("asha", "patience")


@dataclass
class SearchResult:
    name: str
    experiment_path: str
    parent_run_id: str
    metric: str
    mode: str
    max_t: int
    num_samples: int
    rows: list[TrialRow]
    best: TrialRow | None
    interrupted: bool
    table: str = ""
    model_version: str | None = None
    promoted: bool | None = None
    reason: str = ""

    @property
    def trial_epochs(self) -> int:
        return sum(r.epochs for r in self.rows)

    @property
    def budget(self) -> int:
        """Trial-epochs had every trial run to max_t."""
        return self.num_samples * self.max_t

    @property
    def saved_pct(self) -> float:
        return 100.0 * (self.budget - self.trial_epochs) / self.budget if self.budget else 0.0


# ----------------------------------------------------------------------------- small decisions
def search_name(rs: ResolvedSearch) -> str:
    return rs.search.name or f"tune-{rs.base.dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def experiment_path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir).resolve() / "tune_results" / name


# base keys that only matter after the search (--register-best) and may change on resume
_AFTER_SEARCH = ("promote", "promotion_margin", "registered_model")


def fingerprint(rs: ResolvedSearch) -> dict[str, Any]:
    """What must not change between a search and its resumption."""
    s = rs.search
    return {
        "base": {k: v for k, v in rs.base.model_dump(mode="json").items() if k not in _AFTER_SEARCH},
        "space": {k: v.model_dump(exclude_none=True) for k, v in s.space.items()},
        "num_samples": s.num_samples,
        "metric": rs.metric,
        "mode": s.mode,
        "max_t": rs.max_t,
        "grace_period": s.grace_period,
        "reduction_factor": s.reduction_factor,
        "seed": s.seed,
    }


def resume_decision(path: Path, resume: bool, current: dict[str, Any] | None = None) -> Literal["fresh", "restore"]:
    """``restore`` when ``path`` holds a restorable Tune experiment, else ``fresh``.

    ``resume=True`` insists on an existing experiment; a stored fingerprint that differs
    from ``current`` (another space, base config, sample count...) is an error, since
    Tune cannot change a search space on restore.
    """
    from ray.tune import Tuner

    restorable = path.is_dir() and Tuner.can_restore(path)
    if not restorable:
        if resume:
            raise ConfigError(f"nothing to resume: no Tune experiment at {path} (check `name` and `data_dir`)")
        return "fresh"
    stored_file = path / FINGERPRINT_FILE
    if current is not None and stored_file.is_file():
        stored = json.loads(stored_file.read_text())
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if diff:
            raise ConfigError(
                f"search {path.name!r} exists at {path} with a different config ({', '.join(diff)} changed); "
                "resume it with the original config or pick a new `name`"
            )
    return "restore"


HEAD_RESOURCE = "node:__internal_head__"


def trial_resources(resources: dict[str, float]) -> dict[str, float]:
    """What one Tune trial (a Train driver) reserves.

    It only waits on its Train run, so it takes no CPU: a sliver of the head node's
    resource puts it on the head node, the "safe node" Ray's docs recommend for Train
    drivers (not a preemptible worker). Without that resource, Tune's default 1 CPU.
    """
    return {HEAD_RESOURCE: 0.001} if resources.get(HEAD_RESOURCE) else {"CPU": 1}


def max_concurrency(rs: ResolvedSearch, resources: dict[str, float], use_gpu: bool) -> int:
    """Trials that fit the cluster at once (each Train run holds all its workers' resources)."""
    base = rs.base
    per_trial = base.num_workers * base.cpus_per_worker + trial_resources(resources).get("CPU", 0)
    fits = int(resources.get("CPU", 0) // per_trial)
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // base.num_workers))
    fits = max(1, fits)
    wanted = rs.search.max_concurrent_trials or rs.search.num_samples
    return max(1, min(wanted, fits, rs.search.num_samples))


# ----------------------------------------------------------------------------- inside a trial
def _report_callback():
    """TuneReportCallback plus ``epochs_done`` (ASHA's clock; survives trial restarts)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # type: ignore[override]
            metrics = [dict(m, **{EPOCHS_DONE: int(m.get("epoch", -1)) + 1}) for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return _ReportToTune()


def _find_child(client: Any, ctx: SearchContext, trial_id: str) -> Any:
    found = client.search_runs(
        [ctx.run.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{ctx.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return found[0] if found else None


def _child_run(client: Any, ctx: SearchContext, trial_id: str, params: dict[str, Any]) -> str:
    """The trial's MLflow child run: found again on resume, else created under the parent."""
    found = _find_child(client, ctx, trial_id)
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        ctx.run.experiment_id,
        run_name=f"{ctx.name}-{trial_id}",
        tags={
            PARENT_TAG: ctx.parent_run_id,
            TRIAL_TAG: trial_id,
            SEARCH_TAG: ctx.name,
            "segloop.sampled": json.dumps(params, sort_keys=True),
        },
    )
    return run.info.run_id


def trial_driver(config: dict[str, Any], ctx: SearchContext) -> None:
    """One Tune trial: a Ray Train run of the normal training loop with the sampled params."""
    import mlflow
    import ray.tune

    from train.run import fit, make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = TrainConfig.model_validate({**ctx.base, **config})
    client = mlflow.MlflowClient(ctx.run.tracking_uri)
    run_id = _child_run(client, ctx, trial_id, config)
    if not client.get_run(run_id).data.params:
        _log_params(client, run_id, ctx.run.run_params(cfg))
    trainer = make_trainer(
        cfg,
        ctx.run,
        run_id=run_id,
        # Same (storage, name) on a trial restart -> Train resumes from its checkpoint.
        name=f"{ctx.name}-{trial_id}",
        storage=ctx.train_storage,
        # keep the checkpoints that are best by the *search* metric: --register-best takes one
        metric=ctx.metric,
        mode=ctx.mode,
        callbacks=[_report_callback()],
    )
    fit(trainer)
    # Errors and scheduler stops are recorded by the driver (_CloseChildRuns): a stopped
    # trial is killed mid-fit and cannot end its own run.
    client.set_terminated(run_id, "FINISHED")


def _closer_callback(ctx: SearchContext, max_t: int):
    """Driver-side Tune callback: end the child runs of trials the scheduler stopped.

    A trial stopped by ASHA (or at max_t) is killed with its Train run, so it cannot end
    its own MLflow run; the driver does, from the trial's last result.
    """
    from ray.tune import Callback

    class _CloseChildRuns(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _close_child(ctx, trial.trial_id, trial.last_result or {}, max_t, errored=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _close_child(ctx, trial.trial_id, trial.last_result or {}, max_t, errored=True)

    return _CloseChildRuns()


def trial_status(last: dict[str, Any], max_t: int, errored: bool) -> str:
    """completed | asha | patience | error | interrupted | pending, from a trial's last result."""
    if errored:
        return "error"
    if not last:
        return "pending"
    if int(last.get(EPOCHS_DONE, 0)) >= max_t:
        return "completed"
    if last.get("early_stopped"):
        return "patience"
    return "asha" if last.get("done") else "interrupted"


def _close_child(ctx: SearchContext, trial_id: str, last: dict[str, Any], max_t: int, errored: bool) -> None:
    import mlflow

    client = mlflow.MlflowClient(ctx.run.tracking_uri)
    run = _find_child(client, ctx, trial_id)
    if run is None:
        return
    status = trial_status(last, max_t, errored)
    tags = {
        "segloop.trial_status": status,
        "segloop.epochs_run": str(int(last.get(EPOCHS_DONE, 0))),
        "segloop.stopped_early": str(status in ("asha", "patience")).lower(),
    }
    for k, v in tags.items():
        if run.data.tags.get(k) != v:
            client.set_tag(run.info.run_id, k, v)
    final = {
        "asha": "KILLED",
        "interrupted": "KILLED",
        "error": "FAILED",
        "completed": "FINISHED",
        "patience": "FINISHED",
    }.get(status)
    if final and run.info.status != final:  # the driver has the last word: a killed trial's run may say RUNNING
        client.set_terminated(run.info.run_id, final)


# ----------------------------------------------------------------------------- summary
def collect_rows(
    grid: Any, rs: ResolvedSearch, runs_by_trial: dict[str, str], storage: RunStorage | None = None
) -> list[TrialRow]:
    """Summary rows from Tune's ResultGrid (history per trial: best score, checkpoints still on
    ``storage``, the trials' Train storage: a local directory or S3)."""
    sign = 1 if rs.search.mode == "max" else -1
    rows = []
    for res in grid:
        last = dict(res.metrics or {})
        trial_id = str(last.get("trial_id") or Path(res.path).name)
        df = res.metrics_dataframe
        best = best_ckpt = last_ckpt = None
        if df is not None and rs.metric in df.columns and len(df):
            best, best_ckpt, last_ckpt = _best_of_history(df, rs.metric, sign, storage.exists if storage else None)
        final = last.get(rs.metric)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                params={k: res.config.get(k) for k in rs.search.space},
                final=float(final) if isinstance(final, (int, float)) else None,
                best=best,
                epochs=int(last.get(EPOCHS_DONE, 0)),
                status=trial_status(last, rs.max_t, errored=res.error is not None),
                run_id=runs_by_trial.get(trial_id),
                best_checkpoint=best_ckpt,
                last_checkpoint=last_ckpt,
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def _best_of_history(
    df: Any, metric: str, sign: int, exists: Any = None
) -> tuple[float | None, str | None, str | None]:
    """(best score, its checkpoint, last checkpoint) of one trial's per-epoch results.

    The checkpoint is the best among those Train kept (``checkpoints_to_keep``), latest on
    ties, as ``train.job`` picks from ``result.best_checkpoints``.
    """
    scores = [float(v) if isinstance(v, (int, float)) else math.nan for v in df[metric]]
    paths = list(df["checkpoint_path"]) if "checkpoint_path" in df.columns else [None] * len(scores)
    paths = [p if isinstance(p, str) and p else None for p in paths]
    finite = [(sign * sc, i) for i, sc in enumerate(scores) if math.isfinite(sc)]
    best = scores[max(finite)[1]] if finite else None
    exists = exists or RunStorage("").exists  # a local path, or a URI (trusted)
    kept = [(sign * scores[i], i) for i, p in enumerate(paths) if exists(p) and math.isfinite(scores[i])]
    best_ckpt = paths[max(kept)[1]] if kept else None
    last_ckpt = next((p for p in reversed(paths) if exists(p)), None)
    return best, best_ckpt, last_ckpt


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Best trial by its best epoch (the checkpoint that would be registered)."""
    scored = [r for r in rows if r.best is not None and r.status != "error"]
    if not scored:
        return None
    return max(scored, key=lambda r: r.best if mode == "max" else -r.best)  # type: ignore[operator]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:.4f}".rstrip("0").rstrip(".")
    return "-" if v is None else str(v)


def table_rows(res: SearchResult) -> tuple[list[str], list[list[str]]]:
    names = list(res.rows[0].params) if res.rows else []
    header = ["trial", *names, f"final {res.metric}", f"best {res.metric}", "epochs", "stopped early"]
    body = []
    for r in res.rows:
        stopped = {"asha": "yes (ASHA)", "patience": "yes (patience)"}.get(
            r.status, "no" if r.status == "completed" else r.status
        )
        mark = " *" if res.best is not None and r.trial_id == res.best.trial_id else ""
        body.append(
            [
                r.trial_id + mark,
                *[_fmt(r.params.get(n)) for n in names],
                _fmt(r.final),
                _fmt(r.best),
                f"{r.epochs}/{res.max_t}",
                stopped,
            ]
        )
    return header, body


def footer(res: SearchResult) -> str:
    if res.interrupted:
        done = sum(r.status not in ("interrupted", "pending") for r in res.rows)
        return (
            f"search interrupted: {done} of {res.num_samples} trials done, {res.trial_epochs} trial-epochs run so far "
            f"(of {res.budget} without early stopping)"
        )
    return (
        f"trial-epochs run: {res.trial_epochs} of {res.budget} ({res.num_samples} trials x {res.max_t} epochs); "
        f"early stopping saved {res.budget - res.trial_epochs} trial-epochs ({res.saved_pct:.0f}%)"
    )


def format_table(res: SearchResult) -> str:
    """A fixed-width table for the terminal (``*`` marks the best trial)."""
    header, body = table_rows(res)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append("")
    out.append(footer(res))
    if res.best is not None:
        out.append(
            f"best: trial {res.best.trial_id}, {res.metric}={res.best.best:.4f}, "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in res.best.params.items())
        )
    return "\n".join(out)


def markdown_table(res: SearchResult) -> str:
    header, body = table_rows(res)
    lines = [f"# segloop search {res.name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(b) + " |" for b in body
    ]
    return "\n".join(lines + ["", footer(res), ""])


def csv_table(res: SearchResult) -> str:
    names = list(res.rows[0].params) if res.rows else []
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *names, "final", "best", "epochs", "status", "run_id"])
    for r in res.rows:
        w.writerow([r.trial_id, *[r.params.get(n) for n in names], r.final, r.best, r.epochs, r.status, r.run_id])
    return buf.getvalue()


# ----------------------------------------------------------------------------- the search
def _parent_run(client: Any, exp_id: str, name: str, restoring: bool) -> str:
    if restoring:
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{SEARCH_TAG}` = '{name}' and attributes.run_name = '{name}'", max_results=1
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    return client.create_run(exp_id, run_name=name, tags={SEARCH_TAG: name, "segloop.kind": "search"}).info.run_id


def _children(client: Any, exp_id: str, parent_id: str) -> dict[str, str]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    """Log params that are not there yet (a resumed parent already has them)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def run_search(rs: ResolvedSearch) -> SearchResult:
    """Preflight, run (or resume) the search, log and print the summary; see the module docstring."""
    import mlflow

    from train.run import check_model_task, prepare, run_storage

    base, s = rs.base, rs.search
    check_model_task(base)
    name = search_name(rs)
    exp_path = experiment_path(base.data_dir, name)
    decision = resume_decision(exp_path, s.resume, fingerprint(rs))
    run_ctx = prepare(base)
    concurrent = _concurrency(rs, run_ctx.use_gpu)
    client = mlflow.MlflowClient(run_ctx.tracking_uri)
    parent_id = _parent_run(client, run_ctx.experiment_id, name, decision == "restore")
    print(
        f"search {name}: {s.num_samples} trials, up to {concurrent} at a time, ASHA on {rs.metric} ({s.mode}); "
        f"experiment {exp_path} (run again with name={name} to resume); MLflow run {parent_id}",
        flush=True,
    )
    try:
        _log_params(client, parent_id, _search_params(rs, concurrent))
        ctx = SearchContext(
            name=name,
            base=base.model_dump(mode="json"),
            run=run_ctx,
            parent_run_id=parent_id,
            metric=rs.metric,
            mode=s.mode,
            train_storage=run_storage(base.data_dir),
        )
        grid = _tuner(rs, ctx, exp_path, decision, concurrent).fit()
        res = _summarise(grid, rs, ctx, client, exp_path)
        if s.register_best and not res.interrupted:
            if res.best is None:
                raise ConfigError("--register-best: no trial produced a score, nothing to register")
            _register(res, rs, ctx, client)
        print("\n" + res.table, flush=True)
        if res.interrupted:
            print(
                f"\nsearch {name} did not finish; run it again with name={name} (or --resume) to continue", flush=True
            )
        client.set_terminated(parent_id, "KILLED" if res.interrupted else "FINISHED")
        return res
    except BaseException as err:
        client.set_terminated(parent_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def _concurrency(rs: ResolvedSearch, use_gpu: bool) -> int:
    """Trials at once, telling the user when their ``max_concurrent_trials`` does not fit."""
    import ray

    base, s = rs.base, rs.search
    concurrent = max_concurrency(rs, ray.cluster_resources(), use_gpu)
    if s.max_concurrent_trials and concurrent < min(s.max_concurrent_trials, s.num_samples):
        print(
            f"max_concurrent_trials={s.max_concurrent_trials} lowered to {concurrent}: each trial needs "
            f"{base.num_workers} x {base.cpus_per_worker:g} CPUs{' + GPUs' if use_gpu else ''}",
            flush=True,
        )
    return concurrent


def _search_params(rs: ResolvedSearch, concurrent: int) -> dict[str, Any]:
    """The parent run's params: the space, the search settings and the base config."""
    from train import tracking

    s = rs.search
    return {
        **{f"space.{k}": v for k, v in space_summary(s.space).items()},
        "num_samples": s.num_samples,
        "max_concurrent_trials": concurrent,
        "metric": rs.metric,
        "mode": s.mode,
        "scheduler": "asha",
        "grace_period": s.grace_period,
        "reduction_factor": s.reduction_factor,
        "max_t": rs.max_t,
        "seed": s.seed,
        **{f"base.{k}": v for k, v in tracking.flatten_params(rs.base.model_dump(mode="json")).items()},
    }


def _tuner(rs: ResolvedSearch, ctx: SearchContext, exp_path: Path, decision: str, concurrent: int) -> Any:
    """A fresh ``Tuner`` (ASHA over the space), or the interrupted one restored from ``exp_path``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    s = rs.search
    # The trial only drives its Train run: its workers hold the CPUs/GPUs.
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, ctx=ctx), trial_resources(ray.cluster_resources())
    )
    if decision == "restore":
        print(f"resuming search {ctx.name} from {exp_path}", flush=True)
        return tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    exp_path.mkdir(parents=True, exist_ok=True)
    (exp_path / FINGERPRINT_FILE).write_text(json.dumps(fingerprint(rs), indent=2, sort_keys=True))
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(s.space),
        tune_config=tune.TuneConfig(
            metric=rs.metric,
            mode=s.mode,
            num_samples=s.num_samples,
            # max_concurrent_trials goes to the generator itself (Tune ignores it next to a search_alg)
            search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrent),
            scheduler=ASHAScheduler(
                time_attr=EPOCHS_DONE,
                max_t=rs.max_t,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
            ),
            reuse_actors=False,  # a stopped trial's actor (and Train run) must go away
        ),
        run_config=tune.RunConfig(
            name=ctx.name,
            storage_path=str(exp_path.parent),
            failure_config=tune.FailureConfig(max_failures=s.trial_max_failures),
            callbacks=[_closer_callback(ctx, rs.max_t)],
        ),
    )


def _summarise(grid: Any, rs: ResolvedSearch, ctx: SearchContext, client: Any, exp_path: Path) -> SearchResult:
    """Rows from the grid, child runs closed, the summary logged to the parent run."""
    s = rs.search
    runs_by_trial = _children(client, ctx.run.experiment_id, ctx.parent_run_id)
    rows = collect_rows(grid, rs, runs_by_trial, ctx.train_storage)
    for r in rows:  # what the callback missed: races with the rank-0 worker, interrupted trials
        if r.run_id and r.status != "pending":
            last = {EPOCHS_DONE: r.epochs, "done": r.status != "interrupted", "early_stopped": r.status == "patience"}
            _close_child(ctx, r.trial_id, last, rs.max_t, errored=r.status == "error")
    interrupted = len(rows) < s.num_samples or any(r.status in ("interrupted", "pending") for r in rows)
    best = pick_best(rows, s.mode)
    res = SearchResult(
        name=ctx.name,
        experiment_path=str(exp_path),
        parent_run_id=ctx.parent_run_id,
        metric=rs.metric,
        mode=s.mode,
        max_t=rs.max_t,
        num_samples=s.num_samples,
        rows=rows,
        best=best,
        interrupted=interrupted,
    )
    res.table = format_table(res)
    _log_summary(client, res)
    if best is not None and not in_space(s.space, best.params):
        raise RuntimeError(f"best trial {best.trial_id} has params {best.params} outside the search space")
    return res


def _log_summary(client: Any, res: SearchResult) -> None:
    run_id = res.parent_run_id
    metrics = {
        "trial_epochs_run": float(res.trial_epochs),
        "trial_epochs_budget": float(res.budget),
        "compute_saved_pct": res.saved_pct,
        "trials_stopped_early": float(sum(r.stopped_early for r in res.rows)),
        "trials_completed": float(sum(r.status == "completed" for r in res.rows)),
    }
    if res.best is not None and res.best.best is not None:
        metrics[f"best_{res.metric}"] = res.best.best
        _log_params(client, run_id, {f"best.{k}": v for k, v in res.best.params.items()})
        client.set_tag(run_id, "segloop.best_trial_id", res.best.trial_id)
        client.set_tag(run_id, "segloop.best_config", json.dumps(res.best.params, sort_keys=True))
        if res.best.run_id:
            client.set_tag(run_id, "segloop.best_run_id", res.best.run_id)
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "summary.md").write_text(markdown_table(res))
        (Path(d) / "summary.csv").write_text(csv_table(res))
        client.log_artifact(run_id, str(Path(d) / "summary.md"))
        client.log_artifact(run_id, str(Path(d) / "summary.csv"))


def _register(res: SearchResult, rs: ResolvedSearch, ctx: SearchContext, client: Any) -> None:
    """The best trial's best checkpoint goes through train.job's held-out eval and promotion."""
    import mlflow

    from train.job import evaluate_and_promote
    from train.loop import load_checkpoint_state

    best = res.best
    assert best is not None
    storage = ctx.train_storage
    if not storage.exists(best.best_checkpoint):
        raise ConfigError(
            f"--register-best: the best checkpoint of trial {best.trial_id} "
            f"({best.best_checkpoint}) is gone; raise checkpoints_to_keep"
        )
    state = load_checkpoint_state(storage.checkpoint(best.best_checkpoint))
    history = state["history"]
    last = best.last_checkpoint
    if last and last != best.best_checkpoint and storage.exists(last):
        history = load_checkpoint_state(storage.checkpoint(last))["history"]
    cfg = TrainConfig.model_validate({**rs.base.model_dump(mode="json"), **best.params})
    if not best.run_id:
        raise ConfigError(f"--register-best: trial {best.trial_id} has no MLflow run")
    prev_status = client.get_run(best.run_id).info.status
    mlflow.set_tracking_uri(ctx.run.tracking_uri)
    with mlflow.start_run(run_id=best.run_id):
        promo = evaluate_and_promote(cfg, ctx.run, state, history)
    client.set_terminated(best.run_id, prev_status if prev_status != "RUNNING" else "FINISHED")
    res.model_version, res.promoted, res.reason = promo.version, promo.promoted, promo.reason
    client.set_tag(res.parent_run_id, "segloop.model_version", promo.version)
    client.set_tag(res.parent_run_id, "segloop.decision", "promoted" if promo.promoted else "rejected")
