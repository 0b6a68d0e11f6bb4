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


def test_the_metrics_do_not_import_torchvision() -> None:
    """`pixelwise.ops.labels` is light: the metrics that use it load without torchvision (0.8 s of
    start-up); the package's RoIAlign names still load on first use."""
    import subprocess
    import sys

    code = ("import sys, pixelwise.metrics.semantic; assert 'torchvision' not in sys.modules; "
            "from pixelwise.ops import parallel_roi_align; assert 'torchvision' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
