"""Re-score captures with the current model: fresh uncertainty and embeddings for selection.

A capture's stored entropy and embedding come from the model that served it; after a
retrain they are stale, and embeddings of two model versions cannot be compared.
``segloop queue export --rescore models:/NAME@champion`` predicts every candidate again
through :class:`train.predict.Predictor` (the serving code) and selects on those numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from dataplane.annotation.images import captured_image
from dataplane.annotation.selection import Rescorer, Signals
from dataplane.store import ObjectStore
from train.predict import InstanceOutput, Predictor
from train.uncertainty import instance_mask_entropies, instance_uncertainty, semantic_uncertainty


def output_signals(out: Any, version: str, score_threshold: float = 0.05) -> Signals:
    """The capture signals of one predictor output (the same numbers a replica records)."""
    if isinstance(out, InstanceOutput):
        keep, mask_entropy = instance_mask_entropies(out.scores, out.masks, out.boxes, score_threshold, out.image_size)
        stats = instance_uncertainty(out.scores[keep], mask_entropy, out.labels[keep])
    else:
        stats = semantic_uncertainty(out.probs)
    emb = out.embedding.astype(np.float32) if out.embedding is not None else None
    return Signals(stats, emb, version)


def rescorer(model_uri: str, store: ObjectStore, batch_size: int = 16) -> tuple[Rescorer, str]:
    """``(rescore(records) -> {id: Signals}, "NAME/VERSION")`` for the model ``model_uri`` names."""
    import io

    predictor = Predictor.load(model_uri)

    def rescore(records: Sequence[Any]) -> dict[str, Signals]:
        out: dict[str, Signals] = {}
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = []
            for rec in chunk:
                served = captured_image(store, rec, f"capture {rec.id}")
                images.append(np.asarray(Image.open(io.BytesIO(served.data)).convert("RGB")))
            outs, _ = predictor.predict(images)
            out.update({rec.id: output_signals(o, predictor.version) for rec, o in zip(chunk, outs)})
        return out

    return rescore, f"{predictor.name}/{predictor.version}"
