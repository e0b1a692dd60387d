"""FSDP2 (`fully_shard`) over the dp*cp ranks: one unit per decoder block, then the root."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from p3d.models import decoder_blocks, experts_modules
from p3d.parallel.tensor import own_tensor


def apply_fsdp(model: nn.Module, dp_cp_mesh: DeviceMesh, compute_dtype: torch.dtype = torch.float32, experts_mesh: DeviceMesh | None = None) -> None:
    """Shard parameters, gradients and optimizer state over `dp_cp_mesh`.

    Under expert parallelism each experts module is a unit of its own over `experts_mesh` (efsdp: the
    ranks holding the same experts); its block's unit leaves those weights to it.

    p3d divides the loss by the global token count itself, so gradients are summed across
    ranks, not averaged (FSDP2 averages by default). Plain SUM collectives also run on gloo,
    which has no PREMUL_SUM. With a lower compute dtype, parameters are cast for compute only
    and the sharded weights keep the dtype they were built in (`train.master_dtype`: fp32, or
    bf16 for pure-bf16 training, where the cast is a no-op). Gradients are always reduced in
    fp32 and stored in the weights' dtype.
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if experts_mesh is not None:
        for _, experts in experts_modules(model):
            fully_shard(experts, mesh=experts_mesh, mp_policy=policy)
    for block in decoder_blocks(model):
        _outputs_of_their_own(block)
        fully_shard(block, mesh=dp_cp_mesh, mp_policy=policy)
    for unit, reshard_after_forward in embedding_units(model):
        _outputs_of_their_own(unit)
        fully_shard(unit, mesh=dp_cp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_cp_mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def embedding_units(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Untied input and output embeddings as FSDP units of their own, with reshard-after-forward.

    In the root unit they would stay unsharded from the first forward to the last backward, and
    both gradients would be reduced together at the end. As their own units, the input embedding
    is freed after its forward and the output head's gradient is reduced as soon as the backward
    has passed it (the head stays gathered after forward: the backward starts with it). A tied
    pair is one parameter and stays in the root unit.
    """
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is inputs.weight:
        return []
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
