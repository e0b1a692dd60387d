"""Data parallelism: sharded (FSDP2's `fully_shard` over dp*cp: one unit per decoder block, then the
root), hybrid (HSDP: `fully_shard` over a (replicate, shard) mesh) or replicated.

Replicated is DDP's reducer where every parameter is a plain fp32 tensor computing in fp32 (no tensor
or expert parallelism, no bf16), gradients are reduced once per step and the optimizer does not step
inside the backward: gradients live in flat buckets whose all-reduces overlap the backward. With
tensor-parallel weights under the same conditions it is p3d's bucketed reducer (parallel/reducer.py:
DDP's scheme for DTensors). Otherwise it is FSDP2's `replicate` (decoder blocks grouped into gradient
buckets, one all-reduce per bucket after the bucket's backward), which holds DTensors and casts for
compute; on CPU its all-reduces run in line with the backward.

Gradient clipping and DCP checkpoints (which reshard between the modes) see DTensors or plain
tensors and treat both alike.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from p3d.compat import ddp_replicate, is_ddp_replicated, no_backward_prefetch, replicate_modules
from p3d.config.schema import GradSync
from p3d.distributed.mesh import ParallelDims
from p3d.models import decoder_blocks, experts_modules
from p3d.parallel.reducer import BucketedReducer, bucket_assignment, bucketed_reducer, local_part, ready_order
from p3d.parallel.tensor import own_tensor
from p3d.parallel.vocab import vocabulary_parameters

# Gradient bytes (fp32, TP-local) per all-reduce of the replicated mode: DDP's default bucket size.
REPLICATE_BUCKET_BYTES = 25 * 2**20
REDUCE_BYTES = 4  # gradients are reduced in fp32


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    compute_dtype: torch.dtype = torch.float32,
    experts_mesh: DeviceMesh | None = None,
    *,
    replicate: bool = False,
    reshard_after_forward: bool = True,
    backward_prefetch: bool = True,
    reduce_every_micro_batch: bool = False,
    updates_in_backward: bool = False,
) -> None:
    """Shard parameters, gradients and optimizer state over `dp_mesh` (1-D: FSDP; 2-D (replicate,
    shard): HSDP), or with `replicate` keep them whole on every rank of the 1-D `dp_mesh`.

    Under expert parallelism each experts module is a unit of its own over `experts_mesh` (efsdp: the
    ranks holding the same experts); its block's unit leaves those weights to it.

    p3d divides the loss by the global token count itself, so gradients are summed across
    ranks, not averaged (FSDP2 averages by default). Plain SUM collectives also run on gloo,
    which has no PREMUL_SUM. With a lower compute dtype, parameters are cast for compute only
    and the sharded weights keep the dtype they were built in (`train.master_dtype`: fp32, or
    bf16 for pure-bf16 training, where the cast is a no-op). Gradients are always reduced in
    fp32 and stored in the weights' dtype.

    `reshard_after_forward=False` keeps each block's (and the input embedding's) gathered weights
    from its forward to its backward instead of gathering them again. `backward_prefetch=False` gathers
    each unit when its backward begins, not while the unit after it computes (one unit's weights less
    at the peak, no overlap of that all-gather). `reduce_every_micro_batch`
    (parallel.grad_sync) and `updates_in_backward` (optim.in_backward) decide between DDP, p3d's bucketed
    reducer and FSDP2 for the replicated mode (`replicates_with_ddp`, `replicates_with_buckets`).
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if replicate:
        _replicate(model, dp_mesh, policy, reduce_every_micro_batch, updates_in_backward)
    else:
        _shard(model, dp_mesh, policy, experts_mesh, reshard_after_forward)
        if not backward_prefetch:
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    no_backward_prefetch(module)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _shard(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, experts_mesh: DeviceMesh | None, reshard_after_forward: bool) -> None:
    if experts_mesh is not None:
        for _, experts in experts_modules(model):
            fully_shard(experts, mesh=experts_mesh, mp_policy=policy)
    for block in decoder_blocks(model):
        _outputs_of_their_own(block)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for unit, reshard in embedding_units(model):
        _outputs_of_their_own(unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard and reshard_after_forward)
    # Vocabulary-parallel embeddings are sharded over every rank already and never gathered (parallel/vocab.py).
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=vocabulary_parameters(model) or None)


def _replicate(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, reduce_every_micro_batch: bool, updates_in_backward: bool) -> None:
    if replicates_with_ddp(model, policy.param_dtype, reduce_every_micro_batch, updates_in_backward):
        # find_unused_parameters: a forward may leave parameters out (experts without tokens, layers a
        # model skips); DDP then marks them ready itself instead of waiting for them forever.
        ddp_replicate(model, mesh.get_group(), REPLICATE_BUCKET_BYTES, find_unused_parameters=True)
    elif replicates_with_buckets(model, policy.param_dtype, reduce_every_micro_batch, updates_in_backward):
        BucketedReducer.install(model, mesh.get_group(), REPLICATE_BUCKET_BYTES)
    else:
        _replicate_with_fsdp(model, mesh, policy)


def _reduces_once_in_fp32(model: nn.Module, compute_dtype: torch.dtype, reduce_every_micro_batch: bool, updates_in_backward: bool) -> bool:
    """What a reducer with flat buckets needs: every parameter in fp32, computing in fp32 (no
    mixed-precision cast, and p3d reduces in fp32), gradients reduced once per step (the buckets hold
    the gradients summed over the micro-batches: reducing them after each would sum the earlier
    micro-batches' again), and no update during the backward (a parameter's post-accumulate hook sees
    its gradient before the reduction; FSDP2 calls those hooks after its reduction)."""
    fp32 = all(param.dtype == torch.float32 for param in model.parameters())
    return compute_dtype == torch.float32 and fp32 and not reduce_every_micro_batch and not updates_in_backward


def replicates_with_ddp(model: nn.Module, compute_dtype: torch.dtype, reduce_every_micro_batch: bool, updates_in_backward: bool) -> bool:
    """Whether the replicated mode uses DDP's reducer: every parameter a plain tensor (DDP cannot hold
    DTensors: TP and EP weights), reduced once per step in fp32 (`_reduces_once_in_fp32`)."""
    plain = all(not isinstance(param, DTensor) for param in model.parameters())
    return plain and _reduces_once_in_fp32(model, compute_dtype, reduce_every_micro_batch, updates_in_backward)


def replicates_with_buckets(model: nn.Module, compute_dtype: torch.dtype, reduce_every_micro_batch: bool, updates_in_backward: bool) -> bool:
    """Whether the replicated mode uses p3d's bucketed reducer (parallel/reducer.py): tensor-parallel
    weights (DTensors on one 1-D mesh), no experts (a rank's experts may get no tokens, and the
    reductions must run in the same order on every rank), reduced once per step in fp32."""
    meshes = {param.device_mesh for param in model.parameters() if isinstance(param, DTensor)}
    tensor_parallel = len(meshes) == 1 and next(iter(meshes)).ndim == 1
    return tensor_parallel and not experts_modules(model) and _reduces_once_in_fp32(model, compute_dtype, reduce_every_micro_batch, updates_in_backward)


def ddp_bucket_numels(model: nn.Module) -> list[int]:
    """Gradient elements per all-reduce of a model `_replicate` gave to DDP or to p3d's bucketed
    reducer (none otherwise), the parameters taken in the order their gradients become ready, about
    the reverse of the model's (so the count and the total are DDP's; a boundary may fall a parameter
    or two apart)."""
    if not (is_ddp_replicated(model) or bucketed_reducer(model) is not None):
        return []
    order = ready_order(model)
    return [sum(local_part(order[index]).numel() for index in bucket) for bucket in bucket_assignment(order, REPLICATE_BUCKET_BYTES)]


def _replicate_with_fsdp(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """Each bucket of consecutive blocks is one unit, whose gradients are all-reduced together once
    its backward is done (FSDP2 issues it on a stream of its own on CUDA, overlapping the rest of the
    backward; on CPU/gloo it runs in line);
    the root unit holds the rest (embeddings, final norm, head) and every block when the blocks
    together are smaller than one bucket."""
    blocks = decoder_blocks(model)
    for bucket in replicate_buckets([gradient_bytes(block) for block in blocks]):
        units = [blocks[index] for index in bucket]
        for unit in units:
            _outputs_of_their_own(unit)
        replicate_modules(units, mesh, policy)
    replicate_modules([model], mesh, policy)


def gradient_bytes(module: nn.Module) -> int:
    """Bytes of the module's (TP-local) gradients as they are reduced."""
    return sum((param.to_local() if isinstance(param, DTensor) else param).numel() for param in module.parameters()) * REDUCE_BYTES


def replicate_buckets(block_bytes: Sequence[int], bucket_bytes: int = REPLICATE_BUCKET_BYTES) -> list[list[int]]:
    """Indices of consecutive blocks grouped into all-reduce buckets of at least `bucket_bytes`, in
    backward order (the last blocks first); the first blocks left over stay in the root unit, whose
    gradients are reduced last anyway (so no bucket at all when every block fits in one)."""
    buckets, current, size = [], [], 0
    for index in reversed(range(len(block_bytes))):
        current.insert(0, index)
        size += block_bytes[index]
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    return buckets


def syncs_every_micro_batch(grad_sync: GradSync, dims: ParallelDims) -> bool:
    """Whether gradients are reduced after every micro-batch (else after the step's last only).
    auto: once per step when nothing is sharded (no extra memory), every micro-batch when sharded
    (waiting would hold each rank's unsharded gradients across the micro-batches)."""
    if grad_sync is GradSync.auto:
        return dims.shard_ranks > 1
    return grad_sync is GradSync.micro_batch


def gradient_sync_switch(model: nn.Module, every_micro_batch: bool) -> Callable[[bool], None]:
    """A function `sync(last_micro_batch)` to call before each micro-batch's backward: it turns the
    gradient reduction off for all but the step's last micro-batch (FSDP2's and DDP's no_sync)."""
    reducer = bucketed_reducer(model)
    if every_micro_batch or not (isinstance(model, FSDPModule) or is_ddp_replicated(model) or reducer is not None):
        return lambda last: None
    if reducer is not None:
        return reducer.sync

    enabled = True

    def sync(last: bool) -> None:
        nonlocal enabled
        if last != enabled:  # a walk over every module: only when it changes
            model.set_requires_gradient_sync(last)
            enabled = last

    return sync


def embedding_units(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Untied input and output embeddings as FSDP units of their own, with reshard-after-forward.

    In the root unit they would stay unsharded from the first forward to the last backward, and
    both gradients would be reduced together at the end. As their own units, the input embedding
    is freed after its forward and the output head's gradient is reduced as soon as the backward
    has passed it (the head stays gathered after forward: the backward starts with it). A tied
    pair is one parameter and stays in the root unit; vocabulary-parallel ones are no unit at all.
    """
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is inputs.weight or vocabulary_parameters(model):
        return []  # tied, or vocabulary-parallel (no FSDP2 unit at all)
    return [(inputs, True), (outputs, False)]


def _outputs_of_their_own(unit: nn.Module) -> None:
    """Hand FSDP2 the unit's outputs as tensors of their own, not views (no copy: see `own_tensor`).

    FSDP2 registers its pre-backward hook (the unit's all-gather for backward) on the unit's output
    tensors; an in-place op on a view would re-base it and drop the hook, so FSDP2 warns "returned a
    view tensor ... wrong gradients" for every such unit. Some blocks do return views: OPT's decoder
    layer ends with `(residual + hidden_states).view(shape)`. Registered before `fully_shard`, this
    hook runs before FSDP2's own post-forward hook.
    """
    unit.register_forward_hook(_replace_views)


def _replace_views(module: nn.Module, args, output):
    if isinstance(output, torch.Tensor):
        return own_tensor(output) if output._is_view() else output
    if type(output) is tuple and any(isinstance(item, torch.Tensor) and item._is_view() for item in output):
        return tuple(own_tensor(item) if isinstance(item, torch.Tensor) and item._is_view() else item for item in output)
    return output
