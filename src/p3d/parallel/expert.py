"""Mixture-of-experts layers split by whole experts over a group of ranks.

An experts module (transformers' fused experts: 3-D weights `[experts, ...]` and a forward
`experts(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])`; the
models seam finds them) keeps `experts / group size` experts per rank: its weights become DTensors
sharded on dim 0, so every shard is a box of whole experts and checkpoints reshard freely. The router
stays where the model has it (replicated, like any dense weight); routing is dropless: every
(token, expert) pair the router picks is computed, exactly as on one process.

Two ways the tokens reach their experts, one rule each:

    tensor parallel (`moe_tp_experts`)  the ranks of a tp group hold the same tokens: each runs its own
                                        experts on the pairs routed to them; the partial outputs are
                                        all-reduced, and the gradients of the shared inputs (hidden
                                        states, routing weights) summed over the group.
    expert parallel (`parallel.ep`)     the ranks of an ep group hold different tokens: each sends every
                                        (token, expert) pair to the rank holding the expert (all-to-all),
                                        the experts run on what they receive, and a second all-to-all
                                        brings the outputs back, where the routing weights are applied
                                        and the k outputs of a token summed.

The experts themselves run through the module's own forward (eager loop, grouped or batched matmul:
whatever the model's experts implementation is) on rows with local expert ids and unit weights.
Each module also counts the tokens routed to each of its experts (`ExpertLoad` reads them).

On the meta device (`p3d plan` runs the step on shapes only) the routing has no values: every expert
is taken to receive an equal share of the (token, expert) pairs, and the same code runs on those sizes.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def expert_count(module: nn.Module) -> int | None:
    """The number of experts of a fused experts module (its weights' leading dim), else None."""
    if isinstance(getattr(module, "forward", None), ShardedExperts):
        return module.forward.total_experts  # already split: `num_experts` is the local count
    count = getattr(module, "num_experts", None)
    params = list(module.parameters(recurse=False))
    if not isinstance(count, int) or not params or not any(param.dim() == 3 for param in params):
        return None
    if any(param.shape[0] != count for param in params):
        return None
    positional = [p for p in inspect.signature(module.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return count if len(positional) >= 3 else None  # forward(hidden_states, top_k_index, top_k_weights)


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks (`send_sizes[r]` rows to rank r, `recv_sizes[r]` from it); backward sends the
    gradients the other way. gloo, NCCL and the other backends implement `all_to_all_single`."""

    @staticmethod
    def forward(ctx, rows, send_sizes, recv_sizes, group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        received = rows.new_empty((sum(recv_sizes), *rows.shape[1:]))
        dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group)
        return received

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        returned = grad.new_empty((sum(send_sizes), *grad.shape[1:]))
        dist.all_to_all_single(returned, grad.contiguous(), output_split_sizes=send_sizes, input_split_sizes=recv_sizes, group=ctx.group)
        return returned, None, None, None


class ShardedExperts:
    """The forward of one experts module whose experts are split over `mesh` (see the module docstring)."""

    def __init__(self, module: nn.Module, mesh: DeviceMesh, tokens_shared: bool):
        self.module = module
        self.mesh = mesh
        self.tokens_shared = tokens_shared  # tp: same tokens on every rank of the group; ep: different ones
        self.total_experts = module.num_experts
        self.local_experts = module.num_experts // mesh.size()
        self.experts_forward: Callable = module.forward  # the model's own experts forward, now on local experts

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        if isinstance(hidden_states, DTensor):
            hidden_states = hidden_states.to_local()
        if isinstance(top_k_weights, DTensor):
            top_k_weights = top_k_weights.to_local()
        if self.tokens_shared:
            return self._shared_tokens(hidden_states, top_k_index, top_k_weights)
        return self._dispatched_tokens(hidden_states, top_k_index, top_k_weights)

    def _run_local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """The local experts on `rows` (local expert id per row), unit weights; parameters as local tensors."""
        module = self.module
        originals = dict(module._parameters)
        for leaf, param in originals.items():
            if isinstance(param, DTensor):
                module._parameters[leaf] = param.to_local()
        try:
            if rows.shape[0] == 0:
                # Keep the experts' weights in the backward (zero gradients) so every rank's gradient
                # reduction sees the same parameters.
                one = rows.sum(dim=0, keepdim=True)
                return self.experts_forward(one, local_ids.new_zeros((1, 1)), one.new_ones((1, 1)))[:0]
            return self.experts_forward(rows, local_ids.unsqueeze(-1), rows.new_ones((rows.shape[0], 1)))
        finally:
            module._parameters.update(originals)

    def _shared_tokens(self, hidden_states, top_k_index, top_k_weights):
        from p3d.parallel.tensor import SumGradient, SumOverGroup  # tensor.py imports this module

        group = self.mesh.get_group()
        hidden_states = SumGradient.apply(hidden_states, group)
        top_k_weights = SumGradient.apply(top_k_weights, group)
        tokens, k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        first = self.mesh.get_local_rank() * self.local_experts
        if expert_ids.is_meta:  # p3d plan: an even share of the pairs, to local expert ids in order
            counts = _even_split(tokens * k, self.total_experts)[first : first + self.local_experts]
            pairs = torch.arange(sum(counts), device=expert_ids.device)
            local_ids = torch.arange(self.local_experts).repeat_interleave(torch.tensor(counts)).to(expert_ids.device)
        else:
            pairs = ((expert_ids >= first) & (expert_ids < first + self.local_experts)).nonzero().squeeze(-1)
            local_ids = expert_ids[pairs] - first
        outputs = self._run_local_experts(hidden_states[pairs // k], local_ids)
        weighted = outputs * top_k_weights.reshape(-1)[pairs].unsqueeze(-1).to(outputs.dtype)
        per_pair = weighted.new_zeros((tokens * k, weighted.shape[-1])).index_copy(0, pairs, weighted)
        return SumOverGroup.apply(per_pair.view(tokens, k, -1).sum(dim=1), group).to(hidden_states.dtype)

    def _dispatched_tokens(self, hidden_states, top_k_index, top_k_weights):
        group, ranks = self.mesh.get_group(), self.mesh.size()
        tokens, k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)  # pairs grouped by expert, hence by the rank holding it
        if expert_ids.is_meta:  # p3d plan: every expert gets an even share of every rank's pairs
            per_expert = torch.tensor(_even_split(tokens * k, self.total_experts)).view(ranks, self.local_experts)
        else:
            per_expert = torch.bincount(expert_ids, minlength=self.total_experts).view(ranks, self.local_experts)
        received_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(received_per_expert, per_expert, group=group)
        if expert_ids.is_meta:  # what the other ranks' even shares would send here (a fake group sends nothing)
            received_per_expert = per_expert[self.mesh.get_local_rank()].expand(ranks, -1).contiguous()
        send_sizes = per_expert.sum(dim=1).tolist()
        recv_sizes = received_per_expert.sum(dim=1).tolist()
        rows = _AllToAll.apply(hidden_states[order // k], send_sizes, recv_sizes, group)
        # Received rows come by sending rank, each rank's rows by local expert.
        local_ids = torch.arange(self.local_experts, device=received_per_expert.device).repeat(ranks).repeat_interleave(received_per_expert.reshape(-1)).to(rows.device)
        outputs = _AllToAll.apply(self._run_local_experts(rows, local_ids), recv_sizes, send_sizes, group)
        per_pair = torch.empty_like(outputs).index_copy(0, order, outputs)
        weighted = per_pair.view(tokens, k, -1) * top_k_weights.unsqueeze(-1).to(per_pair.dtype)
        return weighted.sum(dim=1).to(hidden_states.dtype)


def _even_split(pairs: int, experts: int) -> list[int]:
    """`pairs` (token, expert) pairs spread as evenly as they go over `experts` experts."""
    return [pairs // experts + (index < pairs % experts) for index in range(experts)]


def shard_experts(module: nn.Module, mesh: DeviceMesh, tokens_shared: bool) -> None:
    """Split `module`'s experts over `mesh` (dim 0 of every weight) and route its forward through them."""
    sharded = ShardedExperts(module, mesh, tokens_shared)
    for leaf, param in list(module._parameters.items()):
        if param is not None:
            module.register_parameter(leaf, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)], src_data_rank=None), requires_grad=param.requires_grad))
    module.num_experts = sharded.local_experts
    module.forward = sharded


def expert_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes this rank stores, bytes of the whole module) of an experts module's weights."""
    local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in module.parameters(recurse=False))
    whole = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return local, whole


def describe_experts(experts: list[nn.Module], ep: int, tp: int) -> str:
    """The start-up line of a mixture-of-experts model: experts per rank and the expert weights it stores."""
    count = expert_count(experts[0])
    split = ep if ep > 1 else tp
    local, whole = (sum(sizes) for sizes in zip(*(expert_weight_bytes(module) for module in experts)))
    how = f" (split over {'ep' if ep > 1 else 'tp'}={split})" if split > 1 else ""
    return (
        f"mixture of experts: {len(experts)} layers of {count} experts, {count // split} per rank{how}; "
        f"expert weights on this rank {local / 2**20:.2f} MiB of {whole / 2**20:.2f} MiB"
    )


def experts_problems(name: str, module: nn.Module, ranks: int, key: str) -> list[str]:
    """Why `module`'s experts cannot be split over `ranks` ranks (`key`: the config key that asks for it)."""
    count = expert_count(module)
    if count is None:
        return [f"{key}: '{name}' ({type(module).__name__}) is not a fused experts module (3-D weights, forward(hidden, top_k_index, top_k_weights)); use {key.split('=')[0]}=1"]
    if count % ranks:
        return [f"{key}: {count} experts of '{name}' cannot be split evenly over {ranks} ranks; choose a degree that divides {count}"]
    return []
