"""Data sources: which ones a config names, their checks and fingerprints, and reading their rows
lazily, one work unit (a file, or a part of a large one) at a time.

A source is the built-in corpus (data.path=null; the built-in chat set with data.format=chat), a
local file or directory (.txt, .json, .jsonl, .parquet, .csv; a directory is read file by file,
never loaded whole), or a hub dataset id (streamed when online, read from the local Hugging Face
cache when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so an offline run never touches the network).
`data.path` is the one-source case of `data.sources`, a weighted mixture.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import xxhash

from p3d.config.schema import DataConfig, DataFormat, SourceConfig, bounds_of, range_problem
from p3d.data.chat import builtin_conversations, conversation_problem
from p3d.errors import ConfigError

FILE_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ROW_FORMATS = (".json", ".jsonl", ".parquet")  # the files that can hold a conversation (a list) per row
# A mixture assigns each block of this many consecutive samples exactly its sources' shares (see sampling.py).
MIXTURE_BLOCK = 1000
UNIT_BYTES = 32 * 2**20  # large .jsonl and .parquet files are tokenized in parts of about this size


@dataclass(frozen=True)
class Source:
    """One data source as the config names it, with the keys that name its settings in messages."""

    key: str  # the key naming it: data.path, data.sources[1].path or data.eval_path
    path: str | None  # None: the built-in corpus (text) or chat set (chat)
    name: str | None
    split: str
    field: str  # the column read: the text (format=text) or the conversation (format=chat)
    field_key: str  # the key naming that column
    format: DataFormat
    weight: float = 1.0
    label: str = ""  # its name in metrics

    def describe(self) -> str:
        return f"{self.key}={self.path}" if self.path is not None else f"{self.key}=null ({self.builtin_name()})"

    def builtin_name(self) -> str:
        return "the built-in chat set" if self.format is DataFormat.chat else "the built-in corpus"

    def local(self) -> Path | None:
        if self.path is None:
            return None
        local = Path(self.path).expanduser()
        return local if local.exists() else None


def _label(path: str | None, fmt: DataFormat) -> str:
    if path is None:
        return "builtin-chat" if fmt is DataFormat.chat else "builtin"
    local = Path(path).expanduser()
    return local.stem if local.suffix in FILE_FORMATS else local.name or path


def _field(data_cfg: DataConfig, own_field: str | None, prefix: str) -> tuple[str, str]:
    if data_cfg.format is DataFormat.chat:
        return data_cfg.messages_field, "data.messages_field"
    if own_field is not None:
        return own_field, f"{prefix}.text_field"
    return data_cfg.text_field, "data.text_field"


def training_sources(data_cfg: DataConfig) -> list[Source]:
    """The sources trained on, with positive weights: data.sources, or data.path as the one source."""
    if not data_cfg.sources:
        field, field_key = _field(data_cfg, None, "data")
        return [Source("data.path", data_cfg.path, data_cfg.name, data_cfg.split, field, field_key, data_cfg.format, 1.0, _label(data_cfg.path, data_cfg.format))]
    sources = []
    for index, item in enumerate(data_cfg.sources):
        prefix = f"data.sources[{index}]"
        field, field_key = _field(data_cfg, item.text_field, prefix)
        name = item.name if item.name is not None else data_cfg.name
        split = item.split if item.split is not None else data_cfg.split
        sources.append(Source(f"{prefix}.path", item.path, name, split, field, field_key, data_cfg.format, float(item.weight), _label(item.path, data_cfg.format)))
    labels = [source.label for source in sources]
    sources = [
        source if labels.count(source.label) == 1 else Source(**{**source.__dict__, "label": f"{source.label}#{index}"})
        for index, source in enumerate(sources)
    ]
    return [source for source in sources if source.weight > 0]


def eval_source(data_cfg: DataConfig) -> Source | None:
    """data.eval_path as a source of its own (read whole), or None."""
    if data_cfg.eval_path is None:
        return None
    field, field_key = _field(data_cfg, None, "data")
    return Source("data.eval_path", data_cfg.eval_path, data_cfg.name, data_cfg.split, field, field_key, data_cfg.format, 1.0, "eval")


def mixture_quotas(weights: list[float]) -> list[int]:
    """Samples of each source per MIXTURE_BLOCK samples: the weights' shares, rounded by largest remainder."""
    total = sum(weights)
    exact = [weight / total * MIXTURE_BLOCK for weight in weights]
    quotas = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda index: (quotas[index] - exact[index], index))
    for index in by_remainder[: MIXTURE_BLOCK - sum(quotas)]:
        quotas[index] += 1
    return quotas


# --- checks before the run (validation) -------------------------------------------------------------


def check_data_source(data_cfg: DataConfig) -> list[str]:
    """Problems with the data keys that can be seen without reading the data: how the keys combine, the
    mixture's weights, and each source's files (missing, empty, not of their type, lacking the column)."""
    problems = []
    if data_cfg.sources and data_cfg.path is not None:
        problems.append(f"data.sources: set either data.path={data_cfg.path} (one source) or data.sources (a mixture), not both; unset data.path")
    if data_cfg.sources:
        problems += _weight_problems([item.weight for item in data_cfg.sources])
    if data_cfg.format is DataFormat.chat and data_cfg.packing.value == "stream":
        problems.append("data.format=chat: conversations must not see each other; set data.packing=documents (the preset data=chat does)")
    if data_cfg.eval_path is not None and data_cfg.eval_fraction > 0:
        problems.append(f"data.eval_path={data_cfg.eval_path}: set either data.eval_path or data.eval_fraction={data_cfg.eval_fraction}, not both")
    if problems:
        return problems
    sources = training_sources(data_cfg) + ([eval_source(data_cfg)] if data_cfg.eval_path is not None else [])
    for source in sources:
        problems += source_problems(source)
    return problems


def _weight_problems(weights: list[float]) -> list[str]:
    problems = [problem for index, weight in enumerate(weights) if (problem := range_problem(f"data.sources[{index}].weight", weight, _WEIGHT_BOUNDS))]
    if problems:
        return problems
    total = sum(weights)
    if total <= 0:
        return [f"data.sources: the weights sum to {total:g}; give at least one source a positive weight"]
    return [
        f"data.sources[{index}].weight={weight:g}: a share of {weight / total:.2g} is below the mixture's resolution (1/{MIXTURE_BLOCK} "
        f"of the samples); raise it to at least {total / MIXTURE_BLOCK:.3g} or set it to 0 to leave the source out"
        for index, weight in enumerate(weights)
        if 0 < weight / total * MIXTURE_BLOCK < 1
    ]


_WEIGHT_BOUNDS = bounds_of(next(item for item in dataclasses.fields(SourceConfig) if item.name == "weight"))


def source_problems(source: Source) -> list[str]:
    path = source.path
    if path is None:
        return []
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir():
            files = data_files(local)
            if not files:
                return [f"{source.key}={path}: the directory holds no {', '.join(FILE_FORMATS)} files"]
            problems = (_file_problem(file, str(file.relative_to(local)), source) for file in files)
            return [f"{source.key}={path}: {problem}" for problem in problems if problem][:1]
        if local.suffix not in FILE_FORMATS:
            return [f"{source.key}={path}: unsupported file type '{local.suffix}' (use {', '.join(FILE_FORMATS)})"]
        problem = _file_problem(local, "the file", source)
        return [f"{source.key}={path}: {problem}"] if problem else []
    if path.startswith(("/", ".", "~")) or local.suffix in FILE_FORMATS:
        return [f"{source.key}={path}: no such file or directory (unset it for {source.builtin_name()})"]
    return []  # a hub dataset id: checked when loaded


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)


_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"


def _file_problem(file: Path, name: str, source: Source) -> str | None:
    """What makes one local data file unreadable as its type, from its size and first bytes (and a
    Parquet file's schema)."""
    chat = source.format is DataFormat.chat
    if chat and file.suffix not in ROW_FORMATS:
        return f"{name} is a {file.suffix} file, which cannot hold conversations; data.format=chat reads .jsonl, .json or .parquet rows with a {source.field!r} list"
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
            return _parquet_column_problem(file, name, source)
    complete = len(head) == size
    text_problem = _text_problem(head, complete)
    if text_problem:
        return f"{name} is not UTF-8 text ({text_problem}); is it a binary file? use .txt, .json, .jsonl, .csv or .parquet data"
    text = head.decode("utf-8", errors="ignore")
    if complete and not text.strip():
        return f"{name} holds only whitespace; give a file with text in it"
    if file.suffix in (".json", ".jsonl"):
        return _json_problem(file, name, text, complete, source)
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


def _json_problem(file: Path, name: str, head: str, complete: bool, source: Source) -> str | None:
    """JSON data is one object per line (.jsonl, or .json) or one JSON array (.json): check how it starts."""
    stripped = head.lstrip()
    if not stripped.startswith(("{", "[")):
        return f"{name} is not JSON (it starts with {stripped[:20]!r}); write one JSON object per line, e.g. {{\"text\": \"...\"}}"
    if file.suffix != ".jsonl" and stripped.startswith("["):
        return None  # a .json array may span many lines: the reader checks its records
    if "\n" not in stripped and not complete:
        return None  # a first line longer than what was read: the reader checks it
    first_line = stripped.splitlines()[0]
    try:
        record = json.loads(first_line)
    except json.JSONDecodeError as error:
        return f"{name}: its first line is not valid JSON ({error.msg} at column {error.colno}); write one JSON object per line"
    if not isinstance(record, dict):
        return f"{name}: its first line is a JSON {type(record).__name__}, not an object; write one object per line, e.g. {{\"text\": \"...\"}}"
    return _record_problem(record, f"{name}'s first line", source)


def _record_problem(record: dict, where: str, source: Source) -> str | None:
    if source.field not in record:
        return f"{where} has no {source.field!r} field (it has: {', '.join(map(str, record)) or 'none'}); set {source.field_key} to the field to read"
    if source.format is DataFormat.chat:
        problem = conversation_problem(record[source.field], source.field)
        return f"{where} {problem}" if problem else None
    return None


def _parquet_column_problem(file: Path, name: str, source: Source) -> str | None:
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(file).names
    except Exception as error:  # pyarrow raises its own types for a damaged footer
        return f"{name} is not a readable Parquet file ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    if source.field not in columns:
        return f"{name} has no {source.field!r} column (it has: {', '.join(columns)}); set {source.field_key} to the column to read"
    return None


def check_eval_source(data_cfg: DataConfig, every: int) -> list[str]:
    """A validation pass (eval.every > 0) needs held-out data; data.eval_path's files are checked with
    the training sources' (check_data_source)."""
    if every > 0 and data_cfg.eval_path is None and data_cfg.eval_fraction == 0:
        return [
            f"eval.every={every} needs held-out data: set data.eval_path to a file or directory of documents the training "
            f"does not see, or data.eval_fraction (e.g. 0.01) to hold out that share of the training documents"
        ]
    return []


# --- fingerprints -----------------------------------------------------------------------------------


def builtin_documents() -> list[str]:
    """The built-in corpus: CPython's own reference documentation (pydoc_data), one document per topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def source_fingerprint(source: Source) -> dict:
    """A cheap identity of one source, to tell whether it still holds the same data.

    Local files: each data file's name (relative to the path), size and modification time (the
    files are not read). A hub dataset: its id, configuration, split and the dataset's own hash
    (the repository revision `datasets` resolves; None when it cannot be resolved here). The
    built-in corpus and chat set: a checksum of their text.
    """
    if source.path is None:
        if source.format is DataFormat.chat:
            text = json.dumps(builtin_conversations()).encode()
            return {"kind": "builtin", "name": "p3d.chat", "xxh3_128": xxhash.xxh3_128(text).hexdigest()}
        text = "\x00".join(builtin_documents()).encode()
        return {"kind": "builtin", "name": "pydoc_data.topics", "xxh3_128": xxhash.xxh3_128(text).hexdigest()}
    local = Path(source.path).expanduser()
    if local.exists():
        files = data_files(local) if local.is_dir() else [local]
        base = local if local.is_dir() else local.parent
        return {"kind": "files", "files": {str(f.relative_to(base)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}
    return {"kind": "hub", "id": source.path, "name": source.name, "split": source.split, "revision": _hub_revision(source.path, source.name)}


def data_fingerprint(data_cfg: DataConfig) -> dict:
    """The fingerprint of what is trained on: the one source's, or each source's of a mixture
    (recorded in every checkpoint; a resume compares it with the data it finds)."""
    sources = training_sources(data_cfg)
    if not data_cfg.sources:
        return source_fingerprint(sources[0])
    return {"kind": "mixture", "sources": [source_fingerprint(source) for source in sources]}


@functools.lru_cache(maxsize=None)
def _hub_revision(path: str, name: str | None) -> str | None:
    import datasets

    try:
        return datasets.load_dataset_builder(path, name).hash
    except Exception:  # unreachable hub, offline without a cache: the id, name and split still count
        return None


def fingerprint_change(saved: dict, now: dict) -> str | None:
    """How the data differs from the saved fingerprint, in a few words (None: the same)."""
    if saved == now:
        return None
    if saved.get("kind") != now.get("kind"):
        return f"it was a {saved.get('kind')} source, now a {now.get('kind')} one"
    if now["kind"] == "mixture":
        before, after = saved["sources"], now["sources"]
        if len(before) != len(after):
            return f"the mixture had {len(before)} sources, now {len(after)}"
        changes = [(index, fingerprint_change(old, new)) for index, (old, new) in enumerate(zip(before, after))]
        return next((f"source {index}: {change}" for index, change in changes if change), None)
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
        return "the built-in data differs (another Python or p3d version)"
    unknown = saved.get("revision") is None or now.get("revision") is None  # unresolved then or now: not a difference
    differing = [key for key in ("id", "name", "split", "revision") if saved.get(key) != now.get(key) and not (key == "revision" and unknown)]
    if not differing:
        return None
    return ", ".join(f"{key} {saved.get(key)} then, {now.get(key)} now" for key in differing)


# --- reading rows, unit by unit ----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """A piece of a source that one process reads and tokenizes: the built-in data, a hub dataset, a
    local file, or a byte range of a .jsonl file / a range of row groups of a .parquet file."""

    kind: str  # builtin | hub | text | json | jsonl | parquet | csv
    file: str | None = None
    name: str = ""  # how messages name the file (relative to the source's path)
    start: int = 0  # jsonl: first byte; parquet: first row group
    stop: int | None = None  # jsonl: end byte; parquet: end row group (exclusive); None: the end
    size: int = 0  # bytes


def plan_units(source: Source) -> list[WorkUnit]:
    """The source's work units, in the source's order (the cache's order of documents)."""
    if source.path is None:
        return [WorkUnit("builtin")]
    local = source.local()
    if local is None:
        return [WorkUnit("hub")]
    files = data_files(local) if local.is_dir() else [local]
    base = local if local.is_dir() else local.parent
    units: list[WorkUnit] = []
    for file in files:
        name, size = str(file.relative_to(base)), file.stat().st_size
        if file.suffix == ".parquet":
            units += _parquet_units(file, name)
        elif file.suffix == ".jsonl" or (file.suffix == ".json" and not _starts_with_bracket(file)):
            units += [WorkUnit("jsonl", str(file), name, start, min(start + UNIT_BYTES, size), min(UNIT_BYTES, size - start)) for start in range(0, max(size, 1), UNIT_BYTES)]
        else:
            units.append(WorkUnit(FILE_FORMATS[file.suffix] if file.suffix != ".txt" else "text", str(file), name, size=size))
    return units


def _starts_with_bracket(file: Path) -> bool:
    with file.open("rb") as handle:
        return handle.read(_SNIFF_BYTES).lstrip().startswith(b"[")


def _parquet_units(file: Path, name: str) -> list[WorkUnit]:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(file).metadata
    units, first, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= UNIT_BYTES or group == metadata.num_row_groups - 1:
            units.append(WorkUnit("parquet", str(file), name, first, group + 1, size))
            first, size = group + 1, 0
    return units or [WorkUnit("parquet", str(file), name, 0, 0, 0)]


def read_rows(unit: WorkUnit, source: Source) -> Iterator[tuple[Any, str]]:
    """The unit's rows as (the value of the source's column, where it is for messages)."""
    if unit.kind == "builtin":
        rows = builtin_conversations() if source.format is DataFormat.chat else builtin_documents()
        yield from ((row, f"{source.builtin_name()}, row {index}") for index, row in enumerate(rows))
    elif unit.kind == "hub":
        yield from _hub_rows(source)
    elif unit.kind == "text":
        yield Path(unit.file).read_text(encoding="utf-8", errors="replace"), unit.name
    elif unit.kind == "jsonl":
        yield from _jsonl_rows(unit, source)
    elif unit.kind == "json":
        yield from _json_array_rows(unit, source)
    elif unit.kind == "parquet":
        yield from _parquet_rows(unit, source)
    elif unit.kind == "csv":
        yield from _csv_rows(unit, source)
    else:
        raise ValueError(f"unknown work unit kind {unit.kind}")


def _column(record: Any, where: str, source: Source) -> Any:
    if not isinstance(record, dict):
        raise ConfigError(f"{source.describe()}: {where} is a JSON {type(record).__name__}, not an object; write one object per row, e.g. {{\"{source.field}\": ...}}")
    if source.field not in record:
        raise ConfigError(f"{source.field_key}={source.field}: {where} of {source.describe()} has no such field (it has: {', '.join(map(str, record)) or 'none'}); set {source.field_key} to the field to read")
    return record[source.field]


def _jsonl_rows(unit: WorkUnit, source: Source) -> Iterator[tuple[Any, str]]:
    """The lines that start in [start, stop): a line cut by a range boundary belongs to the range it starts in."""
    with open(unit.file, "rb") as handle:
        if unit.start > 0:
            handle.seek(unit.start - 1)
            handle.readline()  # the rest of the line that started before this range
        line_number = 0 if unit.start == 0 else None
        while True:
            offset = handle.tell()
            if unit.stop is not None and offset >= unit.stop:
                return
            line = handle.readline()
            if not line:
                return
            if line_number is not None:
                line_number += 1
            if not line.strip():
                continue
            where = f"{unit.name} line {line_number}" if line_number is not None else f"{unit.name}, the line at byte {offset}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                reason = f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
                raise ConfigError(f"{source.describe()}: {where} is not valid JSON ({reason}); fix or remove that line") from None
            yield _column(record, where, source), where


def _json_array_rows(unit: WorkUnit, source: Source) -> Iterator[tuple[Any, str]]:
    try:
        records = json.loads(Path(unit.file).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ConfigError(f"{source.describe()}: {unit.name} is not valid JSON ({reason}); fix the file") from None
    if not isinstance(records, list):
        raise ConfigError(f"{source.describe()}: {unit.name} is one JSON {type(records).__name__}; write a list of objects or one object per line")
    for index, record in enumerate(records):
        where = f"{unit.name} item {index}"
        yield _column(record, where, source), where


def _parquet_rows(unit: WorkUnit, source: Source) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.file)
    if source.field not in parquet.schema_arrow.names:
        raise ConfigError(f"{source.field_key}={source.field}: {unit.name} of {source.describe()} has no such column (it has: {', '.join(parquet.schema_arrow.names)})")
    row = sum(parquet.metadata.row_group(group).num_rows for group in range(unit.start))
    groups = list(range(unit.start, unit.stop if unit.stop is not None else parquet.num_row_groups))
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[source.field]):
        for value in batch.column(0).to_pylist():
            yield value, f"{unit.name} row {row}"
            row += 1


def _csv_rows(unit: WorkUnit, source: Source) -> Iterator[tuple[Any, str]]:
    csv.field_size_limit(sys.maxsize)
    with open(unit.file, newline="", encoding="utf-8", errors="replace") as handle:
        for index, record in enumerate(csv.DictReader(handle)):
            where = f"{unit.name} row {index + 1}"
            yield _column(record, where, source), where


def hub_offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE)


def _hub_rows(source: Source) -> Iterator[tuple[Any, str]]:
    """A hub dataset, streamed row by row when online; offline, only the local Hugging Face cache is read."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failed load is reported once, as p3d's own line
    offline = hub_offline()
    try:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split, streaming=not offline)
    except Exception as error:  # datasets raises many types for unreachable or malformed sources
        hint = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not in the local Hugging Face cache)" if offline else ""
        raise ConfigError(f"{source.describe()}: cannot load it{hint} ({_root_cause(error)}); point {source.key} at another source") from None
    rows = iter(dataset)
    index = 0
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as error:
            raise ConfigError(f"{source.describe()}: reading row {index} failed ({_root_cause(error)}); fix the source or point {source.key} at another") from None
        where = f"row {index}"
        yield _column(record, where, source), where
        index += 1


def _root_cause(error: BaseException) -> str:
    """The first line of the error at the end of the `raise ... from` chain."""
    while error.__cause__ is not None:
        error = error.__cause__
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
