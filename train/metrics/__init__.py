"""Evaluation metrics: semantic (confusion matrix -> IoU/Dice), instance (COCO mAP,
PR/F1 curves, IoU confusion matrix, fitness) and PNG plots of them.

``plots`` imports matplotlib lazily, inside its functions.
"""

from train.metrics.instance import (
    CocoEvaluator,
    InstanceConfusionMatrix,
    coco_results,
    concat_matches,
    fitness,
    match_detections,
    pairwise_iou,
    pr_curves,
)
from train.metrics.plots import plot_confusion_matrix, plot_metric_confidence, plot_pr_curve, plot_training_curves
from train.metrics.semantic import (
    ConfusionMatrix,
    class_indices,
    confusion_matrix,
    dice_per_class,
    iou_per_class,
    mean_dice,
    mean_iou,
    pixel_accuracy,
    semantic_metrics,
)

__all__ = [
    "CocoEvaluator",
    "class_indices",
    "ConfusionMatrix",
    "InstanceConfusionMatrix",
    "coco_results",
    "concat_matches",
    "confusion_matrix",
    "dice_per_class",
    "fitness",
    "iou_per_class",
    "match_detections",
    "mean_dice",
    "mean_iou",
    "pairwise_iou",
    "pixel_accuracy",
    "plot_confusion_matrix",
    "plot_metric_confidence",
    "plot_pr_curve",
    "plot_training_curves",
    "pr_curves",
    "semantic_metrics",
]
