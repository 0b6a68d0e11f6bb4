"""Panoptic segmentation outside the model: fusion of instance + semantic predictions and the
COCO panoptic prediction writer.

* `fuse_panoptic(instances, semantic, categories, config)` -> `PanopticResult` (ids, segments):
  Kirillov et al.'s heuristic, parameters in `FusionConfig`;
* `PanopticCategories(categories)`: contiguous labels <-> the dataset's category ids;
  `PanopticCategories.from_class_names(semantic_classes, thing_classes)` for a semantic model and
  an instance model trained apart;
* `PanopticPredictionWriter(out, categories)`: ``OUT/panoptic.json`` + ``OUT/panoptic/NAME.png``
  (id = R + 256 G + 256^2 B), checked before anything is written.
"""

from pixelwise.panoptic.fusion import (FusionConfig, PanopticCategories, PanopticResult,
                                       fuse_panoptic)
from pixelwise.panoptic.writer import PanopticPredictionWriter, check_prediction, ids_from_masks

__all__ = [
    "FusionConfig", "PanopticCategories", "PanopticPredictionWriter", "PanopticResult",
    "check_prediction", "fuse_panoptic", "ids_from_masks",
]
