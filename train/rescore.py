"""Re-score captures with the current model: fresh uncertainty and embeddings for selection.

A capture's stored entropy and embedding come from the model that served it; after a
retrain they are stale, and embeddings of two model versions cannot be compared.
``segloop queue export --rescore models:/NAME@champion`` predicts every candidate again
through :class:`train.predict.Predictor` (the serving code) and selects on those numbers.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from dataplane.annotation.images import captured_image
from dataplane.annotation.selection import Signals
from dataplane.store import ObjectStore
from dataplane.versions import materialize
from segloop.errors import DatasetError
from train.predict import Predictor, output_uncertainty


def output_signals(out: Any, version: str, score_threshold: float = 0.05) -> Signals:
    """The capture signals of one predictor output (the same numbers a replica records)."""
    emb = out.embedding.astype(np.float32) if out.embedding is not None else None
    return Signals(output_uncertainty(out, score_threshold), emb, version)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ModelRescorer:
    """The current model's signals for captures and its embeddings of a dataset version
    (:class:`dataplane.annotation.selection.Rescorer`)."""

    def __init__(self, model_uri: str, store: ObjectStore, batch_size: int = 16) -> None:
        self.predictor = Predictor.load(model_uri)
        self.store = store
        self.batch_size = batch_size
        self.name = f"{self.predictor.name}/{self.predictor.version}"

    def _predict(self, images: list[np.ndarray]) -> list[Any]:
        outs: list[Any] = []
        for start in range(0, len(images), self.batch_size):
            outs += self.predictor.predict(images[start : start + self.batch_size])[0]
        return outs

    def captures(self, records: Sequence[Any]) -> tuple[dict[str, Signals], list[str]]:
        chosen, images, problems = [], [], []
        for rec in records:
            try:  # a missing or changed image leaves that capture out, as a plain export does
                served = captured_image(self.store, rec, f"capture {rec.id}")
            except DatasetError as err:
                problems.append(f"not re-scored: {err}")
                continue
            chosen.append(rec)
            images.append(_rgb(served.data))
        version = self.predictor.version
        return {r.id: output_signals(o, version) for r, o in zip(chosen, self._predict(images))}, problems

    def dataset(self, manifest: Any) -> Optional[np.ndarray]:
        """Embeddings of every image of ``manifest`` (materialised to a temporary directory)."""
        with tempfile.TemporaryDirectory(prefix="segloop-rescore-") as tmp:
            root = materialize(self.store, manifest, Path(tmp) / "data")
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "images" in p.parts)
            outs = self._predict([_rgb(p.read_bytes()) for p in paths])
        rows = [o.embedding.astype(np.float32) for o in outs if o.embedding is not None]
        return np.stack(rows) if rows else None


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
