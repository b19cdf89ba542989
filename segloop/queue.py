"""``segloop queue``: the annotation queue's CLI (:mod:`dataplane.annotation.cli`) with the
model at hand, so ``export --rescore MODEL_URI`` can re-score captures with it. The data
plane itself never imports training code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dataplane.annotation.cli import main as queue_main
    from train.rescore import ModelRescorer

    return queue_main(argv, rescorer_factory=ModelRescorer)
