"""PNG plots of metric curves and confusion matrices (logged as MLflow artifacts).

Figures are drawn with matplotlib's object API on an explicit Agg canvas: no pyplot, no
global backend switch, no import-time side effect, safe in headless Ray workers and
threads. matplotlib itself is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_confusion_matrix", "plot_metric_confidence", "plot_pr_curve", "plot_training_curves"]

MAX_LEGEND_CLASSES = 20  # beyond this per-class curves are drawn grey and unlabelled


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png")
    finally:
        fig.clear()  # Figure objects are not tracked by pyplot; drop the artists now
    return path


def _name(class_names: Sequence[str] | None, label: int) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str], path: str | Path, normalize: bool = True, title: str = "Confusion matrix"
) -> Path:
    """Heat map of ``cm[target, pred]``; ``normalize`` divides each row by its total
    (row = recall per true class), rows with no samples stay empty."""
    m = np.asarray(cm.cpu() if hasattr(cm, "cpu") else cm, dtype=np.float64)
    n = m.shape[0]
    names = [_name(class_names, i) for i in range(n)]
    if normalize:
        rows = m.sum(1, keepdims=True)
        m = np.divide(m, rows, out=np.full_like(m, np.nan), where=rows > 0)
    side = max(4.0, 0.6 * n + 2.5)
    fig = _figure((side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 30:
        finite = m[np.isfinite(m)]
        hi = (finite.max() if finite.size else 1.0) / 2
        for i in range(n):
            for j in range(n):
                v = m[i, j]
                if np.isfinite(v) and v != 0:
                    txt = f"{v:.2f}" if normalize else f"{int(v)}"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if v > hi else "black")
    ax.set_xticks(range(n), names, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title + (" (normalised by row)" if normalize else ""))
    return _save(fig, path)


def _per_class(ax: Any, xs: np.ndarray, ys: np.ndarray, labels: list[str]) -> None:
    many = len(labels) > MAX_LEGEND_CLASSES
    for y, lab in zip(ys, labels):
        ax.plot(xs, y, linewidth=1, color="grey" if many else None, label=None if many else lab)


def plot_pr_curve(curves: Mapping[str, Any], class_names: Sequence[str] | None, path: str | Path) -> Path:
    """Precision-recall curve per class (AP50 in the legend) plus the class mean, from
    :func:`train.metrics.instance.pr_curves`."""
    cls = [int(c) for c in np.asarray(curves["classes"]).reshape(-1)]
    ap = np.asarray(curves["ap50"]).reshape(-1)
    fig = _figure((6.5, 5.0))
    ax = fig.add_subplot()
    labels = [f"{_name(class_names, c)} {a:.3f}" for c, a in zip(cls, ap)]
    _per_class(ax, curves["pr_recall"], np.asarray(curves["pr_precision"]), labels)
    if cls:
        ax.plot(
            curves["pr_recall"],
            curves["mean_pr_precision"],
            linewidth=3,
            color="blue",
            label=f"all classes {curves['map50']:.3f} mAP@0.5",
        )
        ax.legend(loc="lower left", fontsize=8)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_metric_confidence(
    curves: Mapping[str, Any], key: str, class_names: Sequence[str] | None, path: str | Path
) -> Path:
    """``key`` in {"precision", "recall", "f1"} against the confidence threshold, per class
    plus the mean (its maximum is marked)."""
    if key not in ("precision", "recall", "f1"):
        raise ValueError(f"plot_metric_confidence: key must be 'precision', 'recall' or 'f1', got {key!r}")
    cls = [int(c) for c in np.asarray(curves["classes"]).reshape(-1)]
    x = np.asarray(curves["conf"])
    fig = _figure((6.5, 5.0))
    ax = fig.add_subplot()
    _per_class(ax, x, np.asarray(curves[key]), [_name(class_names, c) for c in cls])
    if cls:
        mean = np.asarray(curves[f"mean_{key}"])
        i = int(np.argmax(mean))
        ax.plot(x, mean, linewidth=3, color="blue", label=f"all classes {mean[i]:.2f} at {x[i]:.3f}")
        ax.legend(loc="lower left", fontsize=8)
    pretty = {"precision": "Precision", "recall": "Recall", "f1": "F1"}[key]
    ax.set(xlabel="Confidence", ylabel=pretty, xlim=(0, 1), ylim=(0, 1.01), title=f"{pretty}-Confidence")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path) -> Path:
    """One panel per metric key over epochs; x is ``row["epoch"]`` when present, else the
    row index. Rows missing a key (or holding NaN) are skipped for that key."""
    keys = list(keys)
    if not keys:
        raise ValueError("plot_training_curves: no metric keys given")
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig = _figure((4.0 * cols, 3.2 * rows))
    for n, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        pts = [
            (row.get("epoch", i), float(row[key]))
            for i, row in enumerate(history)
            if row.get(key) is not None and not math.isnan(float(row[key]))
        ]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, linewidth=1.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _save(fig, path)
