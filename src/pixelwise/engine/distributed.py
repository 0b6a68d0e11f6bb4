"""Distributed data parallel (DDP) set-up from the environment `torchrun` provides.

`torchrun --nproc_per_node=N -m pixelwise train ...` starts N processes with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `setup` joins the process group (NCCL on CUDA, gloo
on CPU). Without those variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when available (the process's local GPU under torchrun), else CPU."""
    from pixelwise.errors import UserError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"device {device} asked for, but {torch.cuda.device_count()} GPU(s) "
                            "are visible: start at most one process per GPU (torchrun "
                            "--nproc_per_node), or pass --device cpu")
    return device


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); return this process's
    `DistInfo`. Safe to call when the group already exists."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.debug("rank %d/%d joined (%s) on %s", rank, world_size, backend, device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes; returns a new tensor on `tensor`'s device (the input
    itself when not distributed)."""
    if not is_enabled():
        return tensor
    work = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a floating-point `tensor` over all processes."""
    if not is_enabled():
        return tensor
    return all_reduce_sum(tensor) / get_world_size()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's boolean, on every rank."""
    if not is_enabled():
        return flag
    work = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(work, src=0)
    return bool(work.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (e.g. per-image detections for COCO
    evaluation); `[obj]` when not distributed. Objects travel pickled in memory between the
    processes of one run (torch's `all_gather_object`); nothing is written to disk."""
    if not is_enabled():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
