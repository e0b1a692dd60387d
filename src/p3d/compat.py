"""The one place where p3d touches private or experimental PyTorch APIs.

Each wrapper names what it relies on, so a PyTorch upgrade has a single file to check.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement
from torch.utils._python_dispatch import TorchDispatchMode


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


def ddp_replicate(module: torch.nn.Module, group, bucket_bytes: int, find_unused_parameters: bool) -> None:
    """DDP's reducer on `module` in place (private `torch.distributed._composable.replicate`, torch 2.13:
    no wrapper module, so parameter names, state dicts and DCP checkpoints stay the model's own).
    Gradients live in flat buckets (`gradient_as_bucket_view`), each bucket's all-reduce is launched
    from the backward as soon as its last gradient is ready and runs on the backend's own thread
    meanwhile; the comm hook sums over the ranks (DDP averages; p3d's loss is already a global mean).
    DDP initialises at the first forward (it broadcasts rank 0's weights then)."""
    from torch.distributed._composable.replicate import replicate

    # broadcast_buffers=False: no broadcast before every forward; the buffers (rotary tables) are built
    # alike on every rank, and FSDP2's modes do not broadcast them either.
    replicate(module, process_group=group, bucket_cap_mb=bucket_bytes / 2**20, gradient_as_bucket_view=True,
              find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    module.register_comm_hook(group, _summed_over_ranks)


def _summed_over_ranks(group, bucket):  # no annotations: DDP compares them with its own objects, not strings
    """DDP comm hook: the bucket's gradients summed over `group`, a future of the reduced bucket."""
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda done: done.value()[0])


def ddp_bucket_assignment(parameters: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `parameters` (in the order their gradients become ready) per DDP bucket, by DDP's own
    rule: private `dist._compute_bucket_assignment_by_size` with `dist._DEFAULT_FIRST_BUCKET_BYTES` for the
    first bucket (torch 2.13). Meta tensors do."""
    buckets, _ = dist._compute_bucket_assignment_by_size(parameters, [dist._DEFAULT_FIRST_BUCKET_BYTES, bucket_bytes], [False] * len(parameters))
    return buckets


def is_ddp_replicated(module: torch.nn.Module) -> bool:
    """Whether `ddp_replicate` was applied to `module` (its class is then composable replicate's `DDP`)."""
    from torch.distributed._composable.replicate import DDP

    return isinstance(module, DDP)


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


def shard_shape(global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Placement]) -> tuple[int, ...]:
    """The local shape of a DTensor with `placements` at `coordinate` of a mesh of `mesh_shape`, for any
    rank, not only this one (DTensor's own rule, including uneven and strided shards: private
    `torch.distributed.tensor._utils._compute_local_shape_and_global_offset`, torch 2.13)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, _ = _compute_local_shape_and_global_offset(tuple(global_shape), tuple(mesh_shape), list(coordinate), placements, skip_offset=True)
    return tuple(shape)


@contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """Within the block this process is `rank` of a default process group of `world_size` ranks whose
    collectives do nothing (torch's `fake` backend: private `torch.testing._internal.distributed.fake_pg`,
    torch 2.13). Meshes, TP styles and FSDP2 can be applied to a model on the meta device as on a real
    job, without other processes; nothing may run that needs the results of a collective."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_process_group: this process already has a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def storage_key(tensor: torch.Tensor) -> int:
    """An identity of the storage behind a tensor, shared by its views, also on the meta device where
    every data pointer is 0 (private `UntypedStorage._cdata`, torch 2.13)."""
    return tensor.untyped_storage()._cdata


class CollectiveRecorder(TorchDispatchMode):
    """While active, `record(op, group_name, tensor)` sees every collective: the functional ones (what
    DTensor redistributions issue) and the c10d ones (`dist.all_reduce`, `dist.all_to_all_single`, ...);
    op is e.g. "all_reduce", "allgather_" or "alltoall_base_", tensor the first tensor of its first argument
    (its input, or for c10d's all-gather one part of its output: the same size). Private
    `torch.utils._python_dispatch.TorchDispatchMode`, the `_c10d_functional` and `c10d` op namespaces and
    `ProcessGroup.unbox`, torch 2.13."""

    def record(self, op: str, group_name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and isinstance(args[0], torch.Tensor):
            names = [arg for arg in args if isinstance(arg, str)]
            if names:
                self.record(func.overloadpacket.__name__, names[-1], args[0])
        elif func.namespace == "c10d":
            group = next((arg for arg in args if isinstance(arg, torch.ScriptObject)), None)
            tensor = _first_tensor(args[0])  # allreduce_'s list of tensors, allgather_'s list of lists of parts, ...
            if group is not None and tensor is not None:
                self.record(func.overloadpacket.__name__, dist.ProcessGroup.unbox(group).group_name, tensor)
        return func(*args, **(kwargs or {}))


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value:
        return _first_tensor(value[0])
    return None


@dataclass(frozen=True)
class FsdpUnitFacts:
    """What FSDP2 made of one module: the unit it belongs to and how that unit gathers and reduces."""

    unit: int  # identity of the unit: the same for all modules one `fully_shard`/`replicate` call wrapped together
    keeps_unsharded_after_forward: bool
    shard: tuple[str, int] | None  # (mesh dimension, size) it shards over: all-gather, reduce-scatter
    replicate: tuple[str, int] | None  # (mesh dimension, size) it replicates over: gradient all-reduce
    prefetches_in_backward: bool = True  # all-gathers the next unit's weights for backward as its own backward begins


def fsdp_unit_facts(module: torch.nn.Module) -> FsdpUnitFacts:
    """Read an FSDP2 (or FSDP2 `replicate`) module's state: private `_get_fsdp_state()`, its
    `_fsdp_param_group` with `post_forward_mesh_info` (None: the unit stays gathered from its forward
    to its backward, as with `reshard_after_forward=False` and FSDP2's replicate) and `mesh_info`
    (`shard_mesh_dim`, `replicate_mesh_dim`), torch 2.13. FSDP2 also keeps the root unit gathered
    once training starts, whatever it was given. A unit without parameters has no mesh dimensions."""
    state = module._get_fsdp_state()
    group = state._fsdp_param_group
    if group is None:
        return FsdpUnitFacts(id(state), False, None, None)
    mesh_info = group.mesh_info

    def dimension(index: int | None) -> tuple[str, int] | None:
        return None if index is None else (mesh_info.mesh.mesh_dim_names[index], mesh_info.mesh.size(index))

    prefetches = state._states_to_backward_prefetch != [state]  # see `no_backward_prefetch`
    return FsdpUnitFacts(id(state), group.post_forward_mesh_info is None, dimension(mesh_info.shard_mesh_dim), dimension(mesh_info.replicate_mesh_dim), prefetches)


def no_backward_prefetch(unit: torch.nn.Module) -> None:
    """Turn off FSDP2's implicit backward prefetch for `unit` (torch 2.13 has no switch for it): given
    an explicit list, FSDP2 prefetches that list instead of the next unit, and the unit itself is
    already gathered when its backward begins, so prefetching it does nothing."""
    unit.set_modules_to_backward_prefetch([unit])


@contextmanager
def experts_run_on_meta() -> Iterator[None]:
    """Within the block, transformers' grouped-matmul experts forward runs on the meta device in any dtype:
    it takes its own fallback op (whose shape function transformers registers) instead of
    `grouped_mm`, whose meta function accepts bf16 only (private
    `transformers.integrations.moe._can_use_grouped_mm`, transformers 5.23)."""
    from transformers.integrations import moe

    original = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda input, weight, offs: False if weight.is_meta else original(input, weight, offs)
    try:
        yield
    finally:
        moe._can_use_grouped_mm = original


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


def attention_implementation(model) -> str:
    """The attention implementation transformers runs the model's attention with ('sdpa', 'eager', ...)."""
    return model.config._attn_implementation


def bloom_alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """BLOOM's ALiBi slope of each head (transformers' private helper, which its model uses)."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    return _get_alibi_slopes(num_heads, device)


@contextmanager
def swapped(module: torch.nn.Module, **attributes):
    """`module`'s parameters and plain attributes temporarily replaced by `attributes` (any tensor may
    stand in for a parameter: it goes into the private `_parameters` dict, as torch.func.functional_call
    does), so that the module's own forward runs on them."""
    saved = {}
    for name, value in attributes.items():
        if name in module._parameters:
            saved[name] = ("parameter", module._parameters[name])
            module._parameters[name] = value
        else:
            saved[name] = ("attribute", getattr(module, name))
            object.__setattr__(module, name, value)
    try:
        yield module
    finally:
        for name, (kind, value) in saved.items():
            if kind == "parameter":
                module._parameters[name] = value
            else:
                object.__setattr__(module, name, value)


def traced_all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    """The sum of `tensor` over `group` as a new tensor, written so that torch.compile traces it into its
    graph instead of breaking the graph there (the private functional collectives, torch 2.13)."""
    from torch.distributed import _functional_collectives

    return _functional_collectives.all_reduce(tensor, "sum", group)


def when_backward_ends(callback) -> None:
    """Run `callback` once the backward now running has finished (private autograd engine's
    `queue_callback`, torch 2.13: what DDP and FSDP2 wait for their reductions with). Call it from
    inside the backward, e.g. a gradient hook."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)
