"""KeypointSchema: COCO categories, flip pairs, OKS sigmas, validation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pycocotools.cocoeval import Params

from pixelwise.data.keypoints import (
    COCO_PERSON_KEYPOINTS,
    COCO_PERSON_SIGMAS,
    DEFAULT_SIGMA,
    KeypointSchema,
    infer_flip_pairs,
)
from pixelwise.errors import UserError

# COCO's person category as in person_keypoints_*.json (skeleton 1-based).
COCO_PERSON_CATEGORY = {
    "id": 1,
    "name": "person",
    "supercategory": "person",
    "keypoints": list(COCO_PERSON_KEYPOINTS),
    "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                 [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5],
                 [4, 6], [5, 7]],
}


def test_coco_person_sigmas_are_pycocotools():
    expected = Params(iouType="keypoints").kpt_oks_sigmas
    schema = KeypointSchema.from_coco_category(COCO_PERSON_CATEGORY)
    np.testing.assert_array_equal(np.array(schema.sigmas), expected)
    np.testing.assert_array_equal(np.array(COCO_PERSON_SIGMAS), expected)


def test_coco_person_skeleton_zero_based_and_flip_pairs():
    schema = KeypointSchema.from_coco_category(COCO_PERSON_CATEGORY)
    assert schema.num_keypoints == 17
    assert schema.skeleton[0] == (15, 13)  # [16, 14] 1-based
    assert schema.skeleton == tuple((a - 1, b - 1) for a, b in COCO_PERSON_CATEGORY["skeleton"])
    # nose (0) stays; left_eye (1) <-> right_eye (2), ..., left_ankle (15) <-> right_ankle (16)
    assert schema.flip_pairs == tuple((i, i + 1) for i in range(1, 17, 2))
    perm = schema.flip_permutation()
    assert perm == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert schema == KeypointSchema.coco_person()


def test_flip_pairs_inferred_from_names_any_case_and_separator():
    names = ["head", "LeftHand", "left-foot", "rightHand", "right-foot", "left_tail", "centre"]
    # left_tail has no right partner: it maps to itself
    assert infer_flip_pairs(names) == ((1, 3), (2, 4))
    schema = KeypointSchema(names, sigmas=[0.05] * 7)
    assert schema.flip_permutation() == [0, 3, 4, 1, 2, 5, 6]


@pytest.mark.parametrize(
    "given, pairs",
    {
        "names": ([["a", "c"]], ((0, 2),)),
        "one_based": ([[1, 3]], ((0, 2),)),
        "empty_disables_inference": ([], ()),
    }.values(),
    ids=["names", "one_based", "empty_disables_inference"],
)
def test_flip_pairs_given_in_category(given, pairs):
    cat = {"id": 4, "name": "x", "keypoints": ["a", "left_b", "c", "right_b"],
           "flip_pairs": given, "sigmas": [0.1] * 4}
    schema = KeypointSchema.from_coco_category(cat)
    assert schema.flip_pairs == pairs


def test_custom_sigmas_used():
    cat = {"id": 2, "name": "hand", "keypoints": ["a", "b", "c"], "sigmas": [0.01, 0.2, 1]}
    assert KeypointSchema.from_coco_category(cat).sigmas == (0.01, 0.2, 1.0)


def test_default_sigma_with_warning(caplog):
    cat = {"id": 2, "name": "hand", "keypoints": ["a", "b", "c"]}
    with caplog.at_level(logging.WARNING, logger="pixelwise.data.keypoints"):
        schema = KeypointSchema.from_coco_category(cat)
    assert schema.sigmas == (DEFAULT_SIGMA,) * 3
    assert "no 'sigmas'" in caplog.text and "'hand'" in caplog.text


def test_coco_names_in_other_order_get_default_sigmas(caplog):
    names = list(COCO_PERSON_KEYPOINTS)
    names[1], names[2] = names[2], names[1]
    with caplog.at_level(logging.WARNING):
        schema = KeypointSchema.from_coco_category({"id": 1, "name": "p", "keypoints": names})
    assert schema.sigmas == (DEFAULT_SIGMA,) * 17


BAD_CATEGORIES = {
    "sigmas_length": ({"sigmas": [0.1, 0.1]}, "2 sigmas for 3 keypoints"),
    "sigma_negative": ({"sigmas": [0.1, -0.1, 0.1]}, "positive"),
    "sigmas_not_numbers": ({"sigmas": ["a", 0.1, 0.1]}, "list of numbers"),
    "skeleton_zero": ({"skeleton": [[0, 1]]}, "skeleton pair [0, 1]"),
    "skeleton_too_big": ({"skeleton": [[1, 4]]}, "skeleton pair [1, 4]"),
    "flip_unknown_name": ({"flip_pairs": [["a", "z"]]}, "unknown keypoint 'z'"),
    "flip_index_range": ({"flip_pairs": [[1, 9]]}, "1-based indices in 1..3"),
    "flip_twice": ({"flip_pairs": [["a", "b"], ["b", "c"]]}, "in two flip pairs"),
    "flip_self": ({"flip_pairs": [["a", "a"]]}, "with itself"),
    "no_names": ({"keypoints": []}, "non-empty list"),
    "duplicate_names": ({"keypoints": ["a", "a", "c"]}, "duplicate keypoint names"),
}


@pytest.mark.parametrize("change, message", BAD_CATEGORIES.values(), ids=BAD_CATEGORIES.keys())
def test_invalid_category_is_a_user_error_naming_the_problem(change, message):
    cat = {"id": 9, "name": "thing", "keypoints": ["a", "b", "c"], "sigmas": [0.1] * 3, **change}
    with pytest.raises(UserError, match="'thing'") as info:
        KeypointSchema.from_coco_category(cat)
    assert message in str(info.value)


def test_direct_construction_validates():
    with pytest.raises(UserError, match="out of range"):
        KeypointSchema(["a", "b"], skeleton=[(0, 2)], sigmas=[0.1, 0.1])
    with pytest.raises(UserError, match="1 sigmas for 2 keypoints"):
        KeypointSchema(["a", "b"], sigmas=[0.1])


def test_to_coco_category_round_trip():
    cat = {"id": 3, "name": "bird", "keypoints": ["beak", "left_wing", "right_wing", "tail"],
           "skeleton": [[1, 2], [1, 3], [1, 4]], "sigmas": [0.03, 0.08, 0.08, 0.1]}
    schema = KeypointSchema.from_coco_category(cat)
    again = KeypointSchema.from_coco_category({"id": 3, "name": "bird",
                                               **schema.to_coco_category()})
    assert again == schema
    assert schema.to_coco_category()["skeleton"] == cat["skeleton"]
    assert schema.to_coco_category()["flip_pairs"] == [["left_wing", "right_wing"]]


def test_flip_permutation_is_an_involution():
    schema = KeypointSchema.coco_person()
    perm = schema.flip_permutation()
    assert [perm[p] for p in perm] == list(range(17))
    names = [schema.names[p] for p in perm]
    assert names[1] == "right_eye" and names[2] == "left_eye" and names[0] == "nose"
