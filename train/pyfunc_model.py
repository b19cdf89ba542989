"""The MLflow pyfunc of a segloop model, logged as code (MLflow "models from code").

``train.registry.log_model`` logs this file, not a pickled object: MLflow runs it when the
model is loaded (``mlflow.pyfunc.load_model``), and :meth:`SegmentationPyfunc.load_context`
rebuilds the architecture from the logged ``segloop_model.json`` and reads the weights with
``weights_only=True``. Predictions come from :class:`train.predict.Predictor`, the same code
the Serve replicas run.

``predict`` takes uint8 RGB images ``[B, H, W, 3]`` (or one ``[H, W, 3]``). Semantic models
return the class-index masks ``[B, H, W]`` (uint8) at the input size; instance models return,
per image, a list of ``{label, score, box}`` dicts.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from train.model_ref import ModelMeta
from train.predict import Predictor, SemanticOutput


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        meta = ModelMeta.read(context.artifacts["meta"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.predictor = Predictor.from_state(meta, state)

    # np.ndarray: a hint MLflow accepts without deriving a schema from it (the logged
    # signature, uint8 [-1, -1, -1, 3], is the contract); no hint or Any makes it warn.
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        images = np.asarray(model_input, dtype=np.uint8)
        if images.ndim == 3:
            images = images[None]
        outs, _ = self.predictor.predict(list(images), score_threshold=0.0)
        if self.predictor.meta.task == "semantic":
            return np.stack([o.mask for o in outs if isinstance(o, SemanticOutput)])
        return [
            [
                {"label": int(lb), "score": float(s), "box": [float(v) for v in b]}
                for lb, s, b in zip(o.labels, o.scores, o.boxes)
            ]
            for o in outs
        ]


mlflow.models.set_model(SegmentationPyfunc())
