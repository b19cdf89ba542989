"""Which captures go to annotators: batch selection strategies over uncertainty and embeddings.

Top-k by uncertainty picks redundant batches (the most uncertain images are alike, and a
stream repeats itself) and does worse than random at small budgets and cold start (Sener &
Savarese 2018; Kirsch et al. 2023; Hacohen et al. 2022). The batch-aware strategies here
add diversity in the embedding space of the model that served the capture:

* ``random``: ``budget`` captures uniformly at random (the baseline every claim is measured against);
* ``top``: the ``budget`` most uncertain;
* ``power``: sampled without replacement with probability ∝ u^β (stochastic batch
  acquisition, Kirsch et al.); the Gumbel-top-k trick draws the whole batch at once;
* ``kcenter``: greedy, each pick maximises u · d, d the cosine distance to the nearest
  labelled or already picked sample (an uncertainty-weighted core-set);
* ``badge``: k-means++ seeding, each pick drawn with probability ∝ u · d² (BADGE's
  seeding on pooled features instead of gradient embeddings).

Pure numpy: the queue calls :func:`select` on capture records, the benchmark on arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol

import numpy as np

from segloop.errors import ConfigError

STRATEGIES = ("random", "top", "power", "kcenter", "badge")
NEEDS_EMBEDDINGS = ("kcenter", "badge")
DEFAULT_STRATEGY = "power"  # the best measured by bench/label_efficiency.py (README)
DEFAULT_SCORE = "class_balanced_entropy"
# the statistics a capture records (train.uncertainty): both tasks, then semantic, then instance only
SCORE_KEYS = (
    "entropy",
    "class_balanced_entropy",
    "margin",
    "top_entropy",
    "score_uncertainty",
    "mask_entropy",
    "max_instance_entropy",
)


@dataclass(frozen=True)
class Pick:
    """One selected sample: its index in the candidates and why it was picked."""

    index: int
    rank: int  # 0 = picked first
    uncertainty: float
    reason: str
    distance: Optional[float] = None  # cosine distance to the nearest labelled/picked sample when picked
    probability: Optional[float] = None  # power: u^β / Σ u^β (its first-draw chance); badge: its chance at its draw

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def check_selection(strategy: str, budget: Any, beta: float = 1.0) -> None:
    """ConfigError naming a bad strategy, budget or β, with what is expected."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown selection strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ConfigError(f"the selection budget must be a positive integer, got {budget!r}")
    if not np.isfinite(beta) or beta <= 0:
        raise ConfigError(f"beta (power sampling's exponent) must be > 0, got {beta!r}")


def _unit_rows(x: Optional[np.ndarray], what: str) -> Optional[np.ndarray]:
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"{what} must be a [n, d] array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise ConfigError(f"{what} hold a zero or non-finite vector")
    return x / norms


def select(
    strategy: str,
    uncertainty: Sequence[float],
    budget: int,
    *,
    embeddings: Optional[np.ndarray] = None,
    labelled: Optional[np.ndarray] = None,
    seed: int = 0,
    beta: float = 1.0,
) -> list[Pick]:
    """Pick ``min(budget, n)`` of ``n`` candidates; see the module docstring for the strategies.

    ``uncertainty`` [n] in [0, 1] (higher = less sure); ``embeddings`` [n, d] (needed by
    kcenter and badge); ``labelled`` [m, d] embeddings of what is already annotated (kcenter
    and badge keep away from it). Deterministic for a given ``seed``.
    """
    check_selection(strategy, budget, beta)
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    if not np.isfinite(u).all() or (u < 0).any():
        raise ConfigError("uncertainty scores must be finite and >= 0")
    x = _unit_rows(embeddings, "embeddings")
    if strategy in NEEDS_EMBEDDINGS:
        if x is None:
            raise ConfigError(f"strategy {strategy!r} needs embeddings; use random, top or power without them")
        if x.shape[0] != u.size:
            raise ConfigError(f"{x.shape[0]} embeddings for {u.size} uncertainty scores")
    lab = _unit_rows(labelled, "labelled embeddings")
    if lab is not None and x is not None and lab.shape[1] != x.shape[1]:
        raise ConfigError(f"labelled embeddings have {lab.shape[1]} dimensions, candidates {x.shape[1]}")
    k = min(int(budget), u.size)
    rng = np.random.default_rng(seed)
    if k == 0:
        return []
    if strategy == "random":
        return [Pick(int(i), r, float(u[i]), "random") for r, i in enumerate(rng.choice(u.size, k, replace=False))]
    if strategy == "top":
        order = np.argsort(-u, kind="stable")[:k]
        return [Pick(int(i), r, float(u[i]), "most uncertain") for r, i in enumerate(order)]
    if strategy == "power":
        return _power(u, k, beta, rng)
    return _greedy(strategy, u, x, lab, k, rng)  # type: ignore[arg-type]


def _power(u: np.ndarray, k: int, beta: float, rng: np.random.Generator) -> list[Pick]:
    """Sequential sampling without replacement, P ∝ u^β, via Gumbel-top-k (Kool et al. 2019)."""
    w = np.power(np.maximum(u, 1e-12), beta)
    keys = np.log(w) + rng.gumbel(size=u.size)
    order = np.argsort(-keys, kind="stable")[:k]
    p = w / w.sum()
    return [
        Pick(int(i), r, float(u[i]), f"sampled, P ∝ u^{beta:g}", probability=float(p[i])) for r, i in enumerate(order)
    ]


def _greedy(
    strategy: str, u: np.ndarray, x: np.ndarray, lab: Optional[np.ndarray], k: int, rng: np.random.Generator
) -> list[Pick]:
    """kcenter (argmax u·d) and badge (draw ∝ u·d²); d = cosine distance to labelled ∪ picked."""
    d = np.full(u.size, np.inf)
    if lab is not None and len(lab):
        for start in range(0, len(lab), 4096):  # bounded memory for large labelled sets
            d = np.minimum(d, 1.0 - (x @ lab[start : start + 4096].T).max(axis=1))
    d = np.maximum(d, 0.0)
    taken = np.zeros(u.size, dtype=bool)
    picks: list[Pick] = []
    for r in range(k):
        if np.isinf(d).all():  # nothing labelled or picked yet: the most uncertain (kcenter) or P ∝ u (badge)
            gain = u.copy()
        else:
            gain = u * (d if strategy == "kcenter" else d**2)
        gain[taken] = -1.0
        prob = None
        if gain.max() <= 0:  # every candidate left copies a pick or a labelled sample: the most uncertain
            i = int(np.argmax(np.where(taken, -1.0, u)))
        elif strategy == "kcenter":
            i = int(np.argmax(gain))
        else:
            w = np.maximum(gain, 0.0)
            prob_all = w / w.sum()
            i = int(rng.choice(u.size, p=prob_all))
            prob = float(prob_all[i])
        dist = None if np.isinf(d[i]) else float(d[i])
        reason = "most uncertain, nothing labelled near" if dist is None else "far from labelled and picked"
        picks.append(Pick(i, r, float(u[i]), reason if strategy == "kcenter" else "k-means++ draw", dist, prob))
        taken[i] = True
        d = np.minimum(d, np.maximum(1.0 - x @ x[i], 0.0))
    return picks


def near_duplicates(
    embeddings: np.ndarray, uncertainty: Sequence[float], cosine: float, keys: Optional[Sequence[Any]] = None
) -> list[int]:
    """Indices to drop: exact copies (equal ``keys``, e.g. sha256) and near copies (cosine >=
    ``cosine``; 1.0: keys only), keeping the most uncertain of each group. Rows with a zero
    vector are compared by key only. O(n x kept): meant for the thousands, not millions."""
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    order = np.argsort(-u, kind="stable")
    x = np.asarray(embeddings, dtype=np.float32) if embeddings is not None else None
    if x is not None:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0)
    seen: set[Any] = set()
    kept: list[int] = []
    drop: list[int] = []
    for i in order:
        key = keys[i] if keys is not None else None
        copy = key is not None and key in seen
        if not copy and x is not None and cosine < 1.0 and kept and np.any(x[i]):
            copy = bool((x[kept] @ x[i]).max() >= cosine)
        if copy:
            drop.append(int(i))
            continue
        kept.append(int(i))
        if key is not None:
            seen.add(key)
    return sorted(drop)


# ----------------------------------------------------------------------------- on capture records


@dataclass(frozen=True)
class SelectionSpec:
    """How ``segloop queue export`` chooses its batch (see the module docstring)."""

    strategy: str = DEFAULT_STRATEGY
    budget: int = 50
    seed: int = 0
    beta: float = 1.0
    score: str = DEFAULT_SCORE  # which statistic of the capture's ``uncertainty`` is u
    # candidates at least this close (embedding cosine) to a more uncertain one are dropped; 1.0: exact
    # copies only (by sha256). The default: on the synthetic drift the cosines of near-copies (p5 0.996)
    # and of distinct images (p95 0.998) overlap, so any lower threshold drops distinct images there.
    dedupe_cosine: float = 1.0

    def check(self) -> None:
        check_selection(self.strategy, self.budget, self.beta)
        if not 0 < self.dedupe_cosine <= 1:
            raise ConfigError(f"dedupe cosine must be in (0, 1], got {self.dedupe_cosine!r}")


@dataclass(frozen=True)
class Signals:
    """A capture's uncertainty statistics and embedding, as stored or as re-scored."""

    uncertainty: dict[str, float]
    embedding: Optional[np.ndarray]
    model_version: Optional[str]


class Rescorer(Protocol):
    """The current model, for ``queue export --rescore`` (:class:`train.rescore.ModelRescorer`)."""

    name: str  # "NAME/VERSION"

    def captures(self, records: list[Any]) -> tuple[dict[str, Signals], list[str]]:
        """``({id: fresh signals}, problems)``; captures it cannot read are left out and named."""
        ...

    def dataset(self, manifest: Any) -> Optional[np.ndarray]:
        """[n, d] embeddings of a dataset version's images (what is already labelled)."""
        ...


@dataclass
class Selection:
    spec: SelectionSpec
    records: list[Any]  # the chosen CaptureRecords, in pick order
    picks: list[Pick]
    duplicates: list[str]  # ids left out as copies of a more uncertain candidate
    rescored_with: Optional[str] = None
    problems: list[str] = field(default_factory=list)  # captures left out or scored on a fallback
    labelled: int = 0  # labelled embeddings kcenter/badge kept away from

    def index(self) -> dict[str, Any]:
        """What the export records of this selection."""
        return {
            **asdict(self.spec),
            "rescored_with": self.rescored_with,
            "labelled_embeddings": self.labelled,
            "problems": self.problems,
            "duplicates_dropped": self.duplicates,
            "picks": [dict(p.as_dict(), id=r.id) for r, p in zip(self.records, self.picks)],
        }


def stored_signals(rec: Any) -> Signals:
    """The signals a capture recorded (older captures: entropy only, no embedding)."""
    from dataplane.capture import decode_embedding

    stats = rec.meta.get("uncertainty") if isinstance(rec.meta.get("uncertainty"), dict) else {}
    stats = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and np.isfinite(v)}
    if "entropy" not in stats and rec.entropy is not None:
        stats["entropy"] = rec.entropy
    emb = rec.meta.get("embedding")
    vector = decode_embedding(emb)
    version = emb.get("model_version") if isinstance(emb, dict) else None
    return Signals(stats, vector, str(version) if version is not None else rec.model_version)


def _embedding_matrix(ids: list[str], sigs: list[Signals], strategy: str) -> Optional[np.ndarray]:
    """[n, d] embeddings of one model version; ConfigError saying what to do when they are not."""
    if not sigs:
        return None
    missing = [i for i, s in zip(ids, sigs) if s.embedding is None]
    if missing:
        if strategy not in NEEDS_EMBEDDINGS:
            return None
        raise ConfigError(
            f"{len(missing)} of {len(ids)} captures have no embedding (e.g. {missing[0]}: captured before "
            f"embeddings were recorded); strategy {strategy!r} needs them: pass --rescore MODEL_URI or use "
            "--strategy random|top|power"
        )
    versions = sorted({str(s.model_version) for s in sigs})
    dims = {s.embedding.size for s in sigs}  # type: ignore[union-attr]
    if len(versions) > 1 or len(dims) > 1:
        if strategy not in NEEDS_EMBEDDINGS:
            return None
        raise ConfigError(
            f"the captures' embeddings come from model versions {versions}; distances across models mean nothing: "
            "pass --model-version V, or --rescore MODEL_URI to embed them all with one model"
        )
    return np.stack([s.embedding for s in sigs])  # type: ignore[misc]


def _labelled_matrix(sigs: list[Signals], like: Signals, extra: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """What is labelled, in the candidates' embedding space: ``extra`` (a dataset version's images,
    which include its captures) when given, else the labelled captures of the same model and size."""
    size = like.embedding.size  # type: ignore[union-attr]
    if extra is not None and len(extra) and np.asarray(extra).shape[1] == size:
        return np.asarray(extra, dtype=np.float32)
    rows = [
        s.embedding
        for s in sigs
        if s.embedding is not None and (s.embedding.size, s.model_version) == (size, like.model_version)
    ]
    return np.stack(rows) if rows else None


def _scores(ids: list[str], sigs: dict[str, Signals], key: str) -> tuple[np.ndarray, int]:
    """``(u, how many fell back to entropy)``; ConfigError when no candidate records ``key``."""
    have = [key in sigs[i].uncertainty for i in ids]
    if ids and not any(have):
        raise ConfigError(
            f"no capture records the statistic {key!r} (older captures record only entropy; "
            "semantic and instance captures record different ones): pick another --score or --rescore"
        )
    u = [sigs[i].uncertainty.get(key, sigs[i].uncertainty.get("entropy", 0.0)) for i in ids]
    return np.asarray(u, dtype=np.float64), have.count(False)


def _signals(
    cands: list[Any], lab: list[Any], rescore: Optional[Rescorer]
) -> tuple[dict[str, Signals], list[Any], list[Any], list[str]]:
    """Every capture's signals (stored, or fresh from ``rescore``); captures it could not
    re-score are left out and named in the problems."""
    if rescore is None:
        return {r.id: stored_signals(r) for r in cands + lab}, cands, lab, []
    fresh, problems = rescore.captures(cands + lab)
    return fresh, [r for r in cands if r.id in fresh], [r for r in lab if r.id in fresh], problems


def select_captures(
    candidates: Sequence[Any],
    spec: SelectionSpec,
    labelled: Sequence[Any] = (),
    rescore: Optional[Rescorer] = None,
    labelled_embeddings: Optional[np.ndarray] = None,
) -> Selection:
    """Choose ``spec.budget`` of ``candidates`` (CaptureRecords), duplicates dropped first.

    ``labelled``: captures already annotated, and ``labelled_embeddings`` [m, d] (e.g. a dataset
    version's images embedded by ``rescore``): kcenter and badge keep away from both.
    ``rescore``: every capture's signals come from the current model first.
    """
    spec.check()
    sig, cands, lab, problems = _signals(list(candidates), list(labelled), rescore)
    if not cands:
        raise ConfigError("no capture left to select from: " + "; ".join(problems[:3]))
    ids = [r.id for r in cands]
    needs_x = spec.strategy in NEEDS_EMBEDDINGS or spec.dedupe_cosine < 1.0
    x = _embedding_matrix(ids, [sig[i] for i in ids], spec.strategy) if needs_x else None
    u, fallbacks = _scores(ids, sig, spec.score)
    drop = set(near_duplicates(x, u, spec.dedupe_cosine, [r.meta.get("image_sha256") for r in cands]))
    keep = [i for i in range(len(ids)) if i not in drop]
    use_x = x is not None and spec.strategy in NEEDS_EMBEDDINGS
    known = _labelled_matrix([sig[r.id] for r in lab], sig[ids[0]], labelled_embeddings) if use_x else None
    picks = select(
        spec.strategy,
        u[keep],
        spec.budget,
        embeddings=x[keep] if use_x else None,
        labelled=known,
        seed=spec.seed,
        beta=spec.beta,
    )
    picks = [Pick(keep[p.index], p.rank, p.uncertainty, p.reason, p.distance, p.probability) for p in picks]
    if fallbacks:
        problems.append(f"{fallbacks} capture(s) record no {spec.score!r}; their entropy was used")
    chosen = [cands[p.index] for p in picks]
    name = rescore.name if rescore is not None else None
    n_known = len(known) if known is not None else 0
    return Selection(spec, chosen, picks, [ids[i] for i in sorted(drop)], name, problems, n_known)
