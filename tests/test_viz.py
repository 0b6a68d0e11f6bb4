"""pixelwise.viz: palettes, label PNGs, display conversion, overlays and legends.

References are independent: the textbook VOC `bitget` loop, hand-computed blends, scipy's
binary erosion for boundaries, PIL reading the written PNGs back, naive loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pixelwise.data.images import read_label_png
from pixelwise.data.panoptic import id2rgb
from pixelwise.errors import UserError
from pixelwise.viz import (
    IGNORE_COLOR,
    DrawSizes,
    blend,
    colorize_labels,
    instance_colors,
    label_boundaries,
    legend_image,
    make_palette,
    overlay_instances,
    overlay_panoptic,
    overlay_semantic,
    save_label_png,
    save_png,
    text_color,
    to_display_rgb,
    voc_palette,
    with_legend,
    enlarge_small,
)
from pixelwise.viz.instances import _tags
from pixelwise.viz.overlay import region_boxes
from pixelwise.viz.palette import srgb_to_lab

CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


def reference_boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of `mask` within city-block distance `width` of a non-mask pixel (image border
    excluded): the mask minus its erosion by a cross, iterated."""
    eroded = ndimage.binary_erosion(mask, CROSS, iterations=width, border_value=1)
    return mask & ~eroded


def hand_blend(image: np.ndarray, color, alpha: float) -> np.ndarray:
    return np.round((1 - alpha) * image.astype(np.float64) + alpha * np.asarray(color, float))


# ------------------------------------------------------------------------------ palette


def test_voc_palette_is_the_bitget_construction():
    # the PASCAL VOC devkit's VOClabelcolormap, written as in the devkit
    def bitget(value, bit):
        return (value >> bit) & 1

    expected = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= bitget(c, 0) << (7 - j)
            g |= bitget(c, 1) << (7 - j)
            b |= bitget(c, 2) << (7 - j)
            c >>= 3
        expected[i] = (r, g, b)
    np.testing.assert_array_equal(voc_palette(256), expected)
    # well-known VOC colours: aeroplane, person, tvmonitor
    assert voc_palette(21)[[1, 15, 20]].tolist() == [[128, 0, 0], [192, 128, 128], [0, 64, 128]]


def test_make_palette_voc_first_then_distinct_and_stable():
    pal = make_palette(256)
    np.testing.assert_array_equal(pal[:21], voc_palette(21))
    np.testing.assert_array_equal(make_palette(40), pal[:40])  # a prefix does not change
    lab = srgb_to_lab(pal)
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1)  # (256, 256)
    np.fill_diagonal(dist, np.inf)
    # the extension is at least as separated as VOC's closest pair (8.8 in CIELAB)
    assert dist[21:].min() >= dist[:21, :21].min()
    assert len({tuple(c) for c in pal}) == 256
    for reserved in (IGNORE_COLOR, (255, 255, 255)):
        assert np.linalg.norm(srgb_to_lab(np.array(reserved)) - lab[21:], axis=1).min() > 8


def test_srgb_to_lab_known_values():
    # CIELAB (D65) of white, red and mid grey from standard tables
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 0, 0])), [53.24, 80.09, 67.20],
                               atol=0.01)
    np.testing.assert_allclose(srgb_to_lab(np.array([128, 128, 128])), [53.59, 0, 0], atol=0.01)


def test_instance_colors_deterministic_and_neighbours_differ():
    colors = instance_colors(50).astype(int)
    np.testing.assert_array_equal(colors, instance_colors(50))
    assert np.abs(np.diff(colors, axis=0)).sum(axis=1).min() > 60


def test_colorize_labels_matches_loop_and_ignore_colour():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (7, 9))
    labels[2, 3] = 255
    pal = make_palette(5)
    out = colorize_labels(torch.from_numpy(labels), pal)
    for y in range(7):
        for x in range(9):
            expected = IGNORE_COLOR if labels[y, x] == 255 else tuple(pal[labels[y, x]])
            assert tuple(out[y, x]) == expected
    with pytest.raises(UserError, match="label 4 has no colour"):
        colorize_labels(labels, pal[:4])


def test_save_label_png_reads_back_indices_and_palette(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 30, (13, 17))
    labels[0, :5] = 255
    pal = make_palette(30)
    path = tmp_path / "sub" / "label.png"
    save_label_png(path, labels, pal)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
        table = np.array(image.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(table[:30], pal)
    assert tuple(table[255]) == IGNORE_COLOR
    np.testing.assert_array_equal(read_label_png(path).numpy(), labels)  # the project's reader
    assert [p.name for p in path.parent.iterdir()] == ["label.png"]  # no temporary left


def test_save_label_png_refuses_labels_over_255_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="0..255"):
        save_label_png(tmp_path / "x.png", np.array([[0, 300]]), make_palette(2))
    assert list(tmp_path.iterdir()) == []


def test_save_png_round_trip(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    save_png(tmp_path / "o.png", rgb)
    with Image.open(tmp_path / "o.png") as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), rgb)
    with pytest.raises(UserError, match="uint8"):
        save_png(tmp_path / "bad.png", rgb.astype(np.float32))


# ------------------------------------------------------------------------------ display


def test_16bit_without_stretch_scales_by_257_without_overflow():
    values = np.array([[0, 128, 129, 257, 32896, 65534, 65535]], dtype=np.uint16)
    tensor = torch.from_numpy(values)[None]  # (1, 1, 7) 1-channel 16-bit tensor
    out = to_display_rgb(tensor, stretch=False)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    # v / 257 rounded: 128 -> 0.498, 129 -> 0.502, 32896 -> 128 exactly
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 128, 255, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_default_stretch_spreads_12bit_data_and_ignores_a_hot_pixel():
    ramp = np.tile(np.arange(0, 4096, 4, dtype=np.uint16), (64, 1))  # 12-bit data, (64, 1024)
    ramp[0, 0] = 65535  # one hot pixel
    out = to_display_rgb(ramp)[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # not crushed into the bottom 16 levels of 255
    order = np.argsort(ramp[1:].ravel(), kind="stable")
    assert (np.diff(out[1:].ravel()[order].astype(int)) >= 0).all()  # monotone
    assert out[1:, -1].min() == 255  # the 12-bit maximum is shown white despite the hot pixel


def test_float_and_uint8_inputs():
    image = torch.tensor([[[0.0, 0.5, 1.2]], [[-0.1, 0.2, 1.0]], [[1.0, 0.0, 0.004]]])  # (3,1,3)
    out = to_display_rgb(image)
    assert out[0].tolist() == [[0, 0, 255], [128, 51, 0], [255, 255, 1]]
    rgb = np.random.default_rng(3).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_display_rgb(rgb), rgb)
    np.testing.assert_array_equal(to_display_rgb(torch.from_numpy(rgb).permute(2, 0, 1)), rgb)
    with pytest.raises(UserError, match="C = 1, 3 or 4"):
        to_display_rgb(np.zeros((4, 5, 2)))


# ------------------------------------------------------------------------------ boundaries


@pytest.mark.parametrize("width", [1, 2, 3])
def test_label_boundaries_equal_erosion_reference(width):
    rng = np.random.default_rng(width)
    ids = ndimage.zoom(rng.integers(0, 4, (6, 7)), 5, order=0)  # blocky regions, (30, 35)
    ids[10:14, 3:30] = 9  # a thin band
    expected = np.zeros(ids.shape, dtype=bool)
    for value in np.unique(ids):
        expected |= reference_boundary(ids == value, width)
    np.testing.assert_array_equal(label_boundaries(ids, width), expected)
    assert not label_boundaries(ids, 0).any()


def test_blend_by_hand():
    rgb = np.array([[[100, 52, 200], [10, 20, 30]]], dtype=np.uint8)
    colors = np.array([[[128, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    out = blend(rgb, colors, np.array([[True, False]]), alpha=0.25)
    # 0.75 * 100 + 0.25 * 128 = 107; 0.75 * 52 = 39; 0.75 * 200 = 150
    assert out.tolist() == [[[107, 39, 150], [10, 20, 30]]]


# ------------------------------------------------------------------------------ semantic


def _two_class_scene():
    image = np.zeros((20, 24, 3), dtype=np.uint8)
    image[...] = (100, 52, 200)
    labels = np.zeros((20, 24), dtype=np.int64)
    labels[5:15, 6:18] = 2
    labels[0:3, 0:4] = 255  # ignore, touching the image corner and class 0
    return image, labels


def test_overlay_semantic_blend_outlines_and_ignore():
    image, labels = _two_class_scene()
    pal = make_palette(3)  # 0 black, 2 (0, 128, 0)
    out = overlay_semantic(image, labels, pal, alpha=0.25, outline_width=1)
    # interior pixels by hand: 0.75 * (100, 52, 200) + 0.25 * (0, 128, 0) = (75, 71, 150)
    assert tuple(out[10, 12]) == (75, 71, 150)
    assert tuple(out[18, 2]) == (75, 39, 150)  # class 0 (black)
    # ignore pixels untouched
    np.testing.assert_array_equal(out[0:3, 0:4], image[0:3, 0:4])
    # the whole image: outlines are exactly the per-class erosion boundaries, opaque
    expected = image.copy()
    for c in (0, 2):
        mask = labels == c
        expected[mask] = hand_blend(image[mask], pal[c], 0.25)
        expected[reference_boundary(mask)] = pal[c]
    np.testing.assert_array_equal(out, expected)


def test_overlay_semantic_tensor_input_and_errors():
    image, labels = _two_class_scene()
    chw = torch.from_numpy(image).permute(2, 0, 1)  # (3, H, W)
    np.testing.assert_array_equal(
        overlay_semantic(chw, torch.from_numpy(labels), make_palette(3)),
        overlay_semantic(image, labels, make_palette(3)),
    )
    with pytest.raises(UserError, match="do not match the image"):
        overlay_semantic(image, labels[:, :5])
    with pytest.raises(UserError, match="label 2 has no colour"):
        overlay_semantic(image, labels, make_palette(2))
    without = overlay_semantic(image, labels, make_palette(3), outline_width=0)
    assert tuple(without[5, 6]) == tuple(without[10, 12])  # no outline


# ------------------------------------------------------------------------------ instances

SIZES = DrawSizes(box_width=1, joint_radius=3, bone_width=1, font_size=10)


def test_overlay_instances_masks_outlines_and_overlap_order():
    image = np.full((30, 40, 3), 60, dtype=np.uint8)
    masks = np.zeros((2, 30, 40), dtype=bool)
    masks[0, 5:20, 5:20] = True
    masks[1, 10:25, 15:35] = True  # overlaps mask 0 in [10:20, 15:20]
    scores = np.array([0.6, 0.9])
    out = overlay_instances(image, masks, scores=scores, alpha=0.5, outline_width=1)
    colors = instance_colors(2)
    # the overlap shows the higher-scoring instance 1 (not black as draw_segmentation_masks)
    visible = masks.copy()
    visible[0] &= ~masks[1]
    expected = image.copy()
    for i in range(2):
        expected[visible[i]] = hand_blend(image[visible[i]], colors[i], 0.5)
        expected[reference_boundary(visible[i])] = colors[i]
    np.testing.assert_array_equal(out, expected)
    assert tuple(out[15, 17]) != (0, 0, 0)


def test_overlay_instances_probability_masks_and_score_threshold():
    image = np.full((30, 40, 3), 60, dtype=np.uint8)
    probs = np.zeros((2, 1, 30, 40), dtype=np.float32)  # Mask R-CNN's (N, 1, H, W)
    probs[0, 0, 2:10, 2:10] = 0.9
    probs[0, 0, 2:10, 10:12] = 0.4  # below the mask threshold
    probs[1, 0, 15:25, 15:25] = 0.8
    out = overlay_instances(image, torch.from_numpy(probs), scores=torch.tensor([0.3, 0.95]),
                            score_threshold=0.5, outline_width=0)
    np.testing.assert_array_equal(out[2:10, 2:12], image[2:10, 2:12])  # instance 0 dropped
    # the kept instance is instance 0 of the kept ones: the first instance colour
    assert tuple(out[20, 20]) == tuple(hand_blend(image[20, 20], instance_colors(1)[0], 0.5))
    kept = overlay_instances(image, probs[1:, 0] > 0.5, scores=[0.95], outline_width=0)
    np.testing.assert_array_equal(out, kept)


def test_keypoints_drawn_only_where_visible():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    keypoints = np.array([[[10, 10, 2], [40, 10, 1], [70, 10, 0], [10, 50, 2]]], dtype=float)
    skeleton = [(0, 1), (1, 2), (0, 3)]
    out = overlay_instances(image, keypoints=keypoints, skeleton=skeleton, labels=[1],
                            sizes=SIZES, show_tags=False)
    color = tuple(instance_colors(1)[0])
    for x, y in ((10, 10), (40, 10), (10, 50)):  # visible joints (v = 2 and v = 1)
        assert tuple(out[y, x]) == color
    assert not out[5:16, 65:76].any()  # the v = 0 joint: nothing drawn around it
    assert tuple(out[10, 25]) == color  # bone 0-1: both ends visible
    assert tuple(out[30, 10]) == color  # bone 0-3
    assert not out[10, 50:62].any()  # bone 1-2 would pass here: its end 2 is not visible
    with pytest.raises(UserError, match="out of range"):
        overlay_instances(image, keypoints=keypoints, skeleton=[(0, 4)])


def test_boxes_and_tags():
    image = np.full((80, 100, 3), 128, dtype=np.uint8)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 75.0]])
    out = overlay_instances(image, boxes=boxes, labels=torch.tensor([1]),
                            scores=torch.tensor([0.934]), class_names=["__background__", "person"],
                            sizes=SIZES)
    color = tuple(instance_colors(1)[0])
    assert tuple(out[50, 20]) == color and tuple(out[75, 45]) == color  # left and bottom edges
    assert tuple(out[50, 45]) == (128, 128, 128)  # inside the box: untouched
    above = out[14:30, 20:70]  # the tag sits above the top edge
    assert (above == color).all(axis=-1).sum() > 50  # its background in the instance colour
    ink = np.abs(above.astype(int) - text_color(color)).sum(axis=-1) < 60  # anti-aliased text
    assert ink.sum() > 30
    no_tags = overlay_instances(image, boxes=boxes, labels=[1], sizes=SIZES, show_tags=False)
    np.testing.assert_array_equal(no_tags[14:29], image[14:29])


def test_text_color_contrasts():
    assert text_color((255, 255, 0)) == (0, 0, 0)
    assert text_color((0, 0, 128)) == (255, 255, 255)


def test_tag_texts():
    assert _tags(2, np.array([1, 3]), np.array([0.934, 0.5]), ["bg", "person"]) == [
        "person 0.93", "3 0.50"]
    assert _tags(1, np.array([7]), None, {7: "cell"}) == ["cell"]
    assert _tags(1, None, np.array([0.25]), None) == ["0.25"]
    assert _tags(1, None, None, None) is None


def test_instance_field_count_mismatch():
    with pytest.raises(UserError, match="disagree"):
        overlay_instances(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8), bool),
                          scores=[0.5])


# ------------------------------------------------------------------------------ panoptic


def test_overlay_panoptic_stuff_things_void():
    image = np.full((24, 30, 3), 90, dtype=np.uint8)
    ids = np.full((24, 30), 1000, dtype=np.int64)  # stuff segment 1000 everywhere ...
    ids[2:10, 2:12] = 7  # thing 7
    ids[12:22, 14:28] = 8  # thing 8
    ids[0:2, 20:30] = 0  # void
    ids[20:24, 0:4] = 4242  # not in segments_info
    categories = [
        {"id": 5, "name": "sky", "isthing": 0, "color": [10, 200, 30]},
        {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    ]
    segments = [{"id": 7, "category_id": 1}, {"id": 1000, "category_id": 5},
                {"id": 8, "category_id": 1}]
    out = overlay_panoptic(image, ids, segments, categories, alpha=0.5, outline_width=1,
                           show_names=False)
    things = instance_colors(2)
    expected = image.copy()
    stuff = ids == 1000
    expected[stuff] = hand_blend(image[stuff], (10, 200, 30), 0.5)  # stuff: no outline
    for k, seg_id in enumerate((7, 8)):
        mask = ids == seg_id
        expected[mask] = hand_blend(image[mask], things[k], 0.5)
        expected[reference_boundary(mask)] = things[k]
    np.testing.assert_array_equal(out, expected)  # void and unlisted ids stay untouched
    rgb_coded = overlay_panoptic(image, id2rgb(ids), segments, categories, outline_width=1,
                                 show_names=False)
    np.testing.assert_array_equal(rgb_coded, out)
    named = overlay_panoptic(image, ids, segments, categories, outline_width=1, show_names=True)
    assert (named != out).any()


def test_region_boxes_against_loop():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 6, (9, 11))
    ids[ids == 4] = 0  # id 4 absent
    boxes = region_boxes(ids, 7)
    for k in range(7):
        ys, xs = np.nonzero(ids == k)
        want = [-1] * 4 if len(xs) == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]
        assert boxes[k].tolist() == want


# ------------------------------------------------------------------------------ legend


def _swatch_column(legend: np.ndarray, x: int) -> list[tuple[int, int, int]]:
    """Centre colours of the runs of non-background pixels down column x (one per swatch)."""
    column = legend[:, x]
    filled = (column != 255).any(axis=1)
    runs, start = [], None
    for y, f in enumerate(list(filled) + [False]):
        if f and start is None:
            start = y
        if not f and start is not None:
            runs.append(tuple(int(v) for v in column[(start + y - 1) // 2]))
            start = None
    return runs


def test_legend_one_swatch_per_class_in_order():
    names = ["background", "aeroplane", "bicycle", "bird", "boat"]
    pal = make_palette(5)
    legend = legend_image(names, pal, swatch=14, padding=6)
    assert _swatch_column(legend, 6 + 7) == [tuple(int(v) for v in c) for c in pal]
    labels = np.array([[4, 1, 255], [1, 4, 4]])
    present = legend_image(names, pal, present=labels, swatch=14, padding=6)
    assert _swatch_column(present, 13) == [tuple(pal[1]), tuple(pal[4])]
    assert present.shape[0] < legend.shape[0]


def test_legend_wraps_into_columns_and_with_legend():
    pal = make_palette(30)
    legend = legend_image([f"c{i}" for i in range(30)], pal, max_height=120)
    assert legend.shape[0] <= 120
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert all(tuple(c) in colours for c in pal)
    overlay = np.zeros((50, 40, 3), dtype=np.uint8)
    both = with_legend(overlay, legend, gap=4)
    assert both.shape == (max(50, legend.shape[0]), 40 + 4 + legend.shape[1], 3)
    np.testing.assert_array_equal(both[:50, :40], overlay)
    np.testing.assert_array_equal(both[: legend.shape[0], 44:], legend)
    assert (both[50:, :40] == 255).all()


def test_nothing_to_draw_leaves_the_image():
    image = np.random.default_rng(6).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    out = overlay_instances(image, torch.zeros(0, 1, 10, 12), torch.zeros(0, 4),
                            torch.zeros(0, dtype=torch.int64), torch.zeros(0), ["bg"],
                            keypoints=torch.zeros(0, 17, 3), skeleton=[(0, 1)])
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(overlay_panoptic(image, np.zeros((10, 12), int), [], []), image)
    np.testing.assert_array_equal(overlay_semantic(image, np.full((10, 12), 255)), image)


def test_enlarge_small_repeats_pixels_up_to_the_minimum_side():
    rgb = np.random.default_rng(3).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    big = enlarge_small(rgb, min_side=256)
    assert big.shape == (280, 448, 3)  # k = ceil(256 / 40) = 7
    np.testing.assert_array_equal(big[::7, ::7], rgb)
    np.testing.assert_array_equal(big[6::7, 6::7], rgb)
    assert enlarge_small(rgb, min_side=40) is rgb
    assert enlarge_small(np.zeros((2, 2, 3), np.uint8)).shape == (16, 16, 3)  # at most 8x


def test_validation_curves_keep_the_headline_figures() -> None:
    from pixelwise.engine.curves import validation_series

    coco = {name: 0.1 * i for i, name in enumerate(("AP", "AP50", "AP75", "APs", "AR100"))}
    records = [
        {"epoch": 1, "val": {"bbox": coco, "segm": coco, "segm_AP": 0.0, "per_class": {}}},
        {"epoch": 1, "val": {"pq": 0.5, "all": {"pq": 0.5, "sq": 0.8, "rq": 0.6, "n": 7},
                             "things": {"pq": 0.4, "n": 4}}},
        {"epoch": 1, "val": {"miou": 0.7, "dice": 0.8, "per_class": {"sky": {"iou": 0.9}}}},
    ]
    assert list(validation_series(records[:1])) == ["bbox/AP", "bbox/AP50", "segm/AP",
                                                    "segm/AP50"]
    assert list(validation_series(records[1:2])) == ["all/pq", "things/pq"]  # pq repeats all/pq
    assert validation_series(records[2:]) == {"miou": [(1.0, 0.7)], "dice": [(1.0, 0.8)]}
