import torch

from pixelwise.ops.labels import argmax_labels


def test_argmax_labels_equals_argmax_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 5, 9, 7), generator=g).float()  # many equal maxima
    for dim in range(scores.dim()):
        got = argmax_labels(scores, dim)
        assert got.dtype == torch.int64
        assert torch.equal(got, scores.argmax(dim))
    # by hand: the first of equal maxima
    assert argmax_labels(torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]]), 1).tolist() == [1, 0]
