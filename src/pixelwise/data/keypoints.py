"""Keypoint schema: names, skeleton, left/right flip pairs and OKS sigmas of one category.

A COCO keypoint category looks like::

    {"id": 1, "name": "person",
     "keypoints": ["nose", "left_eye", ...],          # K names
     "skeleton": [[16, 14], ...],                      # 1-based pairs (COCO's convention)
     "flip_pairs": [["left_eye", "right_eye"], ...],   # optional (pixelwise extension)
     "sigmas": [0.026, ...]}                           # optional (pixelwise extension)

`KeypointSchema` stores everything 0-based. Flip pairs, when not given, are inferred from the
names: ``left_X`` pairs with ``right_X`` (case-insensitive, any separator: ``leftEye`` /
``rightEye`` and ``left-eye`` / ``right-eye`` pair too). OKS sigmas are, in this order: the
category's ``sigmas`` list; COCO's 17 person sigmas when the names are the 17 COCO person
keypoints in COCO's order; otherwise the uniform `DEFAULT_SIGMA` with a logged warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

COCO_PERSON_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# The per-keypoint OKS sigmas pycocotools' COCOeval uses for the 17 COCO person keypoints.
COCO_PERSON_SIGMAS: tuple[float, ...] = tuple(
    v / 10.0
    for v in (
        0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72,
        0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89,
    )
)  # fmt: skip

# COCO's person skeleton (0-based; the json stores it 1-based).
COCO_PERSON_SKELETON: tuple[tuple[int, int], ...] = tuple(
    (a - 1, b - 1)
    for a, b in (
        (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
        (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
    )
)  # fmt: skip

# Uniform OKS sigma for schemas that give none: the mean of COCO's 17 person sigmas (0.0669),
# rounded. A keypoint with this sigma is scored like an "average" COCO body joint.
DEFAULT_SIGMA = 0.067


def infer_flip_pairs(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Pairs (i, j), 0-based with i < j, of names ``left<rest>`` / ``right<rest>``.

    Matching is case-insensitive on the whole name; the rest must be equal (so ``left_eye`` pairs
    with ``right_eye`` and ``LeftHand`` with ``RightHand``). Unpaired sides are not flipped.
    """
    lowered = [n.lower() for n in names]
    index = {n: i for i, n in enumerate(lowered)}
    pairs = []
    for i, name in enumerate(lowered):
        if name.startswith("left") and len(name) > 4:
            j = index.get("right" + name[4:])
            if j is not None:
                pairs.append((min(i, j), max(i, j)))
            else:
                logger.debug("keypoint %r has no right-hand partner; it is not flipped", names[i])
    return tuple(sorted(pairs))


def default_sigmas(names: Sequence[str], where: str = "keypoint schema") -> tuple[float, ...]:
    """OKS sigmas for a schema that gives none: COCO's 17 for the COCO person keypoints (same
    names, same order), otherwise `DEFAULT_SIGMA` for every keypoint, with a logged warning."""
    if tuple(names) == COCO_PERSON_KEYPOINTS:
        return COCO_PERSON_SIGMAS
    logger.warning(
        "%s: no 'sigmas' given; using the uniform OKS sigma %.3f for all %d keypoints",
        where,
        DEFAULT_SIGMA,
        len(names),
    )
    return (DEFAULT_SIGMA,) * len(names)


@dataclass(frozen=True)
class KeypointSchema:
    """The keypoints of one category. All indices are 0-based.

    names: K keypoint names; skeleton: pairs drawn as bones; flip_pairs: pairs swapped by a
    horizontal flip (None: inferred from left_*/right_* names); sigmas: K per-keypoint OKS
    sigmas, COCOeval's ``kpt_oks_sigmas`` (None: COCO's for the COCO person names, otherwise
    `DEFAULT_SIGMA` with a warning). Validated on construction (`UserError` naming the problem).
    """

    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()
    flip_pairs: tuple[tuple[int, int], ...] | None = None
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Normalise containers (lists from json) to tuples so the schema stays hashable.
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "skeleton", tuple(tuple(p) for p in self.skeleton))
        flip_pairs = infer_flip_pairs(names) if self.flip_pairs is None else self.flip_pairs
        object.__setattr__(self, "flip_pairs", tuple(tuple(p) for p in flip_pairs))
        sigmas = default_sigmas(names) if self.sigmas is None else self.sigmas
        object.__setattr__(self, "sigmas", tuple(float(s) for s in sigmas))
        self.validate()

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def validate(self, where: str = "keypoint schema") -> None:
        """Raise `UserError` when names, skeleton, flip pairs or sigmas are inconsistent."""
        problem = _first_problem(self.names, self.skeleton, self.flip_pairs, self.sigmas)
        if problem:
            raise UserError(f"{where}: {problem}")

    def flip_permutation(self) -> list[int]:
        """perm with perm[i] = the keypoint that becomes keypoint i after a horizontal flip.

        After flipping an image, ``flipped_keypoints[:, i] = keypoints[:, perm[i]]`` (length K).
        """
        perm = list(range(self.num_keypoints))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    @classmethod
    def from_coco_category(cls, cat: dict[str, Any], *, where: str | None = None) -> KeypointSchema:
        """Build and validate the schema of a COCO category dict (see the module docstring).

        `where` names the source in error messages (default: the category's name and id).
        """
        where = where or f"category {cat.get('name', '?')!r} (id {cat.get('id', '?')})"
        names = cat.get("keypoints")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}: 'keypoints' must be a non-empty list of names")
        k = len(names)

        skeleton = []
        for pair in cat.get("skeleton") or []:
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(i, int) and 1 <= i <= k for i in pair)
            ):
                raise UserError(
                    f"{where}: skeleton pair {pair} is not two 1-based indices in 1..{k}"
                )
            skeleton.append((pair[0] - 1, pair[1] - 1))

        if "flip_pairs" in cat:
            flip_pairs = [_parse_flip_pair(p, names, where) for p in cat["flip_pairs"] or []]
        else:
            flip_pairs = list(infer_flip_pairs(names))

        if cat.get("sigmas") is not None:
            sigmas = cat["sigmas"]
            if not isinstance(sigmas, list) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in sigmas
            ):
                raise UserError(f"{where}: 'sigmas' must be a list of numbers")
            if len(sigmas) != k:
                raise UserError(f"{where}: {len(sigmas)} sigmas for {k} keypoints")
        else:
            sigmas = default_sigmas(names, where)

        fields = (tuple(names), tuple(skeleton), tuple(flip_pairs), tuple(float(s) for s in sigmas))
        problem = _first_problem(*fields)
        if problem:
            raise UserError(f"{where}: {problem}")
        return cls(*fields)

    def to_coco_category(self) -> dict[str, Any]:
        """The category fields (keypoints, 1-based skeleton, flip_pairs by name, sigmas)."""
        return {
            "keypoints": list(self.names),
            "skeleton": [[a + 1, b + 1] for a, b in self.skeleton],
            "flip_pairs": [[self.names[a], self.names[b]] for a, b in self.flip_pairs],
            "sigmas": list(self.sigmas),
        }

    @classmethod
    def coco_person(cls) -> KeypointSchema:
        """COCO's 17-keypoint person schema (skeleton, inferred flip pairs, COCO sigmas)."""
        return cls(
            names=COCO_PERSON_KEYPOINTS,
            skeleton=COCO_PERSON_SKELETON,
            flip_pairs=infer_flip_pairs(COCO_PERSON_KEYPOINTS),
            sigmas=COCO_PERSON_SIGMAS,
        )


def _parse_flip_pair(pair: Any, names: list[str], where: str) -> tuple[int, int]:
    """A flip pair given as two keypoint names or two 1-based indices (like COCO's skeleton)."""
    k = len(names)
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise UserError(f"{where}: flip pair {pair!r} is not a pair")
    if all(isinstance(p, str) for p in pair):
        missing = [p for p in pair if p not in names]
        if missing:
            raise UserError(
                f"{where}: flip pair {list(pair)} names unknown keypoint {missing[0]!r}"
            )
        return names.index(pair[0]), names.index(pair[1])
    if all(isinstance(p, int) and not isinstance(p, bool) for p in pair):
        if not all(1 <= p <= k for p in pair):
            raise UserError(f"{where}: flip pair {list(pair)} is not two 1-based indices in 1..{k}")
        return pair[0] - 1, pair[1] - 1
    raise UserError(f"{where}: flip pair {pair!r} must be two names or two 1-based indices")


def _first_problem(
    names: tuple[str, ...],
    skeleton: tuple[tuple[int, int], ...],
    flip_pairs: tuple[tuple[int, int], ...],
    sigmas: tuple[float, ...],
) -> str | None:
    """The first inconsistency of a schema's fields as a message, or None when valid."""
    k = len(names)
    if k == 0:
        return "no keypoint names"
    if len(set(names)) != k:
        return f"duplicate keypoint names {sorted({n for n in names if names.count(n) > 1})}"
    for kind, pairs in (("skeleton", skeleton), ("flip_pairs", flip_pairs)):
        for pair in pairs:
            if len(pair) != 2 or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in pair
            ):
                return f"{kind} pair {list(pair)} is out of range for {k} keypoints"
    seen: set[int] = set()
    for a, b in flip_pairs:
        if a == b:
            return f"flip pair ({a}, {b}) pairs a keypoint with itself"
        if a in seen or b in seen:
            return f"keypoint {names[a if a in seen else b]!r} is in two flip pairs"
        seen.update((a, b))
    if len(sigmas) != k:
        return f"{len(sigmas)} sigmas for {k} keypoints (one sigma per keypoint)"
    if not all(math.isfinite(s) and s > 0 for s in sigmas):
        return f"sigmas must be positive finite numbers, got {list(sigmas)}"
    return None
