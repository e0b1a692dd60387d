"""The one place where p3d touches private or experimental PyTorch APIs.

Each wrapper names what it relies on, so a PyTorch upgrade has a single file to check.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def flatten_mesh(mesh: DeviceMesh, dims: tuple[str, ...], name: str) -> DeviceMesh:
    """A 1-D mesh over several named dims of `mesh` (private `DeviceMesh._flatten`)."""
    return mesh[dims]._flatten(name)


def unflatten_mesh(mesh: DeviceMesh, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """A 1-D mesh viewed as several named dims, the last varying fastest (private `DeviceMesh._unflatten`).
    The result shares the root mesh, so DTensors on its dims and FSDP2 over them combine."""
    return mesh._unflatten(0, sizes, names)


def replicate_modules(modules: list, mesh: DeviceMesh, mp_policy) -> None:
    """FSDP2's data-parallel replication of `modules` as one unit over the 1-D `mesh`: parameters stay
    whole (DTensors replicated over the mesh, TP placements kept) and the unit's gradients are
    all-reduced together after its backward. The private `torch.distributed._composable.
    replicate_with_fsdp.replicate` (torch 2.13; torchtitan's data parallelism without sharding); its
    modules are FSDPModules (gradient divide factor, `set_requires_gradient_sync`)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    replicate(modules if len(modules) > 1 else modules[0], mesh=mesh, mp_policy=mp_policy)


def in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread, e.g. activation checkpointing
    recomputing a block's forward (private `torch._C._current_graph_task_id`, torch 2.13: -1 outside)."""
    return torch._C._current_graph_task_id() != -1


def import_dynamo() -> None:
    """Import `torch._dynamo` before any process group exists. DTensor and FSDP2 import it lazily, on
    first use; imported once a default process group exists, it keeps that group alive until the
    process ends (torch 2.13), and the group's threads with it."""
    import torch._dynamo  # noqa: F401


def release_mesh_process_groups(mesh: DeviceMesh) -> None:
    """Drop the mesh's references to its process groups (private `DeviceMesh._pg_registry` of the root
    mesh, torch 2.13), so that the groups can be destroyed once c10d has forgotten them too: DTensor's
    sharding caches keep every mesh alive until the interpreter exits."""
    mesh._get_root_mesh()._pg_registry.clear()


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


@contextmanager
def torch_ring_attention(cp_mesh: DeviceMesh, load_balanced: bool) -> Iterator[None]:
    """Within the block, `F.scaled_dot_product_attention` on q/k/v already sharded along the
    sequence (dim 2) over `cp_mesh` runs PyTorch's ring attention (CUDA flash / efficient kernels).

    The public `torch.distributed.tensor.experimental.context_parallel` also shards buffers with
    its own load balancer; p3d shards the batch itself (balanced = PyTorch's head-tail order, rank
    i holding chunks i and 2*cp-1-i), so only the dispatcher is enabled here, through private
    names of `torch.distributed.tensor.experimental._context_parallel._attention` (torch 2.13):
    `_cp_options.enable_load_balance` (which blocks are causal) and the monkey-patch dispatcher.
    """
    from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp

    previous = torch_cp._cp_options.enable_load_balance
    torch_cp._cp_options.enable_load_balance = load_balanced
    torch_cp._dispatch_mode = torch_cp._DispatchMode.MONKEY_PATCH
    torch_cp._enable_context_parallel_dispatcher_impl(seq_dim=2, mesh=cp_mesh)
    try:
        yield
    finally:
        torch_cp._disable_context_parallel_dispatcher_impl()
        torch_cp._cp_options.enable_load_balance = previous


def cpu_flash_attention(query, key, value, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused CPU attention returning (output, log-sum-exp per query row): the ATen op behind SDPA's
    flash backend on CPU, `aten._scaled_dot_product_flash_attention_for_cpu` (torch 2.13). `bias` is an
    additive float mask broadcastable to [batch, heads, queries, keys], or None. A row whose keys are
    all masked comes back as output 0 and log-sum-exp 0."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=bias, scale=scale)


def cpu_flash_attention_backward(grad_out, query, key, value, out, lse, bias, scale: float):
    """(dq, dk, dv) of `cpu_flash_attention` given the final output and log-sum-exp of each row, which
    may cover more keys than `key` (ring attention: the probabilities are exp(scores - lse))."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, key, value, out, lse, 0.0, False, attn_mask=bias, scale=scale
    )


# --- Hydra -----------------------------------------------------------------------------------


def hydra_show_info(info: str, overrides: list[str]) -> None:
    """Hydra's own `--info` report (search path, defaults list and tree, config) for p3d's root config,
    through the private `Hydra.show_info` of the initialised GlobalHydra (hydra-core 1.3). It configures
    Hydra's logging (a stdout handler on the root logger, level DEBUG), which is undone afterwards, so
    later compositions in the same process stay quiet."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        GlobalHydra.instance().hydra.show_info(info, config_name="config", overrides=overrides)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def newton_schulz_orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization of a whole 2-D update (quintic Newton-Schulz in bf16):
    the private `torch.optim._muon._zeropower_via_newtonschulz` (torch 2.13)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(matrix, coefficients, steps, eps)


def muon_adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning rate for a matrix of `shape` (`original`: sqrt(max(1, rows/cols));
    `match_rms_adamw`: 0.2 sqrt(max(rows, cols))): the private `torch.optim._muon._adjust_lr` (torch 2.13)."""
    from torch.optim._muon import _adjust_lr

    return _adjust_lr(lr, adjust_lr_fn, shape)


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squared L2 norms of plain tensors, in fp32, with one multi-tensor kernel (private
    `torch._foreach_norm` with its dtype argument, torch 2.13: no full-size temporary)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


def scale_in_place(tensors: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply every tensor by a 0-d tensor in place, one multi-tensor kernel (private `torch._foreach_mul_`)."""
    torch._foreach_mul_(tensors, factor)
