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
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping

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
    "ATTENTION_NAME", "AttentionRoute", "ContextParallel", "SequenceSharding", "attending_in_one_process", "enable_context_parallel", "register_attention",
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
    cache: dict = field(default_factory=dict)  # the own-attention routes' token indices and masks, built once per micro-batch


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
def attending_in_one_process(plan: TilePlan, comm: CPComm | None = None) -> Iterator[None]:
    """p3d_cp attention over one process's tokens, laid out as `plan` says (the CP probe of models/probe.py);
    `comm`: a stand-in for the cp group's collectives (default: a group of one)."""
    global _active
    _active = _ActiveBatch(CPImpl.ring, plan, comm or CPComm(None), AttentionTimer(False, plan.device))
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


ROUTES = ("interface", "sdpa", "attn_method", "gathered_keys", "whole_sequence")
OWN_ATTENTION_ROUTES = ("gathered_keys", "whole_sequence")  # the model's own attention code stays
ROUTE_WORDS = {  # what the start-up line says each route does
    "interface": "p3d's {impl} attention, through transformers' attention interface",
    "sdpa": "p3d's {impl} attention, in place of the model's own SDPA call",
    "attn_method": "p3d's {impl} attention, as the model's _attn method",
    "gathered_keys": "the model's own attention code, its keys and values all-gathered over the cp ranks (allgather, whatever parallel.cp_impl)",
    "whole_sequence": "the model's own attention code on the whole sequence, gathered on every cp rank: that attention is not split",
}
MASK_ARGUMENTS = ("attention_mask", "mask")  # what attention written by hand calls its mask (XLM: `mask`)


@dataclass(frozen=True)
class AttentionRoute:
    """How p3d runs a model's attention under CP (what models/probe.py found on its tiny copy)."""

    name: str = "interface"  # one of ROUTES
    causal_by_mask: bool = False  # modules saying is_causal=False belong to a model that masks causally (BigBirdPegasus)
    token_arguments: Mapping[str, int] = field(default_factory=dict)  # whole_sequence: the attention's per-token arguments {name: dim}
    rebuilt_arguments: Mapping[str, Callable] = field(default_factory=dict)  # whole_sequence: the model's own rebuilds {name: rebuild}

    def describe(self, impl: CPImpl) -> str:
        """What the start-up line says."""
        return ROUTE_WORDS[self.name].format(impl=impl.value)


def enable_context_parallel(model, route: AttentionRoute = AttentionRoute(), blocks=(), attentions=()) -> None:
    """Make the model's attention p3d's. `interface`: through transformers' attention interface (most
    models). `sdpa`: the model calls torch's scaled_dot_product_attention itself (Falcon); inside each
    of `blocks` that call is p3d's attention instead. `attn_method`: the attention modules compute
    softmax(q k^T) v in a method `_attn(query, key, value, attention_mask)` (GPT-J, CodeGen), which
    becomes p3d's attention. In both, the model's mask (built from local positions) is ignored: p3d
    masks by global index. Attention written by hand keeps the model's own code, given what it needs
    to see the whole sequence: `gathered_keys` (MVP, TrOCR) all-gathers the keys and values of each of
    `attentions` (`gather_keys_and_values`), `whole_sequence` (BERT-like decoders, XGLM, BLOOM)
    all-gathers their input (`attend_over_whole_sequence`). models/probe.py checks the result is the
    model's own before a route is used."""
    register_attention()
    use_global_positions(model)
    if route.causal_by_mask:
        for module in model.modules():
            if getattr(module, "is_causal", None) is False:
                module.is_causal = True
    if route.name == "sdpa":
        for block in blocks:
            block.forward = with_p3d_sdpa(block.forward, block)
    elif route.name == "attn_method":
        for block in blocks:
            replace_attn_methods(block)
    elif route.name in OWN_ATTENTION_ROUTES:
        if compat.attention_implementation(model) != "eager":
            model.set_attn_implementation("eager")  # as the probe ran it (SDPA's path may leave the mask out)
        if route.name == "gathered_keys":
            gather_keys_and_values(attentions)
        else:
            attend_over_whole_sequence(attentions, dict(route.token_arguments), rebuilt_arguments=route.rebuilt_arguments)
    else:
        model.set_attn_implementation(ATTENTION_NAME)


def gather_keys_and_values(attentions) -> None:
    """The `gathered_keys` route: the allgather schedule, done by the model's own attention code.

    The key and value projections' outputs, this rank's tokens, are all-gathered over the cp group (rank
    0's tokens, then rank 1's, ...; the backward sums their gradients back to their owners), so the
    module scores its local queries against every key. Its `attention_mask`, built by the model for the
    local tokens as if they were a whole sequence, is replaced by the mask of the same format over
    global indices (`_with_global_mask`). Per rank: the keys and values of the whole sequence, and the local
    x all scores the model's eager attention holds."""
    for found in attentions:
        found.key.register_forward_hook(_gathered_sequence)
        found.value.register_forward_hook(_gathered_sequence)
        found.module.register_forward_pre_hook(_masked_for_gathered_keys, with_kwargs=True)


def attend_over_whole_sequence(attentions, token_arguments: dict[str, int] | None = None, discover: bool = False, rebuilt_arguments=None) -> None:
    """The `whole_sequence` route, for attention code that sizes its keys by its own input (BERT-like
    reshapes, causal buffers sliced by length): its input is all-gathered and put in sequence order, it
    runs on the whole sequence (with the mask of the whole sequence), and each rank keeps the output of
    its own tokens. Exact, but not split: every cp rank computes the whole attention of every layer and
    holds its whole x whole scores; the rest of the model (MLPs, norms, head, loss) is split.

    `token_arguments`: other arguments with one entry per token ({name: dimension}: RoFormer's rotary
    table), gathered and ordered likewise. `discover` (the probe): any other tensor argument with exactly
    one dimension of this rank's token count is taken as one, and written into `token_arguments`.
    `rebuilt_arguments`: {name: rebuild(module, local value, sequence length) -> the whole sequence's}, for
    arguments that are not per-token values of global positions (BLOOM's ALiBi, built from local ones)."""
    token_arguments = {} if token_arguments is None else token_arguments
    hook = functools.partial(_whole_sequence_input, token_arguments=token_arguments, discover=discover, rebuilt=dict(rebuilt_arguments or {}))
    for found in attentions:
        found.module.register_forward_pre_hook(hook, with_kwargs=True)
        found.module.register_forward_hook(_own_tokens_of_output)


def _serving() -> _ActiveBatch:
    if _active is None:
        raise RuntimeError("p3d's context-parallel attention called outside ContextParallel.attending()")
    return _active


def _cached(active: _ActiveBatch, key, build):
    if key not in active.cache:
        active.cache[key] = build()
    return active.cache[key]


def _token_indices(active: _ActiveBatch) -> torch.Tensor:
    """Global indices of this rank's tokens, in the order it holds them."""
    plan = active.plan
    return _cached(active, "tokens", lambda: plan.sharding.token_indices(plan.rank, plan.seq_len).to(plan.device))


def _gathered_indices(active: _ActiveBatch) -> torch.Tensor:
    """Global indices of the tokens in all-gather order (rank 0's, then rank 1's, ...)."""
    plan = active.plan
    return _cached(active, "gathered", lambda: plan.sharding.gathered_token_indices(plan.seq_len).to(plan.device))


def _gathered_sequence(module, args, output):
    active = _serving()
    return _GatherSequence.apply(_checked_local(module, output, active), active.comm)


class _GatherSequence(torch.autograd.Function):
    """[b, n, f] of each cp rank -> [b, size * n, f] in rank order (the tokens along `dim`, 1 by default);
    backward: the gradients summed back to their owners."""

    @staticmethod
    def forward(ctx, tensor, comm: CPComm, dim: int = 1):
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(tensor).movedim(0, dim).flatten(dim, dim + 1)  # [size, ..., n, ...] -> [..., size * n, ...]

    @staticmethod
    def backward(ctx, grad):
        size, dim = ctx.comm.size, ctx.dim
        return ctx.comm.reduce_scatter(grad.unflatten(dim, (size, grad.shape[dim] // size)).movedim(dim, 0)), None, None


def _masked_for_gathered_keys(module, args, kwargs):
    active = _serving()
    return _with_global_mask(module, args, kwargs, _token_indices(active), _gathered_indices(active))


def _whole_sequence_input(module, args, kwargs, token_arguments: dict[str, int], discover: bool, rebuilt: dict):
    active = _serving()
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    first = next(iter(bound.arguments))  # the hidden states
    order = _cached(active, "order", lambda: torch.argsort(_gathered_indices(active)))  # all-gather order -> sequence order
    local = len(_token_indices(active))
    bound.arguments[first] = _GatherSequence.apply(_checked_local(module, bound.arguments[first], active), active.comm)[:, order]
    for name, rebuild in rebuilt.items():
        if isinstance(bound.arguments.get(name), torch.Tensor):
            bound.arguments[name] = rebuild(module, bound.arguments[name], active.plan.seq_len)
    if discover:
        token_arguments.update(_per_token_arguments(bound.arguments, skip=(first, *MASK_ARGUMENTS, *rebuilt), local=local))
    for name, dim in token_arguments.items():
        value = bound.arguments.get(name)
        if isinstance(value, torch.Tensor):
            if value.shape[dim] != local:
                raise RuntimeError(f"p3d's context-parallel attention expects {type(module).__name__}'s {name} with {local} local tokens along dim {dim}")
            bound.arguments[name] = _GatherSequence.apply(value, active.comm, dim % value.dim()).index_select(dim, order)
    whole = torch.arange(active.plan.seq_len, device=active.plan.device)
    return _with_global_mask(module, bound.args, bound.kwargs, whole, whole, optional=True)


def _per_token_arguments(arguments: dict, skip: tuple[str, ...], local: int) -> dict[str, int]:
    """{name: dimension (from the end)} of the tensor arguments with exactly one dimension (not the first) of `local` entries."""
    found = {}
    for name, value in arguments.items():
        if name in skip or not isinstance(value, torch.Tensor):
            continue
        dims = [dim for dim in range(1, value.dim()) if value.shape[dim] == local]
        if len(dims) == 1:
            found[name] = dims[0] - value.dim()
    return found


def _checked_local(module, tensor: torch.Tensor, active: _ActiveBatch) -> torch.Tensor:
    """`tensor` (a projection's output or the attention's input), checked to be [batch, this rank's tokens, features]."""
    local = len(_token_indices(active))
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[1] != local:
        raise RuntimeError(f"p3d's context-parallel attention expects [batch, {local} local tokens, features] at {type(module).__name__}")
    return tensor


def _own_tokens_of_output(module, args, output):
    active = _serving()
    own = _token_indices(active)
    if isinstance(output, (tuple, list)):  # (output, attention weights, ...): OpenAI GPT's is a list
        return type(output)([output[0][:, own], *output[1:]])
    return output[:, own]


def _with_global_mask(module, args, kwargs, queries: torch.Tensor, keys: torch.Tensor, optional: bool = False):
    """The module's `attention_mask` (built by the model for the local tokens as if they were a whole sequence)
    replaced by the mask of the same format over these global query and key indices: causal and, with packed
    documents, within each document. It must be causal (else an error, never wrong results); anything else it
    might carry (a sliding window) is not rebuilt: models/probe.py runs the route against the model's own
    attention, with windows shorter than its sequence, before it is used. `optional`: a model may pass none."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    name = next((name for name in MASK_ARGUMENTS if name in bound.arguments), MASK_ARGUMENTS[0])
    local = bound.arguments.get(name)
    if local is None and optional:
        return bound.args, bound.kwargs
    if isinstance(local, torch.Tensor) and local.dim() == 2 and (local.device.type == "meta" or bool(_allowed_by(local).all())):
        # a key-padding mask that lets every key through (bidirectional XLM): so does the whole sequence's
        bound.arguments[name] = local[:, :1].expand(local.shape[0], len(keys))
        return bound.args, bound.kwargs
    if not isinstance(local, torch.Tensor) or local.dim() not in (3, 4):
        raise RuntimeError(f"p3d's context-parallel attention needs {type(module).__name__}'s 3-D or 4-D {name}, got {type(local).__name__}")
    active = _serving()
    # every layer is usually handed the same mask: checked once per micro-batch (the cache holds it, so its id stays its own)
    _, blocked_when_true = _cached(active, ("convention", id(local)), lambda: (local, _mask_convention(module, local)))
    key = ("mask", local.dtype, tuple(local.shape), len(queries), len(keys), blocked_when_true)
    if key not in active.cache:
        mask = _mask_like(local, _allowed(active.plan, queries, keys))
        active.cache[key] = ~mask if blocked_when_true else mask
    bound.arguments[name] = active.cache[key]
    return bound.args, bound.kwargs


def _mask_convention(module, local: torch.Tensor) -> bool:
    """Whether True means blocked (MPT's boolean masks); an error if the mask is not causal either way."""
    if local.device.type == "meta":  # `p3d plan`: no values to check
        return False
    if local.dtype == torch.bool and _is_causal(~local):
        return True
    if not _is_causal(local):
        raise RuntimeError(f"{type(module).__name__}'s attention mask is not causal: p3d's context-parallel attention cannot rebuild it")
    return False


def _allowed(plan: TilePlan, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[batch or 1, queries, keys]: True where a query may see a key (by global index, and document)."""
    allowed = (queries[:, None] >= keys[None, :])[None]
    if plan.document_ids is not None:
        allowed = allowed & (plan.document_ids[:, queries, None] == plan.document_ids[:, None, keys])
    return allowed


def _allowed_by(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def _is_causal(mask: torch.Tensor) -> bool:
    """No query sees a later token, and every query sees itself. (transformers may cut the causal mask into
    blocks where the local positions jump, as they do between a rank's chunks: the global mask is whole.)"""
    allowed = _allowed_by(mask)
    n = mask.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return not bool((allowed & future).any()) and bool(allowed.diagonal(dim1=-2, dim2=-1).all())


def _mask_like(local: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` [b or 1, n, N] in the local mask's format (bool, or additive 0 / dtype's minimum) and leading
    dims ([b, heads or 1, n, N], or [b, n, N] as XLM's)."""
    batch = max(local.shape[0], allowed.shape[0])
    middle = local.shape[1:-2]
    allowed = allowed.reshape(allowed.shape[0], *(1 for _ in middle), *allowed.shape[1:]).expand(batch, *middle, *allowed.shape[1:])
    if local.dtype == torch.bool:
        return allowed
    blocked = torch.tensor(torch.finfo(local.dtype).min, dtype=local.dtype, device=local.device)
    return torch.where(allowed, torch.zeros((), dtype=local.dtype, device=local.device), blocked)


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
    """The global positions in the shape the module was given its own in ([batch, seq], [1, seq] or [seq]);
    one row of them ([seq]) where the model gave none (BART-family embeddings unsqueeze the ones they are given)."""
    if ids is None or (own is not None and own.shape == ids.shape):
        return ids
    rows_differ = ids.device.type != "meta" and not bool((ids == ids[:1]).all())  # `p3d plan` traces on meta: one row
    if rows_differ or (own is not None and own.numel() != ids.shape[-1]):
        # validation's probe refuses such models for packed documents; reaching this is a bug, never wrong results
        raise RuntimeError("this model's position embedding takes one row of positions; rows with different positions cannot be given")
    return ids[0] if own is None else ids[0].reshape(own.shape)


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
