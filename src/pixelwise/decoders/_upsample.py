"""Resolving a decoder's `upsample` option: one name for every stage, or one per stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pixelwise.errors import UserError, unknown_name
from pixelwise.upsample import UPSAMPLERS

UpsampleArg = str | Callable[..., nn.Module] | Sequence[str | Callable[..., nn.Module]]


def per_stage(
    upsample: UpsampleArg, stages: int, where: str
) -> list[str | Callable[..., nn.Module]]:
    """`upsample` as a list of `stages` names/callables; names are checked against UPSAMPLERS."""
    if isinstance(upsample, str) or callable(upsample):
        names = [upsample] * stages
    else:
        names = list(upsample)
        if len(names) == 1:
            names = names * stages
        if len(names) != stages:
            raise UserError(
                f"{where}: upsample lists {len(names)} upsamplers, but the decoder has {stages} "
                f"upsampling stages (give one name, or {stages})"
            )
    for name in names:
        if isinstance(name, str) and name not in UPSAMPLERS:
            raise unknown_name("upsampler", name, UPSAMPLERS)
    return names


def needs_indices(name: str | Callable[..., nn.Module]) -> bool:
    """True for upsamplers that need max-pool indices (max_unpool)."""
    if isinstance(name, str):
        return bool(UPSAMPLERS[name].needs_indices)
    return bool(getattr(name, "needs_indices", False))
