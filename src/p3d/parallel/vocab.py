"""Vocabulary parallelism (`parallel.vocab_parallel`): the input embedding, the output head and the loss
over vocabulary shards.

Without it FSDP2 all-gathers the whole embedding and the whole head for each micro-batch's forward
and again for its backward, and every rank holds each one's unsharded gradient and a reduce buffer of
the same size (at a 32k vocabulary and hidden 1024, 0.13 GB each); the logits cover the whole
vocabulary.

With it their weights are sharded over the vocabulary across every rank (DTensors sharded on dim 0
over the flattened dp x cp x tp mesh) and never gathered; their gradients are each rank's rows,
summed over every rank's tokens, so nothing is reduced either. What moves is the tokens instead:

- embedding: the dp x cp ranks' token ids are all-gathered (their tokens differ; the tp ranks hold
  the same), each rank looks up the ids in its rows (zeros elsewhere), and the partial embeddings are
  summed over the tp ranks and reduce-scattered back to the rank that owns the tokens; the backward
  all-gathers their gradients;
- head: the hidden states are all-gathered over the dp x cp ranks, each rank computes the logits of
  all those tokens over its rows, and the cross-entropy is computed over the shards (the max, the sum
  of exponentials and the target logit all-reduced over every rank, as in Megatron's vocabulary-
  parallel loss); the hidden states' gradients are summed over the tp ranks and reduce-scattered.

So per micro-batch a rank holds and moves tokens x hidden (for every dp x cp rank's tokens) instead of
vocabulary x hidden: a gain while the vocabulary is larger than the tokens of a micro-batch over all
dp x cp ranks (`p3d plan` shows both). Model code stays as it is: the two modules' forwards are
replaced; whatever the model does to the logits after the head must be elementwise (scaling,
soft-capping), which holds for the architectures whose parity is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from p3d.compat import local_box, swapped
from p3d.data import IGNORE_INDEX

_ATTRIBUTE = "_p3d_vocab_parallel"


@dataclass
class VocabularySharding:
    """How one rank computes its share of the embedding, the head and the loss."""

    vocab_group: dist.ProcessGroup  # every rank: the head's vocabulary is split over them
    data_group: dist.ProcessGroup  # the dp x cp ranks: they hold different tokens
    data_size: int
    data_rank: int
    tp_group: dist.ProcessGroup | None  # the tp ranks (same tokens, other vocabulary rows); None without tp
    vocab_start: int  # the first row of the head this rank holds
    embedding_start: int  # ... of the input embedding (the same row when tied or as long as the head)
    compute_dtype: torch.dtype = torch.float32

    def gather_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every dp x cp rank's `tensor` (hidden states, [batch, ...]) concatenated along dim 0 in rank
        order; its gradient goes back summed over the vocabulary shards to the rank that owns the tokens."""
        if self.data_size == 1 and self.tp_group is None:
            return tensor
        return _GatherTokens.apply(tensor, self)

    def gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Every dp x cp rank's token ids (or labels), in the order of `gather_tokens`."""
        if self.data_size == 1:
            return ids
        return _all_gather(ids.contiguous(), self.data_group)

    def token_loss_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss summed over every dp x cp rank's tokens, the same value on every rank: backward
        from it; its part over this rank's own tokens, detached: what the rank reports)."""
        all_labels = self.gather_ids(labels).flatten()
        losses = _VocabParallelCrossEntropy.apply(logits.float().flatten(0, -2), all_labels, self)
        own = losses.detach().view(self.data_size, -1)[self.data_rank]
        return losses.sum(), own.sum()


def vocab_parallel_head(model: nn.Module) -> VocabularySharding | None:
    """The model's vocabulary-parallel head, if `shard_embeddings_over_vocabulary` made one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, _ATTRIBUTE, None)


def vocabulary_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of vocabulary-parallel embeddings (FSDP2 leaves them alone); empty otherwise."""
    if vocab_parallel_head(model) is None:
        return set()
    return {*model.get_input_embeddings().parameters(), *model.get_output_embeddings().parameters()}


def vocabulary_weights(model: nn.Module) -> list[list[nn.Module]]:
    """The modules of each vocabulary-parallel weight: [embedding], [head], or [embedding, head] when
    tied; empty without vocabulary parallelism."""
    if vocab_parallel_head(model) is None:
        return []
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return [[embedding, head]] if head.weight is embedding.weight else [[embedding], [head]]


def vocab_parallel_problems(model: nn.Module, dp_replicate: int) -> list[str]:
    """Why `parallel.vocab_parallel=true` cannot run for this (meta) model and layout; empty if it can."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    fix = "set parallel.vocab_parallel=false"
    problems = []
    if dp_replicate > 1:
        problems.append("parallel.vocab_parallel=true shards the embeddings over every rank; it does not run with parallel.dp_replicate > 1: set parallel.dp_replicate=1 or parallel.vocab_parallel=false")
    if not isinstance(head, nn.Linear):
        problems.append(f"parallel.vocab_parallel=true needs the output head to be a Linear layer (this model's is {type(head).__name__}): {fix}")
    if not isinstance(embeddings, nn.Embedding) or embeddings.max_norm is not None or embeddings.sparse:
        problems.append(f"parallel.vocab_parallel=true needs the input embedding to be a plain Embedding (no max_norm, not sparse; this model's is {type(embeddings).__name__}): {fix}")
    return problems


def shard_embeddings_over_vocabulary(model: nn.Module, vocab_mesh: DeviceMesh, data_mesh: DeviceMesh, tp_mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """Shard the input embedding's and the output head's rows over `vocab_mesh` (1-D, every rank; one
    weight when they are tied) and compute them as described above. Neither may be sharded by tensor
    parallelism already (they are left out of the TP plan)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    sharded = {}  # a tied weight is sharded once
    for module in (embedding, head):
        for leaf in [name for name, _ in module.named_parameters(recurse=False)]:
            param = module._parameters[leaf]
            if param not in sharded:
                sharded[param] = nn.Parameter(distribute_tensor(param, vocab_mesh, [Shard(0)], src_data_rank=None), requires_grad=param.requires_grad)
            module.register_parameter(leaf, sharded[param])
    sharding = VocabularySharding(
        vocab_group=vocab_mesh.get_group(),
        data_group=data_mesh.get_group(),
        data_size=data_mesh.size(),
        data_rank=data_mesh.get_local_rank(),
        tp_group=tp_mesh.get_group() if tp_mesh.size() > 1 else None,
        vocab_start=local_box(head.weight)[0].start,
        embedding_start=local_box(embedding.weight)[0].start,
        compute_dtype=compute_dtype,
    )
    setattr(head, _ATTRIBUTE, sharding)
    embedding.forward = partial(_embedding_forward, embedding, embedding.forward, sharding)
    head.forward = partial(_head_forward, head, sharding)


def _embedding_forward(embedding: nn.Embedding, own_forward, sharding: VocabularySharding, input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's tokens embedded: every dp x cp rank's ids looked up in this rank's rows, the partial
    embeddings summed over the ranks. The module's own forward runs on the local rows (a model's
    embedding scale stays), with the padding row's index moved into them."""
    ids = sharding.gather_ids(input_ids)
    weight, start = embedding.weight.to_local(), sharding.embedding_start
    local_ids = ids - start
    here = (local_ids >= 0) & (local_ids < weight.shape[0])
    padding = embedding.padding_idx
    local_padding = padding - start if padding is not None and 0 <= padding - start < weight.shape[0] else None
    with swapped(embedding, weight=weight.to(sharding.compute_dtype), padding_idx=local_padding):
        partial_sums = own_forward(torch.where(here, local_ids, 0)) * here.unsqueeze(-1)
    return _ScatterTokens.apply(partial_sums, sharding)


def _head_forward(head: nn.Linear, sharding: VocabularySharding, hidden: torch.Tensor) -> torch.Tensor:
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
    def forward(ctx, tensor: torch.Tensor, sharding: VocabularySharding) -> torch.Tensor:
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


class _ScatterTokens(torch.autograd.Function):
    """Partial sums of every dp x cp rank's tokens -> this rank's tokens, summed over every rank
    (the tp ranks' all-reduced, then reduce-scattered over dp x cp); the backward all-gathers."""

    @staticmethod
    def forward(ctx, partial_sums: torch.Tensor, sharding: VocabularySharding) -> torch.Tensor:
        ctx.sharding = sharding
        partial_sums = partial_sums.contiguous()
        if sharding.tp_group is not None:
            dist.all_reduce(partial_sums, group=sharding.tp_group)
        if sharding.data_size == 1:
            return partial_sums
        own = partial_sums.new_empty((partial_sums.shape[0] // sharding.data_size, *partial_sums.shape[1:]))
        dist.reduce_scatter_single(own, partial_sums, group=sharding.data_group)
        return own

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sharding = ctx.sharding  # the tp ranks' gradients of the summed embedding are the same
        if sharding.data_size == 1:
            return grad, None
        return _all_gather(grad.contiguous(), sharding.data_group), None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary across `vocab_group` (0 for ignored
    labels); the same values on every rank. Its backward is local: each rank's logits' gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, sharding: VocabularySharding) -> torch.Tensor:
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
