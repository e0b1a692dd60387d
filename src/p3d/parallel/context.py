"""Context parallelism: the sequence is split over the cp ranks; attention stays exact.

Before the split, positions and next-token labels are computed for the whole sequence, so
every token keeps its global position and its global label. Each cp rank then holds a subset
of the tokens (balanced: chunks i and 2*cp-1-i of 2*cp equal chunks; contiguous: chunk i).
Attention gathers every rank's keys and values and masks causally by global position, so
the result equals one process attending over the whole sequence. Transformers models call
it through their attention interface (`config._attn_implementation = "p3d_cp"`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from p3d.config.schema import CPLayout

ATTENTION_NAME = "p3d_cp"


@dataclass(frozen=True)
class SequenceSharding:
    """Which global positions of a sequence each cp rank holds."""

    cp: int
    layout: CPLayout

    @property
    def chunks(self) -> int:
        return 2 * self.cp if self.layout is CPLayout.balanced else self.cp

    def positions(self, cp_rank: int, seq_len: int) -> torch.Tensor:
        """Global positions held by `cp_rank`, in the order the rank stores them."""
        size = seq_len // self.chunks
        chunk_ids = [cp_rank, 2 * self.cp - 1 - cp_rank] if self.layout is CPLayout.balanced else [cp_rank]
        return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunk_ids])

    def gathered_positions(self, seq_len: int) -> torch.Tensor:
        """Global positions in all-gather order (rank 0's tokens, then rank 1's, ...)."""
        return torch.cat([self.positions(rank, seq_len) for rank in range(self.cp)])


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along a dim; backward sums the gradient over ranks and keeps this rank's part.

    (torch.distributed.nn.functional.all_gather's backward fails on gloo sub-groups.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.length = group, dim, tensor.shape[dim]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.length, ctx.length), None, None


@dataclass
class _ActiveBatch:
    group: dist.ProcessGroup
    query_positions: torch.Tensor  # [local tokens]
    key_positions: torch.Tensor  # [all tokens, all-gather order]


_active: _ActiveBatch | None = None


class ContextParallel:
    """Splits batches over the cp group and serves the attention of the current batch."""

    def __init__(self, group: dist.ProcessGroup, cp_rank: int, sharding: SequenceSharding):
        self.group = group
        self.cp_rank = cp_rank
        self.sharding = sharding

    def local_positions(self, seq_len: int) -> torch.Tensor:
        return self.sharding.positions(self.cp_rank, seq_len)

    def split(self, tensor: torch.Tensor, seq_len: int) -> torch.Tensor:
        """This rank's tokens of a [batch, seq_len] tensor."""
        return tensor[:, self.local_positions(seq_len).to(tensor.device)]

    @contextmanager
    def attending(self, seq_len: int, device: torch.device) -> Iterator[None]:
        """Within this block, p3d_cp attention serves a sequence of `seq_len` tokens."""
        global _active
        _active = _ActiveBatch(
            group=self.group,
            query_positions=self.local_positions(seq_len).to(device),
            key_positions=self.sharding.gathered_positions(seq_len).to(device),
        )
        try:
            yield
        finally:
            _active = None


def context_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention interface: exact causal attention over the gathered sequence."""
    if _active is None:
        raise RuntimeError("p3d_cp attention called outside ContextParallel.attending()")
    key = _AllGatherSequence.apply(key, _active.group, 2)
    value = _AllGatherSequence.apply(value, _active.group, 2)
    causal = _active.query_positions[:, None] >= _active.key_positions[None, :]
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=causal,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """p3d_cp builds its causal mask from global positions; transformers' local mask would be wrong."""
    return None


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def enable_context_parallel(model) -> None:
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
