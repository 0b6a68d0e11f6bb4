"""Seeds, deterministic mode and random-number-generator states.

Randomness in a run comes from three places, each made a function of the seed:

* the model's own ops (dropout): the global torch RNG, seeded once; its state is saved in the
  checkpoint and restored on resume (all DDP ranks share the seed, hence the state);
* the order of samples: `pixelwise.engine.loader.EpochSampler`, a permutation of (seed, epoch);
* data augmentation: `pixelwise.engine.loader.SeededDataset` seeds every sample from
  (seed, epoch, index), so it does not depend on workers, ranks or where a run was resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_MASK63 = (1 << 63) - 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and NumPy's global generator."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, index); distinct parts give distinct seeds.

    A hand-written mix (splitmix64 steps) rather than `hash()`, which is salted per process for
    strings and would not be reproducible across ranks and runs.
    """
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & _MASK63


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch (CPU), `random` and NumPy seeded by `seed`, then restore their
    previous states, so the caller's random streams are untouched."""
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        # the CPU generator only: torch.manual_seed would also reseed (and not restore) the
        # CUDA generators, and queues that call with a formatted stack (~0.4 ms a sample)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker start: seed `random` and NumPy from the worker's torch seed (which the
    loader derives from its seeded generator), as torch's reproducibility notes recommend."""
    worker_seed = torch.initial_seed() % (1 << 32)
    random.seed(worker_seed)
    np.random.seed(worker_seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Use deterministic algorithms inside the block (restoring the previous settings after).

    On CUDA, ops without a deterministic kernel warn instead of failing (`warn_only=True`), and
    cuBLAS gets the workspace setting it needs (effective if CUDA was not initialised yet).
    """
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
        torch.backends.cudnn.benchmark = before[3]


def get_rng_state() -> dict[str, Any]:
    """The global generators' states: torch CPU (uint8 tensor), CUDA (one per device), Python's
    `random` and NumPy's (JSON-ready lists)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d; not restored",
                len(cuda_states), torch.cuda.device_count(),
            )
