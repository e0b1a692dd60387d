"""Vocabulary parallelism (`parallel.vocab_parallel`): the output head and the loss over vocabulary shards.

Without it FSDP2 all-gathers the whole output head for each micro-batch's forward and again for its
backward, and every rank holds the head's unsharded gradient and a reduce buffer of the same size
(at a 32k vocabulary and hidden 1024, 0.13 GB each, at the start of the backward where the
activations of every block are still held); the logits cover the whole vocabulary.

With it the head's weight is sharded over the vocabulary across every rank (a DTensor sharded on
dim 0 over the flattened dp x cp x tp mesh) and is never gathered. Instead the head's input, the
hidden states of each rank's own tokens, is all-gathered over the dp x cp ranks (their tokens
differ; the tp ranks hold the same), each rank computes the logits of all those tokens over its
vocabulary rows, and the cross-entropy is computed over the shards (the max, the sum of exponentials
and the target logit all-reduced over every rank, as in Megatron's vocabulary-parallel loss). In
the backward each rank's logits give the full gradient of its weight rows (summed over every
rank's tokens, so nothing is reduced) and a partial gradient of every gathered token, summed over
the tp ranks and reduce-scattered back to the dp x cp ranks that own the tokens.

Communication per micro-batch: the hidden states (tokens x hidden) instead of the head (vocab x
hidden) twice, plus two small all-reduces per token. Model code stays as it is: the head module's
forward is replaced; whatever the model does to the logits after the head must be elementwise
(scaling, soft-capping), which holds for the architectures whose parity is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from p3d.compat import local_box
from p3d.data import IGNORE_INDEX

_ATTRIBUTE = "_p3d_vocab_parallel"


@dataclass
class VocabParallelHead:
    """How one rank computes its share of the head and the loss."""

    vocab_group: dist.ProcessGroup  # every rank: the head's vocabulary is split over them
    data_group: dist.ProcessGroup  # the dp x cp ranks: they hold different tokens
    data_size: int
    data_rank: int
    tp_group: dist.ProcessGroup | None  # the tp ranks (same tokens, other vocabulary rows); None without tp
    vocab_start: int  # the first vocabulary row this rank holds

    def gather_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every dp x cp rank's `tensor` (hidden states, [batch, ...]) concatenated along dim 0 in rank
        order; its gradient goes back summed over the vocabulary shards to the rank that owns the tokens."""
        if self.data_size == 1 and self.tp_group is None:
            return tensor
        return _GatherTokens.apply(tensor, self)

    def gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.data_size == 1:
            return labels
        return _all_gather(labels.contiguous(), self.data_group)

    def token_loss_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss summed over every dp x cp rank's tokens, the same value on every rank: backward
        from it; its part over this rank's own tokens, detached: what the rank reports)."""
        all_labels = self.gather_labels(labels).flatten()
        losses = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, -2), all_labels, self)
        own = losses.detach().view(self.data_size, -1)[self.data_rank]
        return losses.sum(), own.sum()


def vocab_parallel_head(model: nn.Module) -> VocabParallelHead | None:
    """The model's vocabulary-parallel head, if `shard_head_over_vocabulary` made one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, _ATTRIBUTE, None)


def head_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of a vocabulary-parallel head (FSDP2 leaves them alone); empty otherwise."""
    if vocab_parallel_head(model) is None:
        return set()
    return set(model.get_output_embeddings().parameters())


def vocab_parallel_problems(model: nn.Module, dp_replicate: int) -> list[str]:
    """Why `parallel.vocab_parallel=true` cannot run for this (meta) model and layout; empty if it can."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    problems = []
    if dp_replicate > 1:
        problems.append("parallel.vocab_parallel=true shards the head over every rank; it does not run with parallel.dp_replicate > 1: set parallel.dp_replicate=1 or parallel.vocab_parallel=false")
    if not isinstance(head, nn.Linear):
        problems.append(f"parallel.vocab_parallel=true needs the output head to be a Linear layer (this model's is {type(head).__name__}): set parallel.vocab_parallel=false")
    elif embeddings is not None and head.weight is embeddings.weight:
        problems.append("parallel.vocab_parallel=true needs an untied output head (this model ties it to the input embedding): set parallel.vocab_parallel=false or model.config.tie_word_embeddings=false")
    return problems


def shard_head_over_vocabulary(model: nn.Module, vocab_mesh: DeviceMesh, data_mesh: DeviceMesh, tp_mesh: DeviceMesh) -> None:
    """Shard the output head's rows over `vocab_mesh` (1-D, every rank) and compute it as described above.

    The head must not be sharded by tensor parallelism already (it is left out of the TP plan)."""
    head = model.get_output_embeddings()
    for leaf in [name for name, _ in head.named_parameters(recurse=False)]:
        param = head._parameters[leaf]
        head.register_parameter(leaf, nn.Parameter(distribute_tensor(param, vocab_mesh, [Shard(0)], src_data_rank=None), requires_grad=param.requires_grad))
    sharding = VocabParallelHead(
        vocab_group=vocab_mesh.get_group(),
        data_group=data_mesh.get_group(),
        data_size=data_mesh.size(),
        data_rank=data_mesh.get_local_rank(),
        tp_group=tp_mesh.get_group() if tp_mesh.size() > 1 else None,
        vocab_start=local_box(head.weight)[0].start,
    )
    setattr(head, _ATTRIBUTE, sharding)
    head.forward = partial(_head_forward, head, sharding)


def _head_forward(head: nn.Linear, sharding: VocabParallelHead, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of every dp x cp rank's tokens over this rank's vocabulary rows: [dp*cp*batch, ..., rows]."""
    gathered = sharding.gather_tokens(hidden)
    weight = head.weight.to_local().to(gathered.dtype)
    bias = head.bias.to_local().to(gathered.dtype) if head.bias is not None else None
    return F.linear(gathered, weight, bias)


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_single(out, tensor, group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sharding: VocabParallelHead) -> torch.Tensor:
        ctx.sharding = sharding
        if sharding.data_size == 1:
            return tensor.clone()
        return _all_gather(tensor.contiguous(), sharding.data_group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sharding = ctx.sharding
        grad = grad.contiguous()
        if sharding.tp_group is not None:  # the tp ranks' vocabulary rows add to the same tokens
            dist.all_reduce(grad, group=sharding.tp_group)
        if sharding.data_size == 1:
            return grad, None
        own = grad.new_empty((grad.shape[0] // sharding.data_size, *grad.shape[1:]))
        dist.reduce_scatter_single(own, grad, group=sharding.data_group)
        return own, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary across `vocab_group` (0 for ignored
    labels); the same values on every rank. Its backward is local: each rank's logits' gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, sharding: VocabParallelHead) -> torch.Tensor:
        rows = logits.shape[-1]
        group = sharding.vocab_group
        maximum = logits.max(dim=-1).values if rows else logits.new_full(logits.shape[:1], float("-inf"))
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
        exponentials = (logits - maximum.unsqueeze(-1)).exp_()
        local_label = labels - sharding.vocab_start
        here = (local_label >= 0) & (local_label < rows)  # the label's row is this rank's
        picked = local_label.clamp(0, max(rows - 1, 0)).unsqueeze(-1)
        target = logits.gather(-1, picked).squeeze(-1) if rows else logits.new_zeros(labels.shape)
        sums = torch.stack([exponentials.sum(dim=-1), torch.where(here, target - maximum, 0.0)])
        dist.all_reduce(sums, group=group)  # the sum of exponentials; the target logit (less the max)
        sum_exp, target = sums[0], sums[1]
        valid = labels != IGNORE_INDEX
        losses = torch.where(valid, sum_exp.log() - target, 0.0)
        softmax = exponentials.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, picked, here & valid, valid)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        softmax, picked, here, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_losses, 0.0)
        grad = softmax.mul_(scale.unsqueeze(-1))  # softmax is not needed again
        if grad.shape[-1]:
            grad.scatter_add_(-1, picked, torch.where(here, -scale, 0.0).unsqueeze(-1))
        return grad, None, None
