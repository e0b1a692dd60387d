"""Context parallelism: the sequence is split over the cp ranks; attention stays exact.

Before the split, positions, next-token labels and document ids are computed for the whole
sequence (`data.make_batch`), so every token keeps its global index, label and document. Each
cp rank then holds a subset of the tokens (`sharding.py`). Transformers models call p3d's
attention through their attention interface (`config._attn_implementation = "p3d_cp"`), which
serves the micro-batch set up by `ContextParallel.attending()` with one implementation:

- ring / allgather (`cp_attention.py`): p3d's own exact blockwise attention, any backend,
  causal by global token index and, with packed documents, within each document;
- torch: PyTorch's ring attention (`context_parallel`'s SDPA dispatcher, flash / efficient
  kernels), CUDA only, plain causal only.

With `data.packing=documents` one process also uses p3d's attention (a cp group of one): the
model's own attention would let documents see each other.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from p3d import compat
from p3d.config.schema import CPImpl, CPLayout, Packing
from p3d.data import TokenBatch
from p3d.parallel.cp_attention import AllGatherAttention, AttentionOptions, AttentionTimer, CPComm, RingAttention, TilePlan, attention
from p3d.parallel.sharding import SequenceSharding

__all__ = [
    "ATTENTION_NAME", "ContextParallel", "SequenceSharding", "attending_in_one_process", "enable_context_parallel", "register_attention",
    "resolve_cp_impl", "uses_p3d_attention",
]

ATTENTION_NAME = "p3d_cp"
_TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, also while the sdpa route swaps the module attribute


def resolve_cp_impl(requested: CPImpl, device_type: str, packing: Packing) -> CPImpl:
    """`auto`: PyTorch's ring attention where it runs (CUDA, plain causal), else p3d's ring."""
    if requested is not CPImpl.auto:
        return requested
    return CPImpl.torch if device_type == "cuda" and packing is Packing.stream else CPImpl.ring


def uses_p3d_attention(cp: int, packing: Packing) -> bool:
    """Whether the model's attention is replaced by p3d's (also at cp=1 for packed documents)."""
    return cp > 1 or packing is Packing.documents


@dataclass
class _ActiveBatch:
    """What attention needs to serve the current micro-batch."""

    impl: CPImpl
    plan: TilePlan
    comm: CPComm
    timer: AttentionTimer


_active: _ActiveBatch | None = None


class ContextParallel:
    """Splits micro-batches over the cp group and serves their attention."""

    def __init__(self, cp_mesh: DeviceMesh, sharding: SequenceSharding, impl: CPImpl, timer: AttentionTimer):
        if impl is CPImpl.auto:
            raise ValueError("resolve parallel.cp_impl before building ContextParallel")
        self.mesh = cp_mesh
        self.rank = cp_mesh.get_local_rank()
        self.sharding = sharding
        self.impl = impl
        self.timer = timer
        self.comm = CPComm(cp_mesh.get_group())

    def split(self, batch: TokenBatch) -> TokenBatch:
        """This rank's tokens of every [batch, seq_len] tensor, all through the same permutation."""
        index = self.sharding.token_indices(self.rank, batch.seq_len)
        documents = batch.document_ids[:, index] if batch.document_ids is not None else None
        return replace(batch, input_ids=batch.input_ids[:, index], labels=batch.labels[:, index], position_ids=batch.position_ids[:, index], document_ids=documents)

    @contextmanager
    def attending(self, batch: TokenBatch, device: torch.device) -> Iterator[TokenBatch]:
        """Within this block (forward and backward), p3d_cp attention serves `batch`; yields this rank's part."""
        global _active
        documents = batch.document_ids.to(device) if batch.document_ids is not None else None
        plan = TilePlan(self.sharding, self.rank, batch.seq_len, documents, device)
        _active = _ActiveBatch(self.impl, plan, self.comm, self.timer)
        torch_ring = compat.torch_ring_attention(self.mesh, self.sharding.layout is CPLayout.balanced) if self.impl is CPImpl.torch else nullcontext()
        try:
            with torch_ring:
                yield self.split(batch)
        finally:
            _active = None


@contextmanager
def attending_in_one_process(plan: TilePlan) -> Iterator[None]:
    """p3d_cp attention over one process's tokens, laid out as `plan` says (the CP probe of models/probe.py)."""
    global _active
    _active = _ActiveBatch(CPImpl.ring, plan, CPComm(None), AttentionTimer(False, plan.device))
    try:
        yield
    finally:
        _active = None


def context_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention interface: query/key [b, heads or kv heads, n, d], value [b, kv heads, n, dv] -> [b, n, heads, dv].

    Honours what the layer passes: `sliding_window`, `softcap` and attention sinks (`s_aux`, one logit
    per head). Bidirectional layers (`is_causal=False`) and attention dropout are refused at
    validation (see models/probe.py); reaching them here is a bug, not silently wrong results."""
    if _active is None:
        raise RuntimeError("p3d_cp attention called outside ContextParallel.attending()")
    if dropout and module.training:
        raise RuntimeError("p3d_cp attention has no attention dropout; set the model's attention dropout to 0")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise RuntimeError(f"p3d_cp attention is causal; {type(module).__name__} asked for bidirectional attention")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    options = attention_options(kwargs)
    sinks = kwargs.get("s_aux")
    if _active.impl is CPImpl.torch:
        if options != AttentionOptions() or sinks is not None:
            raise RuntimeError("parallel.cp_impl=torch runs plain causal attention only")
        output = _torch_ring_attention(query, key, value, scale, _active.timer)
    else:
        schedule = RingAttention if _active.impl is CPImpl.ring else AllGatherAttention
        output = attention(schedule, query, key, value, sinks, _active.plan, _active.comm, scale, options, _active.timer)
    return output.transpose(1, 2).contiguous(), None


def attention_options(kwargs: dict) -> AttentionOptions:
    """The sliding window and softcap a transformers layer passes to its attention function."""
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    return AttentionOptions(window=int(window) if window else None, softcap=float(softcap) if softcap else None)


def _torch_ring_attention(query, key, value, scale: float, timer: AttentionTimer) -> torch.Tensor:
    """PyTorch's CP: SDPA on sequence-sharded q/k/v is dispatched to its ring attention (CUDA kernels)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    with timer.total(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        return _TORCH_SDPA(query, key, value, is_causal=True, scale=scale)


def _no_mask(*args, **kwargs):
    """p3d_cp masks by global token index and document; transformers' local mask would be wrong."""
    return None


def register_attention(name: str = ATTENTION_NAME, function=context_parallel_attention) -> None:
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, _no_mask)


ROUTES = ("interface", "sdpa", "attn_method")


def enable_context_parallel(model, route: str = "interface", blocks=()) -> None:
    """Make the model's attention p3d's. `interface`: through transformers' attention interface (most
    models). `sdpa`: the model calls torch's scaled_dot_product_attention itself (Falcon); inside each
    of `blocks` that call is p3d's attention instead. `attn_method`: the attention modules compute
    softmax(q k^T) v in a method `_attn(query, key, value, attention_mask)` (GPT-J, CodeGen), which
    becomes p3d's attention. In both, the model's mask (built from local positions) is ignored: p3d
    masks by global index; models/probe.py checks the result is the model's own."""
    register_attention()
    use_global_positions(model)
    if route == "sdpa":
        for block in blocks:
            block.forward = with_p3d_sdpa(block.forward, block)
    elif route == "attn_method":
        for block in blocks:
            replace_attn_methods(block)
    else:
        model.set_attn_implementation(ATTENTION_NAME)


def use_global_positions(model) -> None:
    """Position embeddings that are handed positions counted from the local sequence (BART's decoder passes
    its own arange) get the global `position_ids` the model was called with instead."""
    current: dict[str, torch.Tensor | None] = {"ids": None}

    def capture(module, args, kwargs):
        current["ids"] = kwargs.get("position_ids")

    def substitute(module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        ids = _shaped_like(current["ids"], bound.arguments.get("position_ids"))
        if ids is None:
            return None
        bound.arguments["position_ids"] = ids
        return bound.args, bound.kwargs

    model.register_forward_pre_hook(capture, with_kwargs=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and "position_ids" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(substitute, with_kwargs=True)


def _shaped_like(ids: torch.Tensor | None, own: torch.Tensor | None) -> torch.Tensor | None:
    """The global positions in the shape the module was given its own in ([batch, seq], [1, seq] or [seq])."""
    if ids is None or own is None or own.shape == ids.shape:
        return ids
    if not bool((ids == ids[:1]).all()) or own.numel() != ids.shape[-1]:
        # validation's probe refuses such models for packed documents; reaching this is a bug, never wrong results
        raise RuntimeError("this model's position embedding takes one row of positions; rows with different positions cannot be given")
    return ids[0].reshape(own.shape)


def replace_attn_methods(block, attention=None) -> int:
    """Each attention module's `_attn(query, key, value, attention_mask, ...)` in `block` becomes p3d's
    attention, scaled as the module scales (`scale_attn` or `norm_factor`: scores / it); how many."""
    attention = attention or context_parallel_attention
    replaced = 0
    for module in block.modules():
        if callable(getattr(module, "_attn", None)):
            module._attn = _p3d_attn_method(module, attention)
            replaced += 1
    return replaced


def _p3d_attn_method(module, attention):
    divisor = getattr(module, "scale_attn", None)
    divisor = divisor if divisor is not None else getattr(module, "norm_factor", None)
    scaling = 1.0 / float(divisor) if divisor is not None else None
    dropout = getattr(getattr(module, "attn_dropout", None), "p", 0.0)

    def attn(query, key, value, attention_mask=None, *args, **kwargs):
        output, _ = attention(module, query, key, value, None, scaling=scaling, dropout=dropout if module.training else 0.0)
        return output.transpose(1, 2), None

    return attn


def with_p3d_sdpa(forward, owner, attention=None):
    """`forward` with torch's scaled_dot_product_attention replaced by p3d's attention while it runs.

    Wraps the forward itself (not a hook), so activation checkpointing's recomputation, which calls the
    wrapped forward again, recomputes with the same attention."""
    attention = attention or context_parallel_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        output, _ = attention(owner, query, key, value, None, scaling=scale, dropout=dropout_p)
        return output.transpose(1, 2)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        F.scaled_dot_product_attention = sdpa
        try:
            return forward(*args, **kwargs)
        finally:
            F.scaled_dot_product_attention = _TORCH_SDPA

    return run
