"""Label efficiency: which selection strategy needs the fewest annotations, as a learning curve.

    .venv/bin/python bench/label_efficiency.py [--reps 5] [--budgets 8 16 32 64] [--quick] [--json F]

The demo's setting: v1 is trained on default-style pets and meets shifted-style traffic (a
cold start: v1 cannot find the pets in it). For each repetition r:

1. v1 is trained from scratch on its own default-style set (seed r);
2. two pools of shifted images are scored by v1 through the serving code
   (``train.predict.Predictor`` + ``train.rescore``: uncertainty statistics and the pooled
   backbone embedding a replica would record): a **balanced** control (every texture family
   x breed equally, all distinct) and a **production-like** stream (two common sub-styles make
   85 % of it, each scene sent 4 times as near-copies; six rare sub-styles share the rest);
3. every strategy (``dataplane.annotation.selection``) picks K of each pool for each budget
   K, with v1's embeddings of its training set as the labelled set;
4. each pick is "annotated" (ground truth from the generator) and v1 is fine-tuned on its
   training set + the picks for the same number of steps whatever K; so is a full-pool
   reference (every pool image);
5. every model is scored (mIoU) on one shifted held-out set covering every sub-style
   equally (25 of each), never in a pool.

Strategies are compared pairwise within a repetition (same v1, same pool, same training
seed): the table gives the mean, the 95 % CI of the paired difference to random (t
distribution), the area under the learning curve as % of the full-pool reference, and the
labels needed to reach random's score at the largest K (linear interpolation between
budgets of the mean curve); a second table counts what each strategy picked by sub-style.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASS_NAMES = ("background", "pet", "border")
SCENARIOS = ("balanced", "production")


@dataclass(frozen=True)
class Setup:
    reps: int = 5
    budgets: tuple[int, ...] = (8, 16, 32, 64)
    strategies: tuple[str, ...] = ("random", "top", "power", "kcenter", "badge")
    score: str = "class_balanced_entropy"
    size: int = 64
    n_base: int = 96
    n_balanced: int = 128
    n_production: int = 256
    n_holdout: int = 200
    v1_steps: int = 300
    steps: int = 150
    batch_size: int = 8
    lr_v1: float = 0.01
    lr: float = 0.003


QUICK = Setup(
    reps=2, budgets=(2, 4), size=32, n_base=16, n_balanced=16, n_production=24, n_holdout=16, v1_steps=4, steps=3
)


@dataclass
class Pool:
    root: Path
    names: list[str]
    substyle: list[str]  # "checker/Roundcat"
    scene: list[int]  # the generator's seed: near-copies share it
    signals: list[Any] = field(default_factory=list)


# ----------------------------------------------------------------------------- data


def _names(root: Path) -> list[str]:
    return [line.split()[0] for line in (root / "annotations" / "trainval.txt").read_text().splitlines() if line]


def make_pool(root: Path, n: int, seed: int, size: int, mix: str, shift: bool = True) -> Pool:
    from train.data.synth import PET_BREEDS, generate_pets, read_meta

    generate_pets(root, n=n, seed=seed, size=size, shift=shift, test_fraction=0.0, mix=mix)
    meta, names = read_meta(root)["samples"], _names(root)
    styles = [f"{meta[k].get('family', '?')}/{PET_BREEDS[meta[k]['breed']][0]}" for k in names]
    return Pool(root, names, styles, [int(meta[k]["seed"]) for k in names])


def dataset(root: Path, train: bool, size: int, names: list[str] | None = None) -> Any:
    from torch.utils.data import Subset

    from train.data import build_dataset
    from train.transforms import eval_transforms, train_transforms

    tf = train_transforms("semantic", size) if train else eval_transforms("semantic", size)
    ds = build_dataset("semantic", root, "trainval", tf)
    if names is None:
        return ds
    index = {n: i for i, n in enumerate(_names(root))}
    return Subset(ds, [index[n] for n in names])


# ----------------------------------------------------------------------------- train and score


def train(model: Any, data: list[Any], steps: int, lr: float, seed: int, s: Setup) -> Any:
    """``steps`` AdamW steps on batches drawn uniformly (with replacement) from ``data``;
    a fresh model when ``model`` is None, else a fine-tuned copy of it."""
    import copy

    import torch
    from torch.utils.data import ConcatDataset, DataLoader, RandomSampler

    from train.config import TrainConfig
    from train.loop import build_optimizer, seed_everything, set_bn_momentum
    from train.losses import SegmentationLoss
    from train.models import build_model

    seed_everything(seed)
    cfg = TrainConfig(dataset=".", image_size=s.size, batch_size=s.batch_size, lr=lr)
    net = build_model(cfg.model, len(CLASS_NAMES)) if model is None else copy.deepcopy(model)
    set_bn_momentum(net, 0.1)
    ds = ConcatDataset(data)
    sampler = RandomSampler(ds, replacement=True, num_samples=steps * s.batch_size)
    opt = build_optimizer(cfg, net)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.01)
    crit = SegmentationLoss(cfg.ce_weight, cfg.dice_weight)
    net.train()
    for x, y in DataLoader(ds, batch_size=s.batch_size, sampler=sampler):
        loss = crit(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def miou(model: Any, holdout: Any) -> float:
    import torch
    from torch.utils.data import DataLoader

    from train.engine import evaluate_semantic

    metrics, _ = evaluate_semantic(
        model, DataLoader(holdout, batch_size=32), torch.device("cpu"), num_classes=3, class_names=CLASS_NAMES
    )
    return float(metrics["val_miou"])


def predictor(model: Any, s: Setup) -> Any:
    from train.model_ref import ModelMeta
    from train.predict import Predictor

    meta = ModelMeta(
        model="lraspp_mobilenet_v3_large",
        task="semantic",
        num_classes=3,
        class_names=list(CLASS_NAMES),
        image_size=s.size,
        model_kwargs={},
    )
    return Predictor.from_state(meta, model.state_dict(), name="v1", version="1")


def score_pool(pred: Any, root: Path, names: list[str]) -> list[Any]:
    """What a replica would record for each image (``train.rescore.output_signals``)."""
    import numpy as np
    from PIL import Image

    from train.rescore import output_signals

    out = []
    for i in range(0, len(names), 32):
        imgs = [np.asarray(Image.open(root / "images" / f"{n}.jpg").convert("RGB")) for n in names[i : i + 32]]
        outs, _ = pred.predict(imgs)
        out += [output_signals(o, pred.version) for o in outs]
    return out


# ----------------------------------------------------------------------------- one repetition


@dataclass
class Row:
    scenario: str
    rep: int
    strategy: str
    k: int
    miou: float
    picked: list[str] = field(default_factory=list)  # sub-styles of the picks
    scenes: int = 0  # distinct scenes among the picks


def run_rep(rep: int, s: Setup, tmp: Path, holdout: Any, log: Any) -> list[Row]:
    import numpy as np

    from dataplane.annotation.selection import select

    base = make_pool(tmp / f"base{rep}", s.n_base, 100 + rep, s.size, "random", shift=False)
    base_train = dataset(base.root, True, s.size)
    t0 = time.time()
    v1 = train(None, [base_train], s.v1_steps, s.lr_v1, rep, s)
    rows = [Row("v1", rep, "none", 0, miou(v1, holdout))]
    log(f"rep {rep + 1}/{s.reps}: v1 held-out mIoU {rows[0].miou:.3f} ({time.time() - t0:.0f} s)")
    pred = predictor(v1, s)
    labelled = np.stack([g.embedding for g in score_pool(pred, base.root, base.names)])
    for scenario in SCENARIOS:
        n, seed = (s.n_balanced, 200 + rep) if scenario == "balanced" else (s.n_production, 300 + rep)
        pool = make_pool(tmp / f"{scenario}{rep}", n, seed, s.size, scenario)
        pool.signals = score_pool(pred, pool.root, pool.names)
        u = np.array([g.uncertainty[s.score] for g in pool.signals])
        x = np.stack([g.embedding for g in pool.signals])
        full = train(v1, [base_train, dataset(pool.root, True, s.size)], s.steps, s.lr, rep, s)
        rows.append(Row(scenario, rep, "full pool", len(pool.names), miou(full, holdout)))
        for k in s.budgets:
            for strategy in s.strategies:
                picks = select(strategy, u, k, embeddings=x, labelled=labelled, seed=1000 * rep + k)
                names = [pool.names[p.index] for p in picks]
                model = train(v1, [base_train, dataset(pool.root, True, s.size, names)], s.steps, s.lr, rep, s)
                styles = [pool.substyle[p.index] for p in picks]
                scenes = len({pool.scene[p.index] for p in picks})
                rows.append(Row(scenario, rep, strategy, k, miou(model, holdout), styles, scenes))
            done = [r for r in rows if r.scenario == scenario and r.k == k]
            log(f"  {scenario} K={k}: " + "  ".join(f"{r.strategy} {r.miou:.3f}" for r in done))
    return rows


# ----------------------------------------------------------------------------- statistics


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % CI (t distribution) of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    """Budget at which a mean learning curve first reaches ``target`` (linear between budgets)."""
    prev_k, prev_v = 0, -math.inf
    for k, v in curve:
        if v >= target:
            if prev_v == -math.inf:
                return float(k)
            return prev_k + (target - prev_v) / (v - prev_v) * (k - prev_k)
        prev_k, prev_v = k, v
    return math.inf


def aulc(curve: list[tuple[int, float]], full: float) -> float:
    """Area under the learning curve (trapezoids over the budgets) as % of the full pool's."""
    ks = [k for k, _ in curve]
    area = sum((k1 - k0) * (v0 + v1) / 2 for (k0, v0), (k1, v1) in zip(curve, curve[1:]))
    return 100.0 * area / (full * (ks[-1] - ks[0])) if len(ks) > 1 and full > 0 else math.nan


# ----------------------------------------------------------------------------- report


def _score(rows: list[Row], scenario: str, strategy: str, k: int) -> dict[int, float]:
    return {r.rep: r.miou for r in rows if r.scenario == scenario and r.strategy == strategy and r.k == k}


def report(rows: list[Row], s: Setup) -> list[str]:
    lines = []
    kmax = max(s.budgets)
    for scenario in SCENARIOS:
        full = statistics.fmean(r.miou for r in rows if r.scenario == scenario and r.strategy == "full pool")
        pool_n = next(r.k for r in rows if r.scenario == scenario and r.strategy == "full pool")
        rand_top = statistics.fmean(_score(rows, scenario, "random", kmax).values())
        lines += [
            f"\n#### {scenario} pool ({pool_n} images) — full-pool reference mIoU {full:.3f}",
            "",
            "| strategy | "
            + " | ".join(f"K={k}: mIoU, Δ vs random [95% CI]" for k in s.budgets)
            + f" | AULC % of full | labels to reach random@{kmax} ({rand_top:.3f}) |",
            "| --- | " + " | ".join("---" for _ in s.budgets) + " | ---: | ---: |",
        ]
        for strategy in s.strategies:
            cells, curve = [], []
            for k in s.budgets:
                mine, rand = _score(rows, scenario, strategy, k), _score(rows, scenario, "random", k)
                curve.append((k, statistics.fmean(mine.values())))
                if strategy == "random":
                    cells.append(f"{curve[-1][1]:.3f}")
                    continue
                d, lo, hi = paired_ci([mine[r] - rand[r] for r in mine])
                cells.append(f"{curve[-1][1]:.3f}, {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            need = labels_to_reach(curve, rand_top)
            need_s = f"{need:.0f} ({100 * need / kmax:.0f}%)" if math.isfinite(need) else f"> {kmax}"
            lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {aulc(curve, full):.1f} | {need_s} |")
    return lines + picks_table(rows, s)


def picks_table(rows: list[Row], s: Setup) -> list[str]:
    k = sorted(s.budgets)[len(s.budgets) // 2]
    lines = []
    for scenario in SCENARIOS:
        chosen = [r for r in rows if r.scenario == scenario and r.k == k and r.picked]
        styles = sorted({st for r in chosen for st in r.picked})
        lines += [
            f"\n#### what each strategy picked, {scenario} pool, K={k} (mean over repetitions)",
            "",
            "| strategy | distinct scenes | " + " | ".join(styles) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in styles) + " |",
        ]
        for strategy in s.strategies:
            mine = [r for r in chosen if r.strategy == strategy]
            counts = Counter(st for r in mine for st in r.picked)
            scenes = statistics.fmean(r.scenes for r in mine)
            cells = " | ".join(f"{counts[st] / len(mine):.1f}" for st in styles)
            lines.append(f"| {strategy} | {scenes:.1f} | {cells} |")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> tuple[Setup, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) that checks the bench works")
    p.add_argument("--reps", type=int, help="paired repetitions (default 5)")
    p.add_argument("--budgets", type=int, nargs="+", help="K values (default 8 16 32 64)")
    p.add_argument("--strategies", nargs="+", help="default: random top power kcenter badge")
    p.add_argument("--score", help="uncertainty statistic (default class_balanced_entropy)")
    p.add_argument("--steps", type=int, help="fine-tuning steps for every K (default 150)")
    p.add_argument("--json", type=Path, help="also write every run's result here")
    args = p.parse_args(argv)
    s = QUICK if args.quick else Setup()
    given = {k: getattr(args, k) for k in ("reps", "score", "steps") if getattr(args, k) is not None}
    if args.budgets:
        given["budgets"] = tuple(sorted(args.budgets))
    if args.strategies:
        given["strategies"] = tuple(args.strategies)
    s = Setup(**{**s.__dict__, **given})
    if "random" not in s.strategies or min(s.budgets) < 1 or s.reps < 1:
        p.error("random must be among the strategies (it is the baseline), budgets >= 1, reps >= 1")
    return s, args


def main(argv: list[str] | None = None) -> None:
    import torch

    from bench.serve import machine_info

    s, args = parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hold = make_pool(tmp / "holdout", s.n_holdout, 999, s.size, "balanced")
        holdout = dataset(hold.root, False, s.size)
        for rep in range(s.reps):
            rows += run_rep(rep, s, tmp, holdout, log)
    m = machine_info()
    v1 = [r.miou for r in rows if r.scenario == "v1"]
    print(
        f"\n### Label efficiency — {s.reps} paired repetitions, lraspp_mobilenet_v3_large {s.size}px, "
        f"uncertainty = {s.score}, v1 {s.v1_steps} steps, +{s.steps} fine-tuning steps for every K\n"
    )
    print(f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; {time.time() - t0:.0f} s in all.")
    print(
        f"v1 (default style only) on the shifted held-out set ({s.n_holdout} images): mIoU {statistics.fmean(v1):.3f}"
    )
    print("\n".join(report(rows, s)))
    if args.json:
        args.json.write_text(json.dumps({"setup": s.__dict__, "rows": [r.__dict__ for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
