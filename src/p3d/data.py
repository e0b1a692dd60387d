"""Data: documents -> tokens -> packed windows -> a global sample order -> each dp rank's batches.

The order of samples is global and depends only on `train.seed`: the batch of step s is
positions [s*B, (s+1)*B) of that order (B = train.global_batch_size), whatever the layout.
Each dp rank takes its contiguous share of it; the tp and cp ranks of one dp group take the
same share (cp splits it along the sequence later). The data position of a run is therefore
one number, the count of consumed samples, and resuming on another layout is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from p3d.config.schema import DataConfig, InitMode, ModelConfig, Packing
from p3d.errors import ConfigError

FILE_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
IGNORE_INDEX = -100
# Files one of which a local directory needs to hold a tokenizer (a checkpoint may carry none).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255) and one end-of-document id (256); needs no files."""

    vocab_size = 257
    eos_token_id = 256

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]


class HFTokenizer:
    """A transformers tokenizer (the model's own, or one named by data.tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos_token_id = eos if eos is not None else 0

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def build_tokenizer(data_cfg: DataConfig, model_cfg: ModelConfig) -> Tokenizer:
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "auto":
        if model_cfg.init is InitMode.pretrained and model_cfg.pretrained:
            return _load_hf_tokenizer(model_cfg.pretrained, key="model.pretrained", required=False) or ByteTokenizer()
        return ByteTokenizer()
    return _load_hf_tokenizer(data_cfg.tokenizer, key="data.tokenizer", required=True)


def _load_hf_tokenizer(source: str, key: str, required: bool):
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    try:
        if local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
            raise OSError(f"no tokenizer files in {local}")
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(local) if local.exists() else source))
        if tokenizer.vocab_size < 2:
            # transformers 5.23 builds an empty tokenizer from a bare OPT config.json rather than failing
            raise ValueError(f"the tokenizer found has a vocabulary of {tokenizer.vocab_size}")
        return tokenizer
    except (OSError, ValueError, TypeError) as error:
        if not required:
            return None
        raise ConfigError(f"{key}={source}: cannot load a tokenizer ({str(error).splitlines()[0]}); use data.tokenizer=byte or a local dir") from None


def builtin_documents() -> list[str]:
    """The built-in corpus: CPython's own reference documentation (pydoc_data), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def check_data_source(data_cfg: DataConfig) -> list[str]:
    """Problems with data.path that can be seen without loading anything."""
    path = data_cfg.path
    if path is None:
        return []
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not _data_files(local):
            return [f"data.path={path}: the directory holds no {', '.join(FILE_FORMATS)} files"]
        if local.is_file() and local.suffix not in FILE_FORMATS:
            return [f"data.path={path}: unsupported file type '{local.suffix}' (use {', '.join(FILE_FORMATS)})"]
        return []
    if path.startswith(("/", ".", "~")) or local.suffix in FILE_FORMATS:
        return [f"data.path={path}: no such file or directory (unset data.path for the built-in corpus)"]
    return []  # a hub dataset id: checked when loaded


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)


def load_documents(data_cfg: DataConfig):
    """The documents: the built-in corpus as a list of texts, or a `datasets.Dataset` with a text
    column from local files or the hub. The built-in corpus does without `datasets`, whose import
    alone adds ~0.12 GB to every rank's memory."""
    if data_cfg.path is None:
        return builtin_documents()
    import datasets

    datasets.disable_progress_bars()
    local = Path(data_cfg.path).expanduser()
    try:
        if local.exists():
            files = _data_files(local) if local.is_dir() else [local]
            formats = {FILE_FORMATS[f.suffix] for f in files}
            if len(formats) > 1:
                raise ConfigError(f"data.path={data_cfg.path}: mixes file types {sorted(formats)}; use one type")
            builder = formats.pop()
            extra = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **extra)
        else:
            dataset = datasets.load_dataset(data_cfg.path, data_cfg.name, split=data_cfg.split)
    except ConfigError:
        raise
    except Exception as error:  # datasets raises many types for unreachable or malformed sources
        raise ConfigError(f"data.path={data_cfg.path}: cannot load ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if data_cfg.text_field not in dataset.column_names:
        raise ConfigError(f"data.text_field={data_cfg.text_field}: not a column of {data_cfg.path} (columns: {', '.join(dataset.column_names)})")
    return dataset


def _text_batches(documents, text_field: str, size: int = 1000) -> Iterator[list[str]]:
    if isinstance(documents, list):
        for start in range(0, len(documents), size):
            yield documents[start : start + size]
    else:
        for batch in documents.iter(batch_size=size):
            yield batch[text_field]


def tokenize_and_pack(documents, tokenizer: Tokenizer, text_field: str, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by end-of-document) and cut into windows of seq_len+1.

    `documents`: a list of texts or a `datasets.Dataset` (its `text_field` column)."""
    eos = [tokenizer.eos_token_id]
    pieces = [
        np.asarray(ids + eos, dtype=np.int64) for texts in _text_batches(documents, text_field) for ids in tokenizer.encode_batch(texts)
    ]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    window = seq_len + 1
    count = len(stream) // window
    if count == 0:
        raise ConfigError(f"data.seq_len={seq_len}: the corpus has only {len(stream)} tokens, fewer than one sequence")
    return torch.from_numpy(stream[: count * window].reshape(count, window).copy())


class GlobalSampleOrder:
    """Global sample position (0, 1, 2, ... over all epochs) -> window index; a new shuffle each epoch."""

    def __init__(self, num_windows: int, seed: int):
        self.num_windows = num_windows
        self.seed = seed
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_windows, generator=generator)
            self._epoch = epoch
        return self._permutation

    def windows(self, start: int, count: int) -> torch.Tensor:
        positions = range(start, start + count)
        return torch.stack([self._epoch_permutation(p // self.num_windows)[p % self.num_windows] for p in positions])


@dataclass
class DataParallelSampler:
    """The windows of one optimizer step that belong to one dp rank, as micro-batches."""

    windows: torch.Tensor  # [num_windows, seq_len + 1]
    order: GlobalSampleOrder
    global_batch_size: int
    micro_batch_size: int
    dp: int
    dp_rank: int
    packing: Packing = Packing.stream
    eos_token_id: int = ByteTokenizer.eos_token_id

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    def micro_batches(self, consumed_samples: int) -> list["TokenBatch"]:
        """Micro-batches of the step whose global batch starts at sample `consumed_samples`."""
        start = consumed_samples + self.dp_rank * self.per_rank
        rows = self.windows[self.order.windows(start, self.per_rank)]
        return [make_batch(part, self.packing, self.eos_token_id) for part in rows.split(self.micro_batch_size)]


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


def make_batch(windows: torch.Tensor, packing: Packing, eos_token_id: int) -> TokenBatch:
    """Next-token pairs over the whole window: labels are shifted globally, before any split.

    With packing=documents a document ends at (and includes) its end-of-document token, the next
    one starts after it with position 0, and no token predicts across a boundary: the label of an
    end-of-document input (the next document's first token) is ignored. A window that starts in
    the middle of a document treats that part as a document of its own.
    """
    input_ids, labels = windows[:, :-1], windows[:, 1:].clone()
    batch, seq_len = input_ids.shape
    if packing is Packing.stream:
        return TokenBatch(input_ids, labels, torch.arange(seq_len).expand(batch, seq_len), None)
    ends = input_ids == eos_token_id
    document_ids = torch.cumsum(ends, dim=1) - ends.long()  # an end token belongs to the document it ends
    index = torch.arange(seq_len).expand(batch, seq_len)
    starts = torch.zeros_like(ends)
    starts[:, 0] = True
    starts[:, 1:] = ends[:, :-1]
    first_index = torch.cummax(torch.where(starts, index, 0), dim=1).values
    labels[ends] = IGNORE_INDEX
    return TokenBatch(input_ids, labels, index - first_index, document_ids)


def build_sampler(data_cfg: DataConfig, model_cfg: ModelConfig, seed: int, global_batch: int, micro_batch: int, dp: int, dp_rank: int) -> DataParallelSampler:
    tokenizer = build_tokenizer(data_cfg, model_cfg)
    windows = tokenize_and_pack(load_documents(data_cfg), tokenizer, data_cfg.text_field, data_cfg.seq_len)
    order = GlobalSampleOrder(len(windows), seed)
    return DataParallelSampler(windows, order, global_batch, micro_batch, dp, dp_rank, data_cfg.packing, tokenizer.eos_token_id)
