"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (its module-scoped fixtures included), for
    modules that train small models: on a shared 2-core machine a second thread mostly waits for
    a core, and R-CNN backward passes run up to ~10x slower with two. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_threads():
    """Two torch threads for a test of work split between threads (`pixelwise.ops.cpu_threads`),
    whatever the machine has. Use with ``pytestmark = pytest.mark.usefixtures("two_threads")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
