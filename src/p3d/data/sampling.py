"""The global sample order and the batches each dp rank reads from the token cache.

The order of samples is global and depends only on `train.seed`: the batch of step s is positions
[s*B, (s+1)*B) of that order (B = train.global_batch_size), whatever the layout. Each dp rank
takes its contiguous share of it; the tp and cp ranks of one dp group take the same share (cp
splits it along the sequence later). The data position of a run is therefore one number, the
count of consumed samples, and resuming on another layout is exact.

A position maps to a (source, window) pair: with a mixture, each block of MIXTURE_BLOCK positions
holds each source's share of them exactly, at positions shuffled per block; within a source, the
k-th sample it gives is window `shuffle_epoch(k mod windows)` of epoch k // windows, where each
epoch's shuffle is a pseudo-random permutation computed position by position. No array over the
corpus is ever built: a rank's memory does not grow with the corpus, whose windows are read from
the memory-mapped cache on demand.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from p3d.config.schema import DataConfig, ModelConfig, Packing
from p3d.data.cache import Info, Rows, TokenStream, _no_info, open_cache
from p3d.data.sources import MIXTURE_BLOCK, Source, eval_source, mixture_quotas, training_sources
from p3d.data.tokenizers import build_tokenizer
from p3d.errors import ConfigError

IGNORE_INDEX = -100
DEFAULT_CACHE_DIR = "data-cache"  # under run.root


def cache_root(data_cfg: DataConfig, run_root: str | Path = "runs") -> Path:
    """data.cache_dir, or <run.root>/data-cache."""
    return Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else Path(run_root).expanduser() / DEFAULT_CACHE_DIR


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a strong 64-bit mixing function (the Feistel rounds' function).
    The products wrap around modulo 2**64 on purpose (numpy does not warn for arrays)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class ShuffledWindows:
    """A source's k-th sample (0, 1, 2, ... over all epochs) -> its window; a new shuffle each epoch.

    Each epoch's shuffle is a pseudo-random permutation of the windows computed per position: a
    4-round Feistel network (a bijection) on the smallest power-of-two range holding them, applied
    again to values that fall outside (cycle walking keeps it a bijection on [0, windows)). The
    range is at most twice the windows, so a value needs two passes on average. With an odd number
    of bits the two halves differ by one bit (an unbalanced Feistel network): each round moves the
    low part up and mixes it into the high part, so the halves swap widths from round to round."""

    ROUNDS = 4
    CHUNK = 4096

    def __init__(self, count: int, seed: int):
        self.count = count
        self.seed = seed
        bits = max(2, (count - 1).bit_length())
        low = bits // 2
        # each round's (width of the low part, width of the high part): the widths alternate
        self.splits = [(np.uint64(width), np.uint64(bits - width)) for width in (low, bits - low)]
        self._epoch_keys: tuple[int, np.ndarray] | None = None
        self._chunks_per_epoch = -(-count // self.CHUNK)
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()  # the two chunks of windows used last

    def _keys(self, epoch: int) -> np.ndarray:
        if self._epoch_keys is None or self._epoch_keys[0] != epoch:
            self._epoch_keys = (epoch, np.random.SeedSequence([self.seed, epoch]).generate_state(self.ROUNDS, dtype=np.uint64))
        return self._epoch_keys[1]

    def _permute(self, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
        one = np.uint64(1)
        for round_index, key in enumerate(keys):
            low_bits, high_bits = self.splits[round_index % 2]
            high, low = values >> low_bits, values & ((one << low_bits) - one)
            values = (low << high_bits) | (high ^ (_mix64(low ^ key) & ((one << high_bits) - one)))
        return values

    def windows(self, samples: np.ndarray) -> np.ndarray:
        """The windows of samples `samples`. A step asks for a few; they are taken from the whole
        chunk of (up to) CHUNK consecutive samples of one epoch around them, computed at once
        (numpy's cost is per call, not per value); the two chunks used last are kept."""
        samples = np.asarray(samples, dtype=np.int64)
        if len(samples) >= self.CHUNK:
            return self.compute(samples)
        epochs, offsets = np.divmod(samples, self.count)
        chunks = epochs * self._chunks_per_epoch + offsets // self.CHUNK
        result = np.empty(len(samples), dtype=np.int64)
        for chunk in np.unique(chunks).tolist():
            chosen = chunks == chunk
            result[chosen] = self._chunk(chunk)[offsets[chosen] % self.CHUNK]
        return result

    def _chunk(self, chunk: int) -> np.ndarray:
        if chunk not in self._chunks:
            epoch, index = divmod(chunk, self._chunks_per_epoch)
            offsets = np.arange(index * self.CHUNK, min((index + 1) * self.CHUNK, self.count), dtype=np.int64)
            self._chunks[chunk] = self._epoch_windows(epoch, offsets)
            if len(self._chunks) > 2:
                self._chunks.popitem(last=False)
        return self._chunks[chunk]

    def compute(self, samples: np.ndarray) -> np.ndarray:
        """The windows of `samples`, each computed on its own."""
        samples = np.asarray(samples, dtype=np.int64)
        epochs, offsets = np.divmod(samples, self.count)
        result = np.empty(len(samples), dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            chosen = epochs == epoch
            result[chosen] = self._epoch_windows(epoch, offsets[chosen])
        return result

    def _epoch_windows(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        keys = self._keys(epoch)
        values = self._permute(offsets.astype(np.uint64), keys)
        outside = values >= self.count
        while outside.any():
            values[outside] = self._permute(values[outside], keys)
            outside = values >= self.count
        return values.astype(np.int64)


class GlobalSampleOrder:
    """Global sample position (0, 1, 2, ...) -> (source, window of that source)."""

    def __init__(self, window_counts: list[int], weights: list[float], seed: int):
        self.seed = seed
        self.shuffles = [ShuffledWindows(count, seed) for count in window_counts]
        self.quotas = np.asarray(mixture_quotas(weights), dtype=np.int64) if len(window_counts) > 1 else None
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's source at each position, and how many of that source's samples precede it in the block."""
        if block not in self._blocks:
            pattern = np.random.default_rng([self.seed, block]).permutation(np.repeat(np.arange(len(self.quotas)), self.quotas))
            rank = np.empty(MIXTURE_BLOCK, dtype=np.int64)
            for source in range(len(self.quotas)):
                where = np.flatnonzero(pattern == source)
                rank[where] = np.arange(len(where))
            self._blocks[block] = (pattern, rank)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[block]

    def sources(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, how many samples that source gave before it)."""
        positions = np.arange(start, start + count, dtype=np.int64)
        if self.quotas is None:
            return np.zeros(count, dtype=np.int64), positions
        blocks, offsets = np.divmod(positions, MIXTURE_BLOCK)
        sources, samples = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
        for block in np.unique(blocks).tolist():
            chosen = blocks == block
            pattern, rank = self._block(block)
            sources[chosen] = pattern[offsets[chosen]]
            samples[chosen] = block * self.quotas[sources[chosen]] + rank[offsets[chosen]]
        return sources, samples

    def at(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window) of positions start .. start+count-1."""
        sources, samples = self.sources(start, count)
        if len(self.shuffles) == 1:
            return sources, self.shuffles[0].windows(samples)
        windows = np.empty(count, dtype=np.int64)
        for source in np.unique(sources).tolist():
            chosen = sources == source
            windows[chosen] = self.shuffles[source].windows(samples[chosen])
        return sources, windows


class SequentialOrder:
    """Position -> (source, window) in storage order, the sources one after another (held-out data)."""

    def __init__(self, window_counts: list[int]):
        self.ends = np.cumsum(window_counts)
        self.total = int(self.ends[-1])

    def at(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        positions = np.arange(start, start + count, dtype=np.int64) % self.total
        sources = np.searchsorted(self.ends, positions, side="right")
        return sources, positions - np.concatenate([[0], self.ends[:-1]])[sources]


@dataclass(frozen=True)
class TokenBatch:
    """One micro-batch over the whole (unsplit) sequence; context parallelism splits it later."""

    input_ids: torch.Tensor  # [batch, seq_len]
    labels: torch.Tensor  # [batch, seq_len]: the next token, or IGNORE_INDEX
    position_ids: torch.Tensor  # [batch, seq_len]: 0..seq_len-1, or restarting at each document
    document_ids: torch.Tensor | None  # [batch, seq_len]: which document each token is in (packing=documents), else None

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def valid_label_count(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def make_batch(rows: Rows, packing: Packing) -> TokenBatch:
    """Next-token pairs over the whole window: labels are shifted globally, before any split.

    A token that is not a target (chat: not the assistant's) is an ignored label. With
    packing=documents a document ends at (and includes) its end-of-document token, the next one
    starts after it with position 0, and no token predicts across a boundary: the label of a
    document's last token (the next document's first token) is ignored. A window that starts in
    the middle of a document treats that part as a document of its own.
    """
    tokens = torch.from_numpy(rows.tokens)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    if rows.targets is not None:
        labels[~torch.from_numpy(rows.targets[:, 1:])] = IGNORE_INDEX
    batch, seq_len = input_ids.shape
    index = torch.arange(seq_len).expand(batch, seq_len)
    if packing is Packing.stream:
        return TokenBatch(input_ids, labels, index, None)
    starts = torch.from_numpy(rows.starts[:, :-1]).clone()
    starts[:, 0] = True
    document_ids = torch.cumsum(starts, dim=1) - 1
    first_index = torch.cummax(torch.where(starts, index, 0), dim=1).values
    labels[torch.from_numpy(rows.starts[:, 1:])] = IGNORE_INDEX
    return TokenBatch(input_ids, labels, index - first_index, document_ids)


@dataclass
class DataParallelSampler:
    """The windows of one optimizer step that belong to one dp rank, as micro-batches."""

    streams: list[TokenStream]
    order: GlobalSampleOrder | SequentialOrder
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    dp: int
    dp_rank: int
    packing: Packing = Packing.stream
    labels: tuple[str, ...] = ("data",)  # each source's name in metrics

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    def rows(self, start: int, count: int) -> Rows:
        """Positions start .. start+count-1 of the order, read from their sources' maps."""
        sources, windows = self.order.at(start, count)
        window = self.seq_len + 1
        if len(self.streams) == 1:
            return self.streams[0].read(windows, window)
        tokens = np.empty((count, window), dtype=np.int64)
        starts = np.empty((count, window), dtype=bool)
        chat = any(stream.targets is not None for stream in self.streams)
        targets = np.empty((count, window), dtype=bool) if chat else None
        for source in np.unique(sources).tolist():
            chosen = np.flatnonzero(sources == source)
            part = self.streams[source].read(windows[chosen], window)
            tokens[chosen], starts[chosen] = part.tokens, part.starts
            if targets is not None:
                targets[chosen] = part.targets if part.targets is not None else True
        return Rows(tokens, starts, targets)

    def micro_batches(self, consumed_samples: int) -> list[TokenBatch]:
        """Micro-batches of the step whose global batch starts at sample `consumed_samples`."""
        rows = self.rows(consumed_samples + self.dp_rank * self.per_rank, self.per_rank)
        size = self.micro_batch_size
        return [
            make_batch(Rows(rows.tokens[i : i + size], rows.starts[i : i + size], None if rows.targets is None else rows.targets[i : i + size]), self.packing)
            for i in range(0, self.per_rank, size)
        ]

    def source_counts(self, consumed_samples: int) -> dict[str, int]:
        """How many samples of the whole global batch (all dp ranks) each source gives."""
        sources, _ = self.order.at(consumed_samples, self.global_batch_size)
        counts = np.bincount(sources, minlength=len(self.labels))
        return {label: int(count) for label, count in zip(self.labels, counts)}


@dataclass(frozen=True)
class StepData:
    """One optimizer step's data on this rank: its micro-batches and, with several sources, how many
    samples of the whole global batch each source gave."""

    micro_batches: list[TokenBatch]
    samples_per_source: dict[str, int] | None


class BatchPrefetcher:
    """Reads the next step's data on a background thread while this step trains, as a DataLoader
    worker would: a step waits for its data only when the read takes longer than the step before it.

    A step's data is a pure function of the samples consumed before it, so a step that was not
    prefetched (the first, or another position) is read directly, after any read in flight has
    finished: the sampler (which caches what it computed last) is used by one thread at a time."""

    def __init__(self, sampler: DataParallelSampler):
        self.sampler = sampler
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3d-data")
        self._pending: tuple[int, Future] | None = None

    def take(self, consumed_samples: int) -> StepData:
        """The data of the step whose global batch starts at sample `consumed_samples`."""
        pending, self._pending = self._pending, None
        if pending is not None:
            prefetched = pending[1].result()
            if pending[0] == consumed_samples:
                return prefetched
        return self._read(consumed_samples)

    def prefetch(self, consumed_samples: int) -> None:
        """Start reading the step whose global batch starts at sample `consumed_samples`."""
        if self._pending is not None:
            self._pending[1].result()
        self._pending = (consumed_samples, self._pool.submit(self._read, consumed_samples))

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, consumed_samples: int) -> StepData:
        sources = self.sampler.source_counts(consumed_samples) if len(self.sampler.labels) > 1 else None
        return StepData(self.sampler.micro_batches(consumed_samples), sources)


class EvalSampler(DataParallelSampler):
    """Held-out windows in storage order, one pass: `steps` global batches (a last partial one is left out)."""

    @property
    def steps(self) -> int:
        return self.order.total // self.global_batch_size

    def __iter__(self) -> Iterator[list[TokenBatch]]:
        for step in range(self.steps):
            yield self.micro_batches(step * self.global_batch_size)


def _streams(sources: list[Source], part: str, data_cfg: DataConfig, model_cfg: ModelConfig, root: Path, fraction: float, info: Info) -> list[TokenStream]:
    tokenizer = build_tokenizer(data_cfg, model_cfg)
    return [open_cache(source, tokenizer, root, fraction, data_cfg.tokenize_workers, info).stream(part) for source in sources]


def _window_counts(sources: list[Source], streams: list[TokenStream], seq_len: int, what: str) -> list[int]:
    counts = [stream.window_count(seq_len + 1) for stream in streams]
    for source, stream, count in zip(sources, streams, counts):
        if count == 0:
            raise ConfigError(
                f"data.seq_len={seq_len}: {what} of {source.describe()} has only {len(stream)} tokens, fewer than one "
                f"sequence of {seq_len + 1}; use more data or a smaller data.seq_len"
            )
    return counts


def build_sampler(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    seed: int,
    global_batch: int,
    micro_batch: int,
    dp: int,
    dp_rank: int,
    cache_dir: Path | None = None,
    info: Info = _no_info,
) -> DataParallelSampler:
    """The training sampler: every source's cache (built if needed), mapped, in the global order."""
    root = cache_dir if cache_dir is not None else cache_root(data_cfg)
    sources = training_sources(data_cfg)
    streams = _streams(sources, "train", data_cfg, model_cfg, root, data_cfg.eval_fraction, info)
    counts = _window_counts(sources, streams, data_cfg.seq_len, "the training part")
    order = GlobalSampleOrder(counts, [source.weight for source in sources], seed)
    return DataParallelSampler(streams, order, data_cfg.seq_len, global_batch, micro_batch, dp, dp_rank, data_cfg.packing, tuple(s.label for s in sources))


def build_eval_sampler(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    global_batch: int,
    micro_batch: int,
    dp: int,
    dp_rank: int,
    cache_dir: Path | None = None,
    info: Info = _no_info,
) -> EvalSampler | None:
    """The held-out data (data.eval_path, or the data.eval_fraction share of each training source), or None."""
    root = cache_dir if cache_dir is not None else cache_root(data_cfg)
    held_out = eval_source(data_cfg)
    if held_out is not None:
        sources, part, fraction = [held_out], "train", 0.0
    elif data_cfg.eval_fraction > 0:
        sources, part, fraction = training_sources(data_cfg), "eval", data_cfg.eval_fraction
    else:
        return None
    streams = _streams(sources, part, data_cfg, model_cfg, root, fraction, info)
    counts = _window_counts(sources, streams, data_cfg.seq_len, "the held-out part" if part == "eval" else "the held-out data")
    return EvalSampler(streams, SequentialOrder(counts), data_cfg.seq_len, global_batch, micro_batch, dp, dp_rank, data_cfg.packing, tuple(s.label for s in sources))
