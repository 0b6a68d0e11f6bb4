"""A small thread pool for splitting one CPU op's independent work between torch's threads.

Some torchvision CPU kernels (RoIAlign, NMS) run on one thread whatever `torch.get_num_threads`
says. Where their work splits into independent parts (RoIs, images), `run_split` runs the parts
on a pool of threads: the kernels release the GIL, so the parts run at the same time, and each
part's result is exactly what the kernel gives it alone. Written here because neither torch nor
torchvision offers it; `concurrent.futures` does the pooling.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

Result = TypeVar("Result")

_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def executor(workers: int) -> ThreadPoolExecutor:
    """One pool per process (a forked child must not reuse its parent's threads), rebuilt when
    the number of workers changes (the old one's idle threads are let go)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, "pixelwise_cpu"))
        return _pool[2]


def parts_for(items: int, min_per_part: int) -> int:
    """How many parts `items` independent items are worth splitting into: one per torch thread,
    each with at least `min_per_part` items (1: not worth a split)."""
    return max(1, min(torch.get_num_threads(), items // max(1, min_per_part)))


def run_split(fn: Callable[[Any], Result], chunks: Sequence[Any]) -> list[Result]:
    """fn on every chunk, the first on this thread and the others on the pool, in order. The pool
    threads run without autograd (grad mode is per thread; callers inside an autograd Function
    or under no_grad need none) and with the caller's CPU autocast setting (also per thread:
    torchvision's ops cast bfloat16 inputs to float32 only under autocast)."""
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu")

    def untracked(chunk: Any) -> Result:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return fn(chunk)
    if len(chunks) < 2:
        return [fn(c) for c in chunks]
    futures = [executor(len(chunks) - 1).submit(untracked, c) for c in chunks[1:]]
    return [fn(chunks[0]), *(f.result() for f in futures)]
