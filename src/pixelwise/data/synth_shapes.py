"""Geometry of the synthetic things: polygons for shapes and stick figures, cell layouts.

Shapes are described by polygons in COCO pixel coordinates (pixel (r, c) covers [c, c+1) x
[r, r+1)) and rasterised by pycocotools itself, so a polygon written to a COCO file decodes to
exactly the mask that was drawn. Coordinates are rounded to 2 decimals *before* rasterising for the
same reason (the JSON holds the rounded values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils

from pixelwise.data.synth_textures import smooth_noise

# The 17 COCO person keypoints, in COCO order.
COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# COCO's person skeleton, 1-based keypoint indices (as in person_keypoints_*.json).
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip

Polygon = list[float]  # flat [x0, y0, x1, y1, ...], at least 3 points


def _flat(points: np.ndarray) -> Polygon:
    """(P, 2) xy points -> flat polygon rounded to 2 decimals (what the JSON will hold)."""
    return [round(float(v), 2) for v in points.reshape(-1)]  # (P, 2) -> (2P,)


def rasterize(polygons: list[Polygon], height: int, width: int) -> np.ndarray:
    """Union of `polygons` as a (H, W) bool mask, rasterised exactly as pycocotools decodes them."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
    return mask_utils.decode(rle).astype(bool)


def ellipse(center: np.ndarray, axes: tuple[float, float], angle: float) -> Polygon:
    """A rotated ellipse as a polygon (12-48 vertices, about one per 3 px of perimeter)."""
    a, b = axes
    n = int(np.clip(np.pi * (a + b) / 1.5, 12, 48))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    local = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)  # (n, 2)
    return _flat(center + local @ _rotation(angle).T)


def rectangle(center: np.ndarray, half: tuple[float, float], angle: float) -> Polygon:
    """A rotated rectangle with half-sizes `half` = (hx, hy)."""
    hx, hy = half
    local = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])  # (4, 2)
    return _flat(center + local @ _rotation(angle).T)


def triangle(rng: np.random.Generator, center: np.ndarray, radius: float) -> Polygon:
    """A random, not too thin triangle around `center` (vertex angles jittered from 120 deg)."""
    angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.35, 0.35, 3)
    radii = radius * rng.uniform(0.75, 1.0, 3)
    local = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)  # (3, 2)
    return _flat(center + local)


def capsule(p: np.ndarray, q: np.ndarray, half_width: float) -> Polygon:
    """A thick line segment p-q with round caps (a convex polygon, 7 points per cap)."""
    d = q - p
    angle = np.arctan2(d[1], d[0])
    t = np.linspace(-np.pi / 2, np.pi / 2, 7)
    cap_q = q + half_width * np.stack([np.cos(angle + t), np.sin(angle + t)], axis=1)  # (7, 2)
    cap_p = p + half_width * np.stack([np.cos(angle + np.pi + t), np.sin(angle + np.pi + t)], 1)
    return _flat(np.concatenate([cap_q, cap_p]))


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


@dataclass
class StickFigure:
    """A frontal stick figure: keypoints and body parts as polygons.

    keypoints: (17, 2) xy in COCO order (the person's left is on the image's right).
    parts: part name ("shirt", "trousers", "skin") -> polygons; every keypoint lies inside the
    union of the parts with a margin of >= 1 px, so its pixel belongs to the figure's mask.
    """

    keypoints: np.ndarray
    parts: dict[str, list[Polygon]]
    eyes: np.ndarray  # (2, 2) xy of the eye dots (painted, not labelled separately)
    head_radius: float


def stick_figure(rng: np.random.Generator, hip: np.ndarray, height: float) -> StickFigure:
    """A random pose of a stick figure standing on `hip` (mid-hip xy), about `height` px tall."""
    h = height
    tilt = rng.uniform(-0.3, 0.3)
    up = np.array([np.sin(tilt), -np.cos(tilt)])
    right = np.array([np.cos(tilt), np.sin(tilt)])  # image right = the person's left
    down = -up

    def width(fraction: float) -> float:
        return max(fraction * h, 1.25)

    neck = hip + up * 0.30 * h
    head = neck + up * 0.11 * h
    r_head = max(0.07 * h, 2.5)
    # ears as far out as keeps their pixel inside the head polygon (inscribed radius >= 0.96 r)
    ear = min(0.8 * r_head, 0.95 * r_head - 0.8)
    kp = {
        "nose": head - up * 0.1 * r_head,
        "left_eye": head + up * 0.3 * r_head + right * 0.38 * r_head,
        "right_eye": head + up * 0.3 * r_head - right * 0.38 * r_head,
        "left_ear": head + up * 0.15 * ear + right * 0.98 * ear,
        "right_ear": head + up * 0.15 * ear - right * 0.98 * ear,
        "left_shoulder": neck + right * 0.11 * h,
        "right_shoulder": neck - right * 0.11 * h,
        "left_hip": hip + right * 0.075 * h,
        "right_hip": hip - right * 0.075 * h,
    }
    for side, sign in (("left", 1.0), ("right", -1.0)):
        # angles measured from "down", positive = away from the body's midline
        def direction(a: float, s: float = sign) -> np.ndarray:
            return np.cos(a) * down + np.sin(a) * s * right

        a = rng.uniform(0.15, 2.6)
        elbow = kp[f"{side}_shoulder"] + direction(a) * 0.17 * h
        kp[f"{side}_elbow"] = elbow
        kp[f"{side}_wrist"] = elbow + direction(a + rng.uniform(-0.7, 1.9)) * 0.15 * h
        c = rng.uniform(-0.15, 0.5)
        knee = kp[f"{side}_hip"] + direction(c) * 0.23 * h
        kp[f"{side}_knee"] = knee
        kp[f"{side}_ankle"] = knee + direction(c + rng.uniform(-0.45, 0.35)) * 0.22 * h

    t = width(0.025)
    torso = np.stack(
        [kp["left_shoulder"] + right * t, kp["right_shoulder"] - right * t,
         kp["right_hip"] - right * t, kp["left_hip"] + right * t]
    )  # fmt: skip
    shirt = [_flat(torso)]
    trousers = [capsule(kp["left_hip"], kp["right_hip"], width(0.045))]
    for side in ("left", "right"):
        shirt.append(capsule(kp[f"{side}_shoulder"], kp[f"{side}_elbow"], width(0.032)))
        shirt.append(capsule(kp[f"{side}_elbow"], kp[f"{side}_wrist"], width(0.028)))
        trousers.append(capsule(kp[f"{side}_hip"], kp[f"{side}_knee"], width(0.045)))
        trousers.append(capsule(kp[f"{side}_knee"], kp[f"{side}_ankle"], width(0.038)))
    skin = [capsule(neck, head, width(0.03)), ellipse(head, (r_head, r_head), 0.0)]
    keypoints = np.stack([kp[name] for name in COCO_KEYPOINT_NAMES])  # (17, 2)
    eyes = np.stack([kp["left_eye"], kp["right_eye"]])  # (2, 2)
    return StickFigure(
        keypoints, {"trousers": trousers, "shirt": shirt, "skin": skin}, eyes, r_head
    )


@dataclass
class CellLayout:
    """A partition of the image into touching cells and background.

    labels: (H, W) int32, 0 = background, k = cell k (1-based, in no particular order).
    gap: (H, W) float32 weighted-distance margin to the nearest other cell (small on membranes).
    depth: (H, W) float32 weighted distance to the own cell centre (0 at the centre, 1 on the rim).
    """

    labels: np.ndarray
    gap: np.ndarray
    depth: np.ndarray
    count: int


def cell_layout(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> CellLayout:
    """Touching cells as a multiplicatively weighted Voronoi diagram of jittered grid seeds.

    One seed per `spacing`-px grid square (10% left empty), radius 0.45-0.7 spacing, so neighbours
    usually touch. Each pixel compares only the seeds of the 3 x 3 grid squares around it (a seed
    farther away cannot reach it), which keeps the work O(9 H W) instead of O(cells H W).
    """
    h, w = shape
    ny, nx = int(np.ceil(h / spacing)) + 2, int(np.ceil(w / spacing)) + 2  # one square of margin
    gy, gx = np.mgrid[0:ny, 0:nx]
    cy = (gy - 0.5 + rng.uniform(-0.35, 0.35, (ny, nx))) * spacing  # seed centres, px
    cx = (gx - 0.5 + rng.uniform(-0.35, 0.35, (ny, nx))) * spacing
    radius = spacing * rng.uniform(0.45, 0.7, (ny, nx))
    present = rng.random((ny, nx)) >= 0.1
    wobble = 0.08 * _wobble(rng, shape, spacing)
    # empty squares: a seed far away, so that it never wins
    cy = np.where(present, cy, -1e4).astype(np.float32).ravel()  # (ny, nx) -> (ny*nx,)
    cx = cx.astype(np.float32).ravel()
    inv_r2 = (1.0 / radius**2).astype(np.float32).ravel()

    py = np.arange(h, dtype=np.float32)[:, None] + 0.5  # (H, 1) pixel centres
    px = np.arange(w, dtype=np.float32)[None, :] + 0.5  # (1, W)
    square = (py / spacing).astype(np.int64) * nx + (px / spacing).astype(np.int64)  # (H, W)
    square += nx + 1  # the margin square
    best = np.full(shape, np.inf, dtype=np.float32)  # squared weighted distances
    second = np.full(shape, np.inf, dtype=np.float32)
    owner = np.zeros(shape, dtype=np.int64)
    for offset in (dy * nx + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
        seed = square + offset  # (H, W) flat index of a neighbouring square's seed
        d = ((py - cy[seed]) ** 2 + (px - cx[seed]) ** 2) * inv_r2[seed]
        closer = d < best
        second = np.where(closer, best, np.minimum(second, d))
        owner = np.where(closer, seed, owner)
        best = np.minimum(best, d)
    best, second = np.sqrt(best) + wobble, np.sqrt(second) + wobble
    inside = best < 1.0
    used = np.zeros(ny * nx, dtype=bool)
    used[owner[inside]] = True
    new_id = np.cumsum(used).astype(np.int32)  # seed index -> 1..count, in grid order
    labels = np.where(inside, new_id[owner], 0).astype(np.int32)
    gap = np.minimum(second - best, 10.0).astype(np.float32)
    return CellLayout(labels, gap, np.minimum(best, 2.0).astype(np.float32), int(used.sum()))


def _wobble(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    grid = (shape[0] / spacing * 3 + 2, shape[1] / spacing * 3 + 2)
    return smooth_noise(rng, shape, grid)
