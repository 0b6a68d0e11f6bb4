"""`DatasetWrapper`: the base of datasets that wrap another one (ClassMix, CopyPaste,
ReplaceBadSamples); `pick_partner`: the second item that ClassMix and CopyPaste mix in."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


def pick_partner(dataset: Dataset, index: int, p: float) -> tuple[Any, Any]:
    """`dataset[index]` and, with probability `p`, another random item of `dataset` to mix into
    it (None: no mixing this time, a bad (None) sample, or a dataset of one item)."""
    sample = dataset[index]
    n = len(dataset)  # type: ignore[arg-type]
    if sample is None or n < 2 or float(torch.rand(())) >= p:
        return sample, None
    other = int(torch.randint(n - 1, ()))
    other += other >= index  # any item but this one
    return sample, dataset[other]


class DatasetWrapper(Dataset):
    """A dataset over `dataset`: the same length, and the wrapped dataset's other attributes
    (categories, annotation_file, ...) reachable through it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
