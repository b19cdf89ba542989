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
from segloop.errors import DatasetError
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
    """``(rescore, "NAME/VERSION")`` for the model ``model_uri`` names; ``rescore(records)`` gives
    ``({id: Signals}, problems)``."""
    import io

    predictor = Predictor.load(model_uri)

    def rescore(records: Sequence[Any]) -> tuple[dict[str, Signals], list[str]]:
        out: dict[str, Signals] = {}
        problems: list[str] = []
        for start in range(0, len(records), batch_size):
            chunk, images = [], []
            for rec in records[start : start + batch_size]:
                try:  # a missing or changed image leaves that capture out, as a plain export does
                    served = captured_image(store, rec, f"capture {rec.id}")
                except DatasetError as err:
                    problems.append(f"not re-scored: {err}")
                    continue
                chunk.append(rec)
                images.append(np.asarray(Image.open(io.BytesIO(served.data)).convert("RGB")))
            if images:
                outs, _ = predictor.predict(images)
                out.update({rec.id: output_signals(o, predictor.version) for rec, o in zip(chunk, outs)})
        return out, problems

    return rescore, f"{predictor.name}/{predictor.version}"
