"""Visualisation for `pixelwise predict`: palettes, colour label PNGs, overlays and legends.

All functions take numpy arrays or torch tensors and return (H, W, 3) uint8 numpy arrays; no
matplotlib. See `palette`, `overlay` (semantic, panoptic), `instances` and `legend`.
"""

from pixelwise.viz.instances import DrawSizes, draw_tags, overlay_instances, text_color
from pixelwise.viz.legend import enlarge_small, legend_image, with_legend
from pixelwise.viz.overlay import (
    blend,
    category_colors,
    label_boundaries,
    overlay_panoptic,
    overlay_semantic,
    to_display_rgb,
)
from pixelwise.viz.palette import (
    IGNORE_COLOR,
    class_palette,
    colorize_labels,
    instance_colors,
    make_palette,
    save_label_png,
    save_png,
    voc_palette,
)

__all__ = [
    "IGNORE_COLOR",
    "DrawSizes",
    "blend",
    "category_colors",
    "class_palette",
    "colorize_labels",
    "draw_tags",
    "enlarge_small",
    "instance_colors",
    "label_boundaries",
    "legend_image",
    "make_palette",
    "overlay_instances",
    "overlay_panoptic",
    "overlay_semantic",
    "save_label_png",
    "save_png",
    "text_color",
    "to_display_rgb",
    "voc_palette",
    "with_legend",
]
