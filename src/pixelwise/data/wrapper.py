"""`DatasetWrapper`: the base of datasets that wrap another one (ClassMix, CopyPaste,
ReplaceBadSamples)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


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
