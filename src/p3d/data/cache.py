"""The token cache: each source tokenized once into memory-mapped files that every rank reads.

One cache entry per (source fingerprint, tokenizer identity, format, column, held-out share), in a
directory under data.cache_dir named after the source and a hash of that identity:

    manifest.json        what was tokenized, with what, how long it took (written last)
    train.tokens.bin     the documents' tokens, each followed by end-of-document (uint16 or uint32)
    train.starts.bin     where each document starts in it (uint64)
    train.targets.bin    chat only: 1 for a token that is a target (the assistant's), else 0 (uint8)
    eval.*.bin           the same for the held-out documents (data.eval_fraction > 0)

A changed source (a file's size or modification time, a dataset revision) or another tokenizer
gives another identity, so a stale entry is never read; nothing is ever deleted.

Building is safe when several processes or nodes start at once: one takes `<entry>.lock` (created
exclusively, its time refreshed while it builds), builds into a temporary directory and renames it
to the entry's name when complete; the others wait for the entry to appear. A lock whose process
died (same host), or which was not refreshed for STALE_S seconds, is taken over. A build that fails
on bad input leaves `<entry>.failed` with its one-line error, which the waiting processes report.

The documents are split into work units (files, parts of large files) that worker processes
tokenize in parallel; their outputs are joined in the source's order, so the cache is the same
whatever the number of processes.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import resource
import shutil
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import xxhash

import p3d
from p3d.config.schema import DataFormat
from p3d.data.chat import check_conversation, render_builtin, render_with_template
from p3d.data.sources import Source, WorkUnit, hub_offline, plan_units, read_rows, source_fingerprint
from p3d.data.tokenizers import Tokenizer, token_dtype
from p3d.errors import ConfigError

CACHE_FORMAT = 1  # bump when the files' layout or their contents' meaning changes
POOL_MIN_BYTES = 16 * 2**20  # smaller sources are tokenized in the process that builds the cache
HEARTBEAT_S = 5.0
STALE_S = 120.0
POLL_S = 0.25
_HELD_OUT_SEED = 0x70336465  # the held-out choice hashes each document with this seed
_BATCH_ROWS = 256
_FLUSH_TOKENS = 2**20

Info = Callable[[str], None]


def _no_info(message: str) -> None:
    pass


# --- reading a built cache -----------------------------------------------------------------------


def _map(path: Path, dtype) -> tuple[np.ndarray, mmap.mmap | None]:
    """A read-only view of a file (and its map): pages are read on demand, from the page cache that
    every process on the node shares."""
    if not path.exists() or path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype), None
    with path.open("rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)  # windows are read at random: no read-ahead
    return np.frombuffer(mapped, dtype=dtype), mapped


@dataclass(frozen=True)
class Rows:
    """Windows read from a stream: tokens, where documents start, and (chat) which tokens are targets."""

    tokens: np.ndarray  # [n, window] int64
    starts: np.ndarray  # [n, window] bool: a document starts at this token
    targets: np.ndarray | None  # [n, window] bool, or None: every token is a target


class TokenStream:
    """One part (train or eval) of a cache entry: documents one after another, cut into windows."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, targets: np.ndarray | None, maps: tuple = ()):
        self.tokens = tokens
        self.starts = starts
        self.targets = targets
        self.maps = [mapped for mapped in maps if mapped is not None]

    @classmethod
    def open(cls, directory: Path, part: str, dtype: str, chat: bool) -> "TokenStream":
        tokens, tokens_map = _map(directory / f"{part}.tokens.bin", np.dtype(dtype))
        starts, starts_map = _map(directory / f"{part}.starts.bin", np.uint64)
        targets, targets_map = _map(directory / f"{part}.targets.bin", np.uint8) if chat else (None, None)
        return cls(tokens, starts, targets, (tokens_map, starts_map, targets_map))

    def _release(self) -> None:
        """Drop the pages just read from this process's mapping. They stay in the page cache, but no
        longer count as this process's resident memory, which would otherwise grow towards the
        corpus' size as training visits it (and show a mapped 1 GB file as 1 GB per rank)."""
        for mapped in self.maps:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED)

    @classmethod
    def from_documents(cls, documents: Iterable[Iterable[int]], eos: int, targets: Iterable[Iterable[bool]] | None = None) -> "TokenStream":
        """An in-memory stream (tests): each document followed by `eos` (which is never a target)."""
        documents = [list(document) + [eos] for document in documents]
        starts = np.cumsum([0] + [len(document) for document in documents[:-1]]).astype(np.uint64)
        flags = None if targets is None else np.concatenate([np.asarray(list(t) + [False], dtype=np.uint8) for t in targets])
        return cls(np.concatenate([np.asarray(d, dtype=np.int64) for d in documents]), starts, flags)

    def __len__(self) -> int:
        return len(self.tokens)

    def window_count(self, window: int) -> int:
        return len(self.tokens) // window

    def read(self, indices: np.ndarray, window: int) -> Rows:
        """Windows `indices` (each `window` tokens long), read from the map on demand."""
        firsts = np.asarray(indices, dtype=np.int64) * window
        positions = firsts[:, None] + np.arange(window)
        tokens = self.tokens[positions].astype(np.int64)
        targets = None if self.targets is None else self.targets[positions] != 0
        # the documents starting inside each window; the bounds in the index's own dtype (other
        # types make numpy convert the whole index first)
        low = np.searchsorted(self.starts, firsts.astype(self.starts.dtype))
        high = np.searchsorted(self.starts, (firsts + window).astype(self.starts.dtype))
        counts = high - low
        rows = np.repeat(np.arange(len(firsts)), counts)
        found = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(low, counts)
        starts = np.zeros((len(firsts), window), dtype=bool)
        starts[rows, self.starts[found].astype(np.int64) - firsts[rows]] = True
        self._release()
        return Rows(tokens, starts, targets)


@dataclass(frozen=True)
class CachedSource:
    source: Source
    directory: Path
    manifest: dict

    def stream(self, part: str) -> TokenStream:
        return TokenStream.open(self.directory, part, self.manifest["dtype"], self.manifest["format"] == DataFormat.chat.value)


# --- finding or building an entry ------------------------------------------------------------------


def cache_identity(source: Source, tokenizer: Tokenizer, eval_fraction: float) -> dict:
    """Everything the cached tokens depend on (the entry's name is a hash of it)."""
    return {
        "cache_format": CACHE_FORMAT,
        "source": source_fingerprint(source),
        "tokenizer": tokenizer.identity(),
        "format": source.format.value,
        "field": source.field,
        "eval_fraction": eval_fraction,
    }


def _entry_name(source: Source, identity: dict) -> str:
    digest = xxhash.xxh3_128(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.label)[:40] or "source"
    return f"{label}-{digest}"


def _complete(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _offline_match(root: Path, identity: dict) -> Path | None:
    """Offline, a hub dataset's revision cannot be resolved: an entry of the same id, configuration and
    split (and everything else) built earlier is used, the newest one."""
    wanted = {**identity, "source": {**identity["source"], "revision": None}}
    found = []
    for manifest_file in root.glob("*/manifest.json"):
        manifest = _complete(manifest_file.parent)
        if manifest is None or manifest["identity"]["source"].get("kind") != "hub":
            continue
        candidate = manifest["identity"]
        if {**candidate, "source": {**candidate["source"], "revision": None}} == wanted:
            found.append((manifest_file.stat().st_mtime, manifest_file.parent))
    return max(found)[1] if found else None


def open_cache(source: Source, tokenizer: Tokenizer, root: Path, eval_fraction: float = 0.0, workers: int = 0, info: Info = _no_info) -> CachedSource:
    """The source's cache entry under `root`, built first if no process has built it yet."""
    identity = cache_identity(source, tokenizer, eval_fraction)
    name = _entry_name(source, identity)
    entry = root / name
    manifest = _complete(entry)
    if manifest is None and identity["source"].get("kind") == "hub" and identity["source"]["revision"] is None and root.is_dir() and hub_offline():
        match = _offline_match(root, identity)
        if match is not None:
            entry, manifest = match, _complete(match)
    if manifest is not None:
        return CachedSource(source, entry, manifest)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"data.cache_dir={root}: cannot create it ({error.strerror or error}); choose a writable data.cache_dir") from None
    lock = BuildLock(root / f"{name}.lock")
    failed = root / f"{name}.failed"
    waiting_since, announced = time.time(), False
    while True:
        manifest = _complete(entry)
        if manifest is not None:
            return CachedSource(source, entry, manifest)
        if failed.exists() and failed.stat().st_mtime >= waiting_since - 1:  # the build we waited for failed
            raise ConfigError(failed.read_text().strip())
        if lock.try_acquire():
            try:
                manifest = _complete(entry)  # built by another process between our look and the lock
                if manifest is None:
                    failed.unlink(missing_ok=True)
                    manifest = _build_locked(source, tokenizer, identity, entry, workers, failed, info)
                return CachedSource(source, entry, manifest)
            finally:
                lock.release()
        holder = lock.holder()
        reason = lock.stale_reason(holder)
        if reason is not None:
            info(f"taking over the token cache build of {entry.name}: {reason}")
            lock.break_stale(holder)
            continue
        if not announced and holder is not None:
            info(f"waiting for pid {holder.get('pid')} on {holder.get('host')} to build the token cache {entry}")
            announced = True
        time.sleep(POLL_S)


def _build_locked(source: Source, tokenizer: Tokenizer, identity: dict, entry: Path, workers: int, failed: Path, info: Info) -> dict:
    """Build into a temporary directory (while holding the lock) and rename it to the entry when complete."""
    for leftover in entry.parent.glob(f".{entry.name}.tmp-*"):  # of a builder that died
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = entry.parent / f".{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    temporary.mkdir()
    try:
        manifest = build_entry(source, tokenizer, identity, temporary, workers, info)
        os.rename(temporary, entry)
    except ConfigError as error:
        failed.write_text("\n".join(error.problems) + "\n")
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    info(
        f"token cache {entry}: {manifest['parts']['train']['tokens']:,} tokens in {manifest['build']['seconds']:.1f} s "
        f"({manifest['build']['tokens_per_s']:,.0f} tokens/s)"
    )
    return manifest


class BuildLock:
    """`<entry>.lock`: created exclusively by the one process that builds; its time is refreshed while it does."""

    def __init__(self, path: Path):
        self.path = path
        self._stop: threading.Event | None = None

    def try_acquire(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
        return True

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self.path.unlink(missing_ok=True)

    def holder(self) -> dict | None:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # being written
        return {**holder, "age": age, "text": text}

    @staticmethod
    def stale_reason(holder: dict | None) -> str | None:
        if holder is None:
            return None
        if holder["age"] > STALE_S:
            return f"its lock was not refreshed for {holder['age']:.0f} s (pid {holder.get('pid')} on {holder.get('host')})"
        if holder.get("host") == socket.gethostname() and "pid" in holder:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return f"its process {holder['pid']} is no longer running"
            except PermissionError:
                pass
        return None

    def break_stale(self, holder: dict) -> None:
        """Remove the stale lock, unless another process replaced it meanwhile (then put that one back)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != holder["text"]:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


# --- building an entry ---------------------------------------------------------------------------


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_entry(source: Source, tokenizer: Tokenizer, identity: dict, directory: Path, workers: int = 0, info: Info = _no_info) -> dict:
    """Tokenize the source into `directory` (units in parallel when it is large) and write its manifest."""
    started = time.perf_counter()
    units = plan_units(source)
    size = sum(unit.size for unit in units)
    processes = min(workers or available_cpus(), len(units)) if size >= POOL_MIN_BYTES else 1
    scale = f" ({len(units)} parts, {size / 2**20:,.0f} MiB, {processes} process{'es' * (processes > 1)})" if size else ""
    info(f"building the token cache for {source.describe()}{scale} in {directory.parent}")
    fraction = identity["eval_fraction"]
    jobs = [(unit, source, tokenizer, fraction, str(directory / f"unit-{index:06d}")) for index, unit in enumerate(units)]
    counts = _run(jobs, processes)
    dtype = token_dtype(tokenizer.vocab_size)
    chat = source.format is DataFormat.chat
    parts = {part: _join(directory, part, len(units), chat, [count[part] for count in counts]) for part in (("train", "eval") if fraction > 0 else ("train",))}
    _check_built(source, parts)
    seconds = time.perf_counter() - started
    total = sum(part["tokens"] for part in parts.values())
    manifest = {
        "identity": identity,
        "p3d_version": p3d.__version__,
        "format": source.format.value,
        "dtype": dtype.name,
        "eos_token_id": tokenizer.eos_token_id,
        "parts": parts,
        "build": {
            "seconds": round(seconds, 3),
            "processes": processes,
            "units": len(units),
            "tokens_per_s": round(total / max(seconds, 1e-9), 1),
            "peak_rss_gb": round(max(count["peak_rss_gb"] for count in counts), 3),  # of the process(es) that tokenized
            "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _run(jobs: list[tuple], processes: int) -> list[dict]:
    if processes <= 1:
        return [tokenize_unit(*job) for job in jobs]
    context = multiprocessing.get_context("forkserver")  # a clean process, not a fork of a rank's threads
    context.set_forkserver_preload(["p3d.data.cache"])
    pool = ProcessPoolExecutor(processes, mp_context=context)
    try:
        futures = [pool.submit(tokenize_unit, *job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_built(source: Source, parts: dict) -> None:
    train = parts["train"]
    if train["tokens"] - train["documents"] == 0:
        raise ConfigError(f"{source.describe()}: holds no text ({train['documents']} documents, all empty); point {source.key} at a corpus")
    if source.format is DataFormat.chat and train["target_tokens"] == 0:
        raise ConfigError(f"{source.describe()}: no conversation has an assistant message, so nothing would be trained on; check the data or use data.format=text")


def _join(directory: Path, part: str, unit_count: int, chat: bool, counts: list[dict]) -> dict:
    """The units' files of one part, joined in order into the part's files (document starts shifted)."""
    offset = 0
    with (directory / f"{part}.tokens.bin").open("wb") as tokens, (directory / f"{part}.starts.bin").open("wb") as starts:
        targets = (directory / f"{part}.targets.bin").open("wb") if chat else None
        for index in range(unit_count):
            prefix = directory / f"unit-{index:06d}.{part}"
            with open(f"{prefix}.tokens", "rb") as piece:
                shutil.copyfileobj(piece, tokens, 16 * 2**20)
            (np.fromfile(f"{prefix}.starts", dtype=np.uint64) + np.uint64(offset)).tofile(starts)
            if targets is not None:
                with open(f"{prefix}.targets", "rb") as piece:
                    shutil.copyfileobj(piece, targets, 16 * 2**20)
            offset += counts[index]["tokens"]
            for suffix in ("tokens", "starts", "targets"):
                Path(f"{prefix}.{suffix}").unlink(missing_ok=True)
        if targets is not None:
            targets.close()
    return {key: sum(count[key] for count in counts) for key in ("tokens", "documents", "target_tokens")}


class _PartWriter:
    """One unit's documents of one part, appended to its files in large writes."""

    def __init__(self, prefix: str, dtype: np.dtype, eos: int, chat: bool):
        self.dtype, self.chat = dtype, chat
        self.eos = np.asarray([eos], dtype=dtype)
        self.no_target = np.zeros(1, dtype=np.uint8)
        self.files = {suffix: open(f"{prefix}.{suffix}", "wb") for suffix in (("tokens", "starts", "targets") if chat else ("tokens", "starts"))}
        self.pending: dict[str, list[np.ndarray]] = {suffix: [] for suffix in self.files}
        self.pending_tokens = 0
        self.tokens = self.documents = self.target_tokens = 0

    def add(self, ids: np.ndarray, targets: np.ndarray | None) -> None:
        self.pending["starts"].append(np.asarray([self.tokens], dtype=np.uint64))
        self.pending["tokens"] += [ids.astype(self.dtype, copy=False), self.eos]
        if self.chat:
            self.pending["targets"] += [targets.astype(np.uint8), self.no_target]
            self.target_tokens += int(targets.sum())
        self.tokens += len(ids) + 1
        self.documents += 1
        self.pending_tokens += len(ids) + 1
        if self.pending_tokens >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        for suffix, arrays in self.pending.items():
            if arrays:
                self.files[suffix].write(np.concatenate(arrays).tobytes())
            arrays.clear()
        self.pending_tokens = 0

    def close(self) -> dict:
        self.flush()
        for handle in self.files.values():
            handle.close()
        return {"tokens": self.tokens, "documents": self.documents, "target_tokens": self.target_tokens}


def held_out(document: bytes, fraction: float) -> bool:
    """Whether a document is held out: a hash of its content below `fraction` of the hash range (the
    same document always lands on the same side, however the source is split or ordered)."""
    return fraction > 0 and xxhash.xxh64_intdigest(document, seed=_HELD_OUT_SEED) < fraction * 2**64


def tokenize_unit(unit: WorkUnit, source: Source, tokenizer: Tokenizer, fraction: float, prefix: str) -> dict:
    """Read and tokenize one work unit into `<prefix>.train.*` (and `<prefix>.eval.*`); returns the counts."""
    chat = source.format is DataFormat.chat
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {part: _PartWriter(f"{prefix}.{part}", dtype, tokenizer.eos_token_id, chat) for part in (("train", "eval") if fraction > 0 else ("train",))}
    batch: list[tuple] = []  # (text or (messages, where))

    def flush() -> None:
        if chat:
            encoded = _encode_conversations(tokenizer, batch)
        else:
            encoded = [(ids, None) for ids in tokenizer.encode_arrays(batch)]
        for row, (ids, targets) in zip(batch, encoded):
            writers["eval" if fraction > 0 and held_out(_content(row), fraction) else "train"].add(ids, targets)
        batch.clear()

    for value, where in read_rows(unit, source):
        batch.append((check_conversation(value, source.field, where, source.describe()), where) if chat else _text(value, where, source))
        if len(batch) >= _BATCH_ROWS:
            flush()
    if batch:
        flush()
    counts = {part: writer.close() for part, writer in writers.items()}
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {**counts, "eval": counts.get("eval", {"tokens": 0, "documents": 0, "target_tokens": 0}), "peak_rss_gb": peak_rss_gb}


def _content(row) -> bytes:
    """What identifies a document for the held-out choice: its text, or its conversation's messages."""
    if isinstance(row, str):
        return row.encode("utf-8", errors="replace")
    return json.dumps(row[0], sort_keys=True).encode()


def _text(value, where: str, source: Source) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise ConfigError(f"{source.field_key}={source.field}: {where} of {source.describe()} holds a {type(value).__name__}, not text; point {source.field_key} at a text column")


def _encode_conversations(tokenizer: Tokenizer, rows: list[tuple[list[dict], str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Render each conversation (the tokenizer's chat template, else p3d's) and mark the assistant's tokens."""
    template = tokenizer.chat_template
    rendered = [render_with_template(tokenizer.tokenizer, messages, where) if template else render_builtin(messages) for messages, where in rows]
    return tokenizer.encode_marked([text for text, _ in rendered], [spans for _, spans in rendered])
