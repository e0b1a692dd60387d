"""The one place where p3d touches private or experimental PyTorch APIs.

Each wrapper names what it relies on, so a PyTorch upgrade has a single file to check.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def flatten_mesh(mesh: DeviceMesh, dims: tuple[str, ...], name: str) -> DeviceMesh:
    """A 1-D mesh over several named dims of `mesh` (private `DeviceMesh._flatten`)."""
    return mesh[dims]._flatten(name)


def local_box(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The region of the full (global) tensor that this rank holds, as one slice per dim.

    For a plain tensor that is the whole tensor. For a DTensor, including FSDP2's strided
    sharding of TP-sharded params, it comes from DTensor's own (private) shape/offset rule.
    """
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, size) for size in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))
