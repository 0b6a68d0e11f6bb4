"""Data loading that a resumed or distributed run reproduces exactly.

* `EpochSampler`: torch's `DistributedSampler` (a permutation of (seed, epoch), split across
  ranks) that can start part-way through an epoch and yields `(epoch, index)` keys.
* `SeededDataset`: seeds the random generators from (seed, epoch, index) around each sample, so
  random augmentation is the same whatever the number of workers or processes, and after resume.
* `ShardSampler`: evaluation split across ranks without the padding `DistributedSampler` adds
  (padding would count some images twice in the metrics).
* `ReplaceBadSamples` / `DropBadSamples`: the `--skip-bad` policy for datasets that read a bad
  sample as None (`skip_bad=True`). Training replaces it by the next good sample, as
  MMDetection does, so every batch keeps its size and DDP ranks stay in step; evaluation drops
  it (a replacement would count an image twice in the metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pixelwise.data.check import skip_none
from pixelwise.data.wrapper import DatasetWrapper
from pixelwise.engine.seed import derive_seed, seeded, worker_init_fn
from pixelwise.errors import UserError


class SeededDataset(Dataset):
    """Wraps a map-style dataset; item `(epoch, index)` is `dataset[index]` computed with the
    random generators seeded by `(seed, epoch, index)`. A plain `index` means epoch 0.

    The generators are restored after each item, so the caller's random streams are unchanged.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with seeded(derive_seed(self.seed, epoch, index)):
            return self.dataset[index]


class ReplaceBadSamples(DatasetWrapper):
    """Item `i` of `dataset`, or when that is None (a bad sample the dataset logged) the first
    good one after it (wrapping around): deterministic, so resume and DDP are unaffected.
    Other attributes are the wrapped dataset's."""

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for offset in range(n):
            sample = self.dataset[(index + offset) % n]
            if sample is not None:
                return sample
        raise UserError("every sample of the training set is bad (see `pixelwise data check`)")


class DropBadSamples:
    """Collate function for evaluation: `collate` of the batch without its None samples; None
    for a batch that held only bad ones (evaluation loops skip it). Picklable for workers."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list) -> Any:
        kept = skip_none(batch)
        return self.collate(kept) if kept else None


class EpochSampler(DistributedSampler):
    """`DistributedSampler` that yields `(epoch, index)` and can skip the epoch's first samples.

    Call `set_epoch(epoch, skip=k)` before iterating to drop this rank's first `k` samples (the
    `k / batch` batches already trained before a checkpoint).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler[int]):
    """Indices `rank, rank + world, rank + 2 world, ...` in order: every index exactly once over
    all ranks."""

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    *,
    sampler: Sampler,
    batch_size: int,
    collate_fn: Callable[[list], Any] | None,
    workers: int,
    seed: int,
    drop_last: bool,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with its own seeded generator (an unseeded loader draws its workers' base seed
    from the global torch RNG, which would change the training stream)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        worker_init_fn=worker_init_fn if workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
