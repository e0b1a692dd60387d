"""Exact attention over a sequence split across context-parallel ranks, on any backend.

Each rank holds the queries, keys and values of its own tokens (see `sharding.py`). Attention
is computed in tiles: (a run of local queries) x (a run of some rank's keys), each run at most
TILE_TOKENS long, so the scores held at once do not grow with the chunk length. A tile whose keys
all come after its queries is skipped; one whose keys all come before needs no causal mask; a
tile on the diagonal gets the causal mask by global token index; with packed documents a
tile also masks keys of other documents, and is skipped when no query may see any key. Tile
results are merged with their log-sum-exp, so the sum over tiles equals one softmax over all
keys. Two schedules bring the keys to the queries:

- ring: K/V blocks travel around the cp group by point-to-point send/recv, the next block in
  flight while the current one is computed. Backward travels the ring again; the dK/dV of each
  block travel with it and arrive back at its owner after one full turn. Per-rank memory holds
  two K/V blocks, not the whole sequence.
- allgather: every rank gathers all K/V up front (backward reduce-scatters dK/dV). Simpler,
  fewer messages, but per-rank K/V memory is that of the whole sequence.

Both have their own exact backward (recomputing each tile's probabilities from the saved
log-sum-exp, as flash attention does).

What a layer's attention asks for beyond plain causal comes with each call (`AttentionOptions`):
a sliding window (a query sees the keys less than `window` tokens before it, as transformers'
masks do: tiles wholly outside the window are skipped), softcapped scores (`cap * tanh(s / cap)`
of the scaled scores, Gemma 2), and attention sinks (one learned logit per head that joins every
row's softmax without a value, GPT-OSS style): merged into the log-sum-exp after the last tile, so
the tiles' math does not change, and their gradient is `-p_sink * rowsum(dO * O)`. Grouped-query attention is handled by viewing the
query heads as [kv heads, group], so K/V are never repeated. Keys and values of different head
dims (multi-head latent attention: MiniCPM3, DeepSeek-V3) are zero-padded to one width before the
schedules (`attention`), which is exact: padded query/key dims add 0 to every score, padded value
dims give output dims that are cut off again. Math is fp32 whatever the input.
On CPU each tile runs ATen's fused flash-attention kernel (forward returns the tile's
log-sum-exp; backward takes the merged output and log-sum-exp); elsewhere the same math runs
as plain matmuls.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from p3d import compat
from p3d.parallel.sharding import ChunkRange, SequenceSharding

NEG_INF = float("-inf")
_KV_TAG, _DKV_TAG = 0, 1  # distinct p2p tags: K/V and dK/dV can be in flight to the same peer


TILE_TOKENS = 512  # longest run of queries or keys in one tile: bounds the scores held at once
FUSED_ON_CPU = True  # tiles on CPU by ATen's fused flash kernel (~7x faster); elsewhere by the matmuls below


def _split(runs: list[ChunkRange]) -> list[ChunkRange]:
    """Runs cut into pieces of at most TILE_TOKENS, so a tile's scores stay small however long the chunks
    (and tiles entirely in the future are skipped at that finer grain)."""
    return [
        ChunkRange(run.global_start + offset, run.local_start + offset, min(TILE_TOKENS, run.length - offset))
        for run in runs
        for offset in range(0, run.length, TILE_TOKENS)
    ]


@dataclass(frozen=True)
class AttentionOptions:
    """What one attention call asks for beyond plain causal attention."""

    window: int | None = None  # sliding window: a query sees keys at most window-1 tokens before it
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap)


@dataclass(frozen=True)
class Tile:
    """Local query rows x key rows of one source block that have something to attend to."""

    queries: slice
    keys: slice
    mask: torch.Tensor | None  # [batch or 1, queries, keys] True = may attend; None: every key visible


@dataclass
class TilePlan:
    """The tiles of one micro-batch for the queries of `rank`, built once and reused by every layer."""

    sharding: SequenceSharding
    rank: int
    seq_len: int
    document_ids: torch.Tensor | None  # [batch, seq_len] over the whole sequence, or None
    device: torch.device
    _cache: dict[tuple[int, int | None], list[Tile]] = field(default_factory=dict)

    def tiles(self, source: int, window: int | None = None) -> list[Tile]:
        """Tiles of this rank's queries against the keys held by cp rank `source` (within `window`)."""
        if (source, window) not in self._cache:
            self._cache[source, window] = [
                tile
                for query_run in _split(self.sharding.chunk_ranges(self.rank, self.seq_len))
                for key_run in _split(self.sharding.chunk_ranges(source, self.seq_len))
                if (tile := self._tile(query_run, key_run, window)) is not None
            ]
        return self._cache[source, window]

    def _tile(self, queries: ChunkRange, keys: ChunkRange, window: int | None) -> Tile | None:
        q_first, q_last = queries.global_start, queries.global_start + queries.length - 1
        k_first, k_last = keys.global_start, keys.global_start + keys.length - 1
        if k_first > q_last:
            return None  # every key is in every query's future
        if window is not None and q_first - k_last >= window:
            return None  # every key is out of every query's window
        mask = None
        if k_last > q_first or (window is not None and q_last - k_first >= window):
            q_index = torch.arange(q_first, q_last + 1, device=self.device)[:, None]
            k_index = torch.arange(k_first, k_last + 1, device=self.device)[None, :]
            mask = q_index >= k_index
            if window is not None:
                mask = mask & (q_index - k_index < window)
            mask = mask[None]
        if self.document_ids is not None and not self._one_document(min(q_first, k_first), max(q_last, k_last)):
            docs = self.document_ids
            same = docs[:, q_first : q_last + 1, None] == docs[:, None, k_first : k_last + 1]
            mask = same if mask is None else mask & same
            if not bool(mask.any()):
                return None
        rows = slice(queries.local_start, queries.local_start + queries.length)
        columns = slice(keys.local_start, keys.local_start + keys.length)
        return Tile(rows, columns, mask)

    def _one_document(self, first: int, last: int) -> bool:
        """Whether tokens first..last are one document in every row (document ids never decrease)."""
        return bool((self.document_ids[:, first] == self.document_ids[:, last]).all())


class AttentionTimer:
    """Seconds this rank spends in CP attention: the tiles' math alone, and all of it (with communication).

    `total_s` is wall time. `compute_s` is the work of the tiles: on CPU the calling thread's CPU
    time (so ranks that share cores are still compared by their own work), on CUDA synchronised
    wall time.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        self.compute_s = 0.0
        self.total_s = 0.0

    @contextmanager
    def _timed(self, attribute: str, clock) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        started = clock()
        try:
            yield
        finally:
            self._sync()
            setattr(self, attribute, getattr(self, attribute) + clock() - started)

    def compute(self):
        return self._timed("compute_s", time.thread_time if self.device.type == "cpu" else time.perf_counter)

    def total(self):
        return self._timed("total_s", time.perf_counter)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _InFlight:
    """A tensor being received; `wait()` returns it once it has arrived (and our send is done)."""

    def __init__(self, works: list, tensor: torch.Tensor):
        self.works = works
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.tensor


class CPComm:
    """Collectives and ring point-to-point transfers over the cp group (rank i sends to i+1)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if self.size > 1:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
            self.previous = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The rank whose K/V block this rank holds at ring step `step`."""
        return (self.rank - step) % self.size

    def pass_on(self, tensor: torch.Tensor, tag: int) -> _InFlight:
        """Send `tensor` to the next rank and receive the previous rank's, without waiting."""
        if self.size == 1:
            return _InFlight([], tensor)
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
                dist.P2POp(dist.irecv, received, self.previous, self.group, tag),
            ]
        )
        return _InFlight(works, received)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[size, *tensor.shape]: every rank's tensor, in rank order."""
        if self.size == 1:
            return tensor[None]
        gathered = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_single(gathered.flatten(0, 1), tensor.contiguous(), group=self.group)
        return gathered

    def reduce_scatter(self, stacked: torch.Tensor) -> torch.Tensor:
        """Sum `stacked` [size, ...] over ranks and keep this rank's slice."""
        if self.size == 1:
            return stacked[0]
        result = torch.empty(stacked.shape[1:], dtype=stacked.dtype, device=stacked.device)
        dist.reduce_scatter_single(result, stacked.flatten(0, 1).contiguous(), group=self.group)
        return result


# ---- tile math: q5 [batch, kv heads, group, queries, dim]; kv [2, batch, kv heads, keys, dim] ----


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, heads, length, dim = query.shape
    return query.float().reshape(batch, kv_heads, heads // kv_heads, length, dim)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """-inf (a row that saw no key yet) -> 0, so exp(x - lse) gives 0 instead of NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _tile_scores(q5: torch.Tensor, kv: torch.Tensor, tile: Tile, scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(masked scores, tanh of the capped scores or None)."""
    keys = kv[0][:, :, None, tile.keys]
    scores = torch.matmul(q5[..., tile.queries, :], keys.transpose(-1, -2)) * scale
    capped = None
    if softcap is not None:
        capped = torch.tanh(scores / softcap)
        scores = capped * softcap
    if tile.mask is not None:
        scores = scores.masked_fill(~tile.mask[:, None, None], NEG_INF)
    return scores, capped


def _fused(q5: torch.Tensor, options: AttentionOptions) -> bool:
    return FUSED_ON_CPU and q5.device.type == "cpu" and options.softcap is None


def _tile_forward(q5, kv, tile: Tile, scale: float, options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    if _fused(q5, options):
        return _fused_tile_forward(q5, kv, tile, scale)
    scores, _ = _tile_scores(q5, kv, tile, scale, options.softcap)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse)[..., None])
    return torch.matmul(probs, kv[1][:, :, None, tile.keys]), lse


def _tile_backward(q5, kv, dout5, out5, lse, delta, tile: Tile, scale: float, options: AttentionOptions, dq5, dkv) -> None:
    """Add this tile's gradients to dq5 (queries) and dkv (the source block's keys and values)."""
    if _fused(q5, options):
        return _fused_tile_backward(q5, kv, dout5, out5, lse, tile, scale, dq5, dkv)
    scores, capped = _tile_scores(q5, kv, tile, scale, options.softcap)
    probs = torch.exp(scores - lse[..., tile.queries, None])
    dout = dout5[..., tile.queries, :]
    dkv[1][:, :, tile.keys] += torch.matmul(probs.transpose(-1, -2), dout).sum(2)
    dprobs = torch.matmul(dout, kv[1][:, :, None, tile.keys].transpose(-1, -2))
    dscores = probs * (dprobs - delta[..., tile.queries, None]) * scale
    if capped is not None:
        dscores = dscores * (1 - capped.square())
    dq5[..., tile.queries, :] += torch.matmul(dscores, kv[0][:, :, None, tile.keys])
    dkv[0][:, :, tile.keys] += torch.matmul(dscores.transpose(-1, -2), q5[..., tile.queries, :]).sum(2)


# ---- the same tile math by the fused CPU kernel: the group dim is folded into the query rows ----


def _rows(x5: torch.Tensor) -> torch.Tensor:
    """[batch, kv heads, group, n, ...] -> [batch, kv heads, group * n, ...]: GQA without repeating K/V."""
    return x5.reshape(*x5.shape[:2], -1, *x5.shape[4:])


def _bias(tile: Tile, groups: int) -> torch.Tensor | None:
    """The tile's mask as the additive [batch or 1, 1, group * queries, keys] mask of the fused kernel."""
    if tile.mask is None:
        return None
    rows = tile.mask.repeat(1, groups, 1)
    return torch.zeros(rows.shape, dtype=torch.float32, device=rows.device).masked_fill_(~rows, NEG_INF)[:, None]


def _fused_tile_forward(q5, kv, tile: Tile, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    queries = q5[..., tile.queries, :]
    out, lse = compat.cpu_flash_attention(_rows(queries), kv[0][:, :, tile.keys], kv[1][:, :, tile.keys], _bias(tile, q5.shape[2]), scale)
    lse = lse.reshape(queries.shape[:-1])
    if tile.mask is not None:  # a row that sees no key of this tile must weigh nothing when merged
        lse = lse.masked_fill(~tile.mask.any(-1)[:, None, None], NEG_INF)
    return out.reshape(queries.shape), lse


def _fused_tile_backward(q5, kv, dout5, out5, lse, tile: Tile, scale: float, dq5, dkv) -> None:
    rows = tile.queries
    dq, dk, dv = compat.cpu_flash_attention_backward(
        _rows(dout5[..., rows, :]), _rows(q5[..., rows, :]), kv[0][:, :, tile.keys], kv[1][:, :, tile.keys],
        _rows(out5[..., rows, :]), _rows(_finite(lse[..., rows])), _bias(tile, q5.shape[2]), scale,
    )
    dq5[..., rows, :] += dq.reshape(dq5[..., rows, :].shape)
    dkv[0][:, :, tile.keys] += dk
    dkv[1][:, :, tile.keys] += dv


class _Merged:
    """Running attention output and log-sum-exp of the local queries over the tiles seen so far."""

    def __init__(self, q5: torch.Tensor):
        self.out = torch.zeros_like(q5)
        self.lse = torch.full(q5.shape[:-1], NEG_INF, dtype=q5.dtype, device=q5.device)

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        old_lse = self.lse[..., rows]
        new_lse = torch.logaddexp(old_lse, lse)
        base = _finite(new_lse)
        old_weight = torch.exp(old_lse - base)[..., None]
        new_weight = torch.exp(lse - base)[..., None]
        self.out[..., rows, :] = self.out[..., rows, :] * old_weight + out * new_weight
        self.lse[..., rows] = new_lse


    def add_sinks(self, sinks: torch.Tensor) -> None:
        """One more logit per head (`sinks`, [heads]) in every row's softmax, with no value."""
        sink = sinks.float().reshape(1, *self.lse.shape[1:3], 1)
        lse = torch.logaddexp(self.lse, sink)
        self.out = self.out * torch.exp(self.lse - lse)[..., None]
        self.lse = lse


def _sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d loss / d sink = -sum over rows of p_sink * rowsum(dO * O)."""
    sink = sinks.float().reshape(1, *lse.shape[1:3], 1)
    return -(torch.exp(sink - lse) * delta).sum(dim=(0, 3)).reshape(sinks.shape).to(sinks.dtype)


def _add_tiles(merged: _Merged, q5, kv, tiles: list[Tile], scale: float, options: AttentionOptions) -> None:
    for tile in tiles:
        merged.add(tile.queries, *_tile_forward(q5, kv, tile, scale, options))


def _backward_inputs(query: torch.Tensor, kv_heads: int, grad_out: torch.Tensor, out5: torch.Tensor):
    """Grouped queries, the output gradient, delta = rowsum(dO * O) and a zero dQ: shared by both schedules."""
    q5 = _grouped(query, kv_heads)
    dout5 = grad_out.float().reshape(out5.shape)
    return q5, dout5, (dout5 * out5).sum(-1), torch.zeros_like(q5)


def _output(merged: _Merged, query: torch.Tensor) -> torch.Tensor:
    return merged.out.reshape(query.shape).to(query.dtype)


class RingAttention(torch.autograd.Function):
    """Ring schedule: K/V blocks rotate around the cp group, overlapped with the tiles' math."""

    @staticmethod
    def forward(ctx, query, key, value, sinks, plan: TilePlan, comm: CPComm, scale: float, options: AttentionOptions, timer: AttentionTimer):
        with timer.total():
            q5 = _grouped(query, key.shape[1])
            kv = torch.stack([key, value]).float()
            merged = _Merged(q5)
            for step in range(comm.size):
                incoming = comm.pass_on(kv, _KV_TAG) if step < comm.size - 1 else None
                with timer.compute():
                    _add_tiles(merged, q5, kv, plan.tiles(comm.source(step), options.window), scale, options)
                if incoming is not None:
                    kv = incoming.wait()
            if sinks is not None:
                merged.add_sinks(sinks)
            ctx.save_for_backward(query, key, value, sinks, merged.out, merged.lse)
            ctx.plan, ctx.comm, ctx.scale, ctx.options, ctx.timer = plan, comm, scale, options, timer
            return _output(merged, query)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, sinks, out5, lse = ctx.saved_tensors
        plan, comm, scale, options, timer = ctx.plan, ctx.comm, ctx.scale, ctx.options, ctx.timer
        with timer.total():
            q5, dout5, delta, dq5 = _backward_inputs(query, key.shape[1], grad_out, out5)
            kv = torch.stack([key, value]).float()
            dkv_incoming = None
            for step in range(comm.size):
                kv_incoming = comm.pass_on(kv, _KV_TAG) if step < comm.size - 1 else None
                dkv = torch.zeros_like(kv)
                with timer.compute():
                    for tile in plan.tiles(comm.source(step), options.window):
                        _tile_backward(q5, kv, dout5, out5, lse, delta, tile, scale, options, dq5, dkv)
                if dkv_incoming is not None:
                    dkv += dkv_incoming.wait()  # the other ranks' gradients for the same block
                dkv_incoming = comm.pass_on(dkv, _DKV_TAG)  # after the last step: home to the owner
                if kv_incoming is not None:
                    kv = kv_incoming.wait()
            dkv = dkv_incoming.wait()
        dsinks = _sink_gradient(sinks, lse, delta) if sinks is not None else None
        return dq5.reshape(query.shape).to(query.dtype), dkv[0].to(key.dtype), dkv[1].to(value.dtype), dsinks, None, None, None, None, None


class AllGatherAttention(torch.autograd.Function):
    """All-gather schedule: every rank gathers all K/V, computes its tiles, reduce-scatters dK/dV."""

    @staticmethod
    def forward(ctx, query, key, value, sinks, plan: TilePlan, comm: CPComm, scale: float, options: AttentionOptions, timer: AttentionTimer):
        with timer.total():
            q5 = _grouped(query, key.shape[1])
            kv_all = comm.all_gather(torch.stack([key, value]).float())
            merged = _Merged(q5)
            with timer.compute():
                for source in range(comm.size):
                    _add_tiles(merged, q5, kv_all[source], plan.tiles(source, options.window), scale, options)
            if sinks is not None:
                merged.add_sinks(sinks)
            ctx.save_for_backward(query, kv_all, sinks, merged.out, merged.lse)
            ctx.plan, ctx.comm, ctx.scale, ctx.options, ctx.timer = plan, comm, scale, options, timer
            ctx.dtypes = (key.dtype, value.dtype)
            return _output(merged, query)

    @staticmethod
    def backward(ctx, grad_out):
        query, kv_all, sinks, out5, lse = ctx.saved_tensors
        plan, comm, scale, options, timer = ctx.plan, ctx.comm, ctx.scale, ctx.options, ctx.timer
        with timer.total():
            q5, dout5, delta, dq5 = _backward_inputs(query, kv_all.shape[3], grad_out, out5)
            dkv_all = torch.zeros_like(kv_all)
            with timer.compute():
                for source in range(comm.size):
                    for tile in plan.tiles(source, options.window):
                        _tile_backward(q5, kv_all[source], dout5, out5, lse, delta, tile, scale, options, dq5, dkv_all[source])
            dkv = comm.reduce_scatter(dkv_all)
        key_dtype, value_dtype = ctx.dtypes
        dsinks = _sink_gradient(sinks, lse, delta) if sinks is not None else None
        return dq5.reshape(query.shape).to(query.dtype), dkv[0].to(key_dtype), dkv[1].to(value_dtype), dsinks, None, None, None, None, None


def attention(schedule: type[RingAttention] | type[AllGatherAttention], query, key, value, sinks, plan: TilePlan, comm: CPComm, scale: float, options: AttentionOptions, timer: AttentionTimer) -> torch.Tensor:
    """`schedule` over query/key [b, heads or kv heads, n, dk] and value [b, kv heads, n, dv] -> [b, heads, n, dv].

    The schedules carry K and V as one stacked block, so a value head dim other than the key's is
    zero-padded to the wider of the two (autograd takes the gradients back through the pad and cut)."""
    key_dim, value_dim = key.shape[-1], value.shape[-1]
    width = max(key_dim, value_dim)
    query, key, value = (_padded(t, width) for t in (query, key, value))
    output = schedule.apply(query, key, value, sinks, plan, comm, scale, options, timer)
    return output[..., :value_dim] if value_dim < width else output


def _padded(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (0, missing)) if missing else tensor
