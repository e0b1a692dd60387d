"""Data: documents -> tokens -> packed windows -> a global sample order -> each dp rank's batches.

The order of samples is global and depends only on `train.seed`: the batch of step s is
positions [s*B, (s+1)*B) of that order (B = train.global_batch_size), whatever the layout.
Each dp rank takes its contiguous share of it; the tp and cp ranks of one dp group take the
same share (cp splits it along the sequence later). The data position of a run is therefore
one number, the count of consumed samples, and resuming on another layout is exact.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import xxhash

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
    """Problems with data.path that can be seen without loading it: missing, empty or not of its type."""
    path = data_cfg.path
    if path is None:
        return []
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir():
            files = _data_files(local)
            if not files:
                return [f"data.path={path}: the directory holds no {', '.join(FILE_FORMATS)} files"]
            problems = (_file_problem(file, str(file.relative_to(local))) for file in files)
            return [f"data.path={path}: {problem}" for problem in problems if problem][:1]
        if local.suffix not in FILE_FORMATS:
            return [f"data.path={path}: unsupported file type '{local.suffix}' (use {', '.join(FILE_FORMATS)})"]
        problem = _file_problem(local, "the file")
        return [f"data.path={path}: {problem}"] if problem else []
    if path.startswith(("/", ".", "~")) or local.suffix in FILE_FORMATS:
        return [f"data.path={path}: no such file or directory (unset data.path for the built-in corpus)"]
    return []  # a hub dataset id: checked when loaded


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)


_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"


def _file_problem(file: Path, name: str) -> str | None:
    """What makes one local data file unreadable as its type, from its size and first bytes."""
    size = file.stat().st_size
    if size == 0:
        return f"{name} is empty (0 bytes); give a file with text in it"
    with file.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
        if FILE_FORMATS[file.suffix] == "parquet":
            handle.seek(max(size - len(_PARQUET_MAGIC), 0))
            tail = handle.read()
            if not (head.startswith(_PARQUET_MAGIC) and tail == _PARQUET_MAGIC):
                return f"{name} is not a Parquet file (no PAR1 magic bytes at its start and end); check the file or its extension"
            return None
    complete = len(head) == size
    text_problem = _text_problem(head, complete)
    if text_problem:
        return f"{name} is not UTF-8 text ({text_problem}); is it a binary file? use .txt, .json, .jsonl, .csv or .parquet data"
    text = head.decode("utf-8", errors="ignore")
    if complete and not text.strip():
        return f"{name} holds only whitespace; give a file with text in it"
    if file.suffix in (".json", ".jsonl"):
        return _json_problem(file, name, text, complete)
    return None


def _text_problem(head: bytes, complete: bool) -> str | None:
    nul = head.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)  # a cut multi-byte character is fine
    except UnicodeDecodeError as error:
        return f"byte 0x{head[error.start]:02x} at offset {error.start}"
    return None


def _json_problem(file: Path, name: str, head: str, complete: bool) -> str | None:
    """JSON data is one object per line (.jsonl, or .json) or one JSON document (.json): check how it starts."""
    stripped = head.lstrip()
    if not stripped.startswith(("{", "[")):
        return f"{name} is not JSON (it starts with {stripped[:20]!r}); write one JSON object per line, e.g. {{\"text\": \"...\"}}"
    if file.suffix != ".jsonl":
        return None  # a .json document may span many lines: the loader reads it whole
    if "\n" not in stripped and not complete:
        return None  # a first line longer than what was read: the loader checks it
    first_line = stripped.splitlines()[0]
    try:
        record = json.loads(first_line)
    except json.JSONDecodeError as error:
        return f"{name}: its first line is not valid JSON ({error.msg} at column {error.colno}); write one JSON object per line"
    if not isinstance(record, dict):
        return f"{name}: its first line is a JSON {type(record).__name__}, not an object; write one object per line, e.g. {{\"text\": \"...\"}}"
    return None


def data_fingerprint(data_cfg: DataConfig) -> dict:
    """A cheap identity of the data source, to tell whether data.path still holds the same data.

    Local files: each data file's name (relative to data.path), size and modification time (the
    files are not read). A hub dataset: its id, configuration, split and the dataset's own hash
    (the repository revision `datasets` resolves; None when it cannot be resolved here). The
    built-in corpus: a checksum of its text (it comes with the Python version).
    """
    if data_cfg.path is None:
        text = "\x00".join(builtin_documents()).encode()
        return {"kind": "builtin", "name": "pydoc_data.topics", "xxh3_128": xxhash.xxh3_128(text).hexdigest()}
    local = Path(data_cfg.path).expanduser()
    if local.exists():
        files = _data_files(local) if local.is_dir() else [local]
        base = local if local.is_dir() else local.parent
        return {"kind": "files", "files": {str(f.relative_to(base)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}
    return {"kind": "hub", "id": data_cfg.path, "name": data_cfg.name, "split": data_cfg.split, "revision": _hub_revision(data_cfg)}


def _hub_revision(data_cfg: DataConfig) -> str | None:
    import datasets

    try:
        return datasets.load_dataset_builder(data_cfg.path, data_cfg.name).hash
    except Exception:  # unreachable hub, offline without a cache: the id, name and split still count
        return None


def fingerprint_change(saved: dict, now: dict) -> str | None:
    """How the data source differs from the saved fingerprint, in a few words (None: the same)."""
    if saved == now:
        return None
    if saved.get("kind") != now.get("kind"):
        return f"it was a {saved.get('kind')} source, now a {now.get('kind')} one"
    if now["kind"] == "files":
        before, after = saved["files"], now["files"]
        changes = [f"{name} is new" for name in sorted(after.keys() - before.keys())]
        changes += [f"{name} is gone" for name in sorted(before.keys() - after.keys())]
        for name in sorted(before.keys() & after.keys()):
            (old_size, old_mtime), (new_size, new_mtime) = before[name], after[name]
            if old_size != new_size:
                changes.append(f"{name} has {new_size} bytes, {old_size} then")
            elif old_mtime != new_mtime:
                changes.append(f"{name} was modified since")
        more = f" and {len(changes) - 1} more changes" if len(changes) > 1 else ""
        return f"{changes[0]}{more}"
    if now["kind"] == "builtin":
        return "the built-in corpus differs (another Python version)"
    unknown = saved.get("revision") is None or now.get("revision") is None  # unresolved then or now: not a difference
    differing = [key for key in ("id", "name", "split", "revision") if saved.get(key) != now.get(key) and not (key == "revision" and unknown)]
    if not differing:
        return None
    return ", ".join(f"{key} {saved.get(key)} then, {now.get(key)} now" for key in differing)


def load_documents(data_cfg: DataConfig):
    """The documents: the built-in corpus as a list of texts, or a `datasets.Dataset` with a text
    column from local files or the hub. The built-in corpus does without `datasets`, whose import
    alone adds ~0.12 GB to every rank's memory."""
    if data_cfg.path is None:
        return builtin_documents()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failed load is reported once, as p3d's own line
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
        raise ConfigError(f"data.path={data_cfg.path}: cannot load it ({_root_cause(error)}); fix the file, or point data.path at another source") from None
    if data_cfg.text_field not in dataset.column_names:
        raise ConfigError(f"data.text_field={data_cfg.text_field}: not a column of {data_cfg.path} (columns: {', '.join(dataset.column_names)})")
    return dataset


def _root_cause(error: BaseException) -> str:
    """The first line of the error at the end of the `raise ... from` chain (datasets wraps a parse
    error in a generic DatasetGenerationError; the errors of its fallback readers are only context)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _text_batches(documents, text_field: str, size: int = 1000) -> Iterator[list[str]]:
    if isinstance(documents, list):
        for start in range(0, len(documents), size):
            yield documents[start : start + size]
    else:
        for batch in documents.iter(batch_size=size):
            yield batch[text_field]


def tokenize_and_pack(documents, tokenizer: Tokenizer, text_field: str, seq_len: int, source: str = "the corpus") -> torch.Tensor:
    """Concatenate documents (each followed by end-of-document) and cut into windows of seq_len+1.

    `documents`: a list of texts or a `datasets.Dataset` (its `text_field` column)."""
    eos = [tokenizer.eos_token_id]
    pieces = [
        np.asarray(ids + eos, dtype=np.int64) for texts in _text_batches(documents, text_field) for ids in tokenizer.encode_batch(texts)
    ]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    window = seq_len + 1
    count = len(stream) // window
    text_tokens = len(stream) - len(documents)  # without the end-of-document tokens
    if text_tokens == 0:
        raise ConfigError(f"data.path={source}: holds no text ({len(documents)} documents, all empty); point data.path at a corpus")
    if count == 0:
        raise ConfigError(
            f"data.seq_len={seq_len}: data.path={source} has only {len(stream)} tokens, fewer than one sequence of "
            f"{window}; use more data or a smaller data.seq_len"
        )
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
    source = data_cfg.path if data_cfg.path is not None else "null (the built-in corpus)"
    windows = tokenize_and_pack(load_documents(data_cfg), tokenizer, data_cfg.text_field, data_cfg.seq_len, source)
    order = GlobalSampleOrder(len(windows), seed)
    return DataParallelSampler(windows, order, global_batch, micro_batch, dp, dp_rank, data_cfg.packing, tokenizer.eos_token_id)


# --- held-out data for the validation pass -------------------------------------------------------
# The one seam between the validation pass (trainer.Trainer.evaluate) and held-out data: the
# problems of its source (validation) and this dp rank's batches. Today the held-out documents come
# from data.eval_path alone.


class SequentialOrder:
    """Sample position -> window index in file order, wrapping around: every pass sees the same windows."""

    def __init__(self, num_windows: int):
        self.num_windows = num_windows

    def windows(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count) % self.num_windows


def _as_eval_key(error: ConfigError) -> ConfigError:
    """The data.path checks and loaders, run on data.eval_path, name data.eval_path (and the built-in
    corpus is no fallback for it)."""
    return ConfigError(
        [problem.replace("data.path=", "data.eval_path=").replace(" (unset data.path for the built-in corpus)", "") for problem in error.problems]
    )


def _eval_source(data_cfg: DataConfig) -> DataConfig:
    return replace(data_cfg, path=data_cfg.eval_path)


def check_eval_source(data_cfg: DataConfig, every: int) -> list[str]:
    """A validation pass needs held-out data, and data.eval_path must be readable as data.path is."""
    if every > 0 and data_cfg.eval_path is None:
        return [f"eval.every={every} needs held-out data: set data.eval_path to a file or directory of documents the training does not see"]
    if data_cfg.eval_path is None:
        return []
    return _as_eval_key(ConfigError(check_data_source(_eval_source(data_cfg)))).problems


def build_eval_sampler(data_cfg: DataConfig, model_cfg: ModelConfig, global_batch: int, micro_batch: int, dp: int, dp_rank: int) -> DataParallelSampler:
    """This dp rank's held-out micro-batches, tokenized and packed as the training data is (same
    tokenizer, data.seq_len and data.packing); batch i of a pass starts at sample i*global_batch."""
    tokenizer = build_tokenizer(data_cfg, model_cfg)
    try:
        windows = tokenize_and_pack(load_documents(_eval_source(data_cfg)), tokenizer, data_cfg.text_field, data_cfg.seq_len, data_cfg.eval_path)
    except ConfigError as error:
        raise _as_eval_key(error) from None
    return DataParallelSampler(windows, SequentialOrder(len(windows)), global_batch, micro_batch, dp, dp_rank, data_cfg.packing, tokenizer.eos_token_id)
