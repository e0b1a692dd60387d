"""Activation checkpointing and torch.compile, both per decoder block.

Both wrap a block's `forward` in place rather than wrapping the module, so parameter names stay
those of the Hugging Face model (init, pretrained loading and checkpoints address weights by
name). FSDP2's hooks stay on the block's `__call__`, outside the wrapped forward, so a
recomputation in backward runs while the block's parameters are unsharded.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from p3d.config.schema import ACMode
from p3d.models import decoder_blocks


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpointed_block_indices(block_count: int, mode: ACMode, every: int) -> list[int]:
    if mode is ACMode.full:
        return list(range(block_count))
    if mode is ACMode.selective:
        return list(range(0, block_count, every))
    return []


def apply_activation_checkpointing(model: nn.Module, mode: ACMode, every: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward instead of keeping them; returns their indices."""
    blocks = decoder_blocks(model)
    chosen = checkpointed_block_indices(len(blocks), mode, every)
    for index in chosen:
        blocks[index].forward = _checkpointed(blocks[index].forward)
    return chosen


def compile_blocks(model: nn.Module) -> None:
    for block in decoder_blocks(model):
        block.forward = torch.compile(block.forward)
