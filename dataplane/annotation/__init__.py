"""The annotation queue: captured production samples -> annotators -> a new dataset version.

``segloop queue list|export|simulate|import`` (:mod:`.cli`):

* ``list`` - captured samples sorted by entropy, highest first (ties: newest first), filtered
  by model version, task and time range (:mod:`.records`);
* ``export --strategy S --budget N --out DIR`` - a batch chosen by a selection strategy
  (:mod:`.selection`: random, top, power, kcenter, badge over the captures' uncertainty and
  embeddings; ``--top N`` is the N most uncertain), with the model's predictions as
  pre-annotations so annotators correct rather than draw (:mod:`.exporter`);
* ``import DATASET PATH`` - corrected annotations, every sample validated, all or nothing, into
  a new dataset version = parent + the new samples (:mod:`.importer`);
* ``simulate`` - a stand-in annotator for demos and tests (:mod:`.simulate`).

Each annotation format keeps its writer and its parser together, so they change together:
:mod:`.labelstudio`, :mod:`.coco`, :mod:`.trimaps`; the mask codecs they share are in
:mod:`dataplane.masks`.
"""

from dataplane.annotation.cli import build_parser, main
from dataplane.annotation.coco import SEMANTIC_CATEGORIES
from dataplane.annotation.exporter import EXPORT_FORMAT, ExportResult, export
from dataplane.annotation.formats import detect_format
from dataplane.annotation.images import load_capture_image, served_image
from dataplane.annotation.importer import import_annotations
from dataplane.annotation.labelstudio import label_studio_config
from dataplane.annotation.records import CaptureRecord, get_capture, list_captures
from dataplane.annotation.simulate import Truth, simulate_annotation, truth_from_dataset
from dataplane.annotation.trimaps import TRIMAP_VALUES, labels_to_trimap, trimap_from_pet_mask
from dataplane.masks import mask_polygons, rasterize_polygon, read_label_png

__all__ = [
    "EXPORT_FORMAT",
    "SEMANTIC_CATEGORIES",
    "TRIMAP_VALUES",
    "CaptureRecord",
    "ExportResult",
    "Truth",
    "build_parser",
    "detect_format",
    "export",
    "get_capture",
    "import_annotations",
    "label_studio_config",
    "labels_to_trimap",
    "list_captures",
    "load_capture_image",
    "main",
    "mask_polygons",
    "rasterize_polygon",
    "read_label_png",
    "served_image",
    "simulate_annotation",
    "trimap_from_pet_mask",
    "truth_from_dataset",
]
