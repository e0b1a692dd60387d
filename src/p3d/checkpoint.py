"""DCP checkpoints under <run.dir>/checkpoints/step_NNNNNNNN, complete only once marked: the format,
writing, verifying and reading live here (resume.py and export.py ask this module).

One checkpoint directory holds:

    .metadata, __R_N.distcp   torch.distributed.checkpoint: model and optimizer (sharded DTensors
                              under their full names) and the train state (step, samples consumed)
    config.yaml               the run's resolved config (rank 0)
    hf_config.json            the Hugging Face model config (rank 0); `p3d export` builds from it
    rng/rank_RRRRR.pt         each rank's random-number generator states
    p3d_complete.json         the completion marker, written by rank 0 after every rank is done

The marker lists every other file of the checkpoint with its size and an xxh3-128 checksum. The
checksum is computed from the bytes as they are written (DCP's file streams are wrapped, the side
files are hashed from memory), never by reading the files back; every rank reports what it wrote,
and rank 0 writes the marker only after it has seen each reported file, at its size, in the
checkpoint directory (a rank writing elsewhere, e.g. to storage other nodes do not share, fails
the save instead of leaving a marked checkpoint without that rank's shards). Before anything is
loaded, `verify_checkpoint` compares every file with the marker (sizes, then checksums; the ranks
of a job share the reading). The marker also records the data source's fingerprint
(`p3d.data.data_fingerprint`), which a resume compares with the data it finds.

A directory without the marker is a save that never finished: it is never taken as the latest,
and naming it explicitly is an error. The marker is written last and removed first (retention
deletes the marker before the files), so no marked directory ever misses its data.

The optimizer state is saved flattened (keyed by parameter name, not by param-group index), so
it loads into any layout even where the optimizer's parameter groups differ. The LR schedule is
not saved: it is a function of the step and the config, rebuilt on resume.

With `checkpoint.async_mode=thread`, the save copies the state into memory and writes it from a
background thread on a gloo process group of its own, while training goes on; the marker is
written once every rank's write has finished, which the train loop checks after every step.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from p3d import rng
from p3d.config.schema import AsyncMode, CheckpointConfig
from p3d.distributed.mesh import ParallelDims
from p3d.errors import RunError

COMPLETE_MARKER = "p3d_complete.json"
CONFIG_FILE = "config.yaml"
HF_CONFIG_FILE = "hf_config.json"
FORMAT_VERSION = 2  # 2: the marker lists every file with its size and checksum
CHECKSUM = "xxh3_128"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_READ_CHUNK = 16 << 20
_OVERLAP_BYTES = 1 << 20  # writes this large are hashed on a helper thread while they are written

# A rank's view of the pending asynchronous save; the train loop reduces these with MAX.
SAVE_IDLE, SAVE_RUNNING, SAVE_FAILED = 0, 1, 2


@dataclass
class TrainState:
    """The loop's position: optimizer steps taken and global samples consumed (layout-independent)."""

    step: int = 0
    consumed_samples: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])


class ModelAndOptimizer(Stateful):
    """Sharded model and optimizer state with fully qualified names (DCP reshards it on load)."""

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_STATE_DICT_OPTIONS)
        return {"model": model_state, "optim": optimizer_state}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_STATE_DICT_OPTIONS
        )


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step_NNNNNNNN directory under root (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := _STEP_DIR.match(path.name))]
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    return [(step, path) for step, path in step_dirs(root) if (path / COMPLETE_MARKER).is_file()]


def read_marker(path: Path) -> dict:
    return json.loads((path / COMPLETE_MARKER).read_text())


def rng_file(path: Path, rank: int) -> Path:
    return path / "rng" / f"rank_{rank:05d}.pt"


# --- what was written: sizes and checksums taken from the bytes on their way out -----------------


def _new_hasher():
    return xxhash.xxh3_128()


class _HashingStream:
    """A binary file being written: every write also goes into the size count and the checksum.

    A large write (a tensor's bytes) is hashed on a helper thread while the same bytes go to the
    file (xxhash and the file write both release the GIL), so the checksum costs little save time
    where a core is free; each write returns only once its bytes are hashed, so no buffer is read
    after the writer has it back. DCP writes its files strictly sequentially (write, and tell for
    offsets); a seek would make the running checksum describe other bytes than the file, so it
    is refused."""

    def __init__(self, raw, checksums: bool):
        self.raw = raw
        self.size = 0
        self.hasher = _new_hasher() if checksums else None
        self._helper: ThreadPoolExecutor | None = None

    def write(self, data) -> int:
        view = memoryview(data)
        self.size += view.nbytes
        if self.hasher is None:
            return self.raw.write(view)
        if view.nbytes < _OVERLAP_BYTES:
            self.hasher.update(view)
            return self.raw.write(view)
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3d-checksum")
        hashed = self._helper.submit(self.hasher.update, view)
        try:
            return self.raw.write(view)
        finally:
            hashed.result()

    def seek(self, *args):
        raise io.UnsupportedOperation("checkpoint files are written sequentially (p3d checksums them on the way)")

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def record(self) -> dict:
        if self._helper is not None:
            self._helper.shutdown()
            self._helper = None
        return {"size": self.size, CHECKSUM: self.hasher.hexdigest() if self.hasher is not None else None}


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, recording the size and checksum of every file it writes.

    DCP writes `.metadata` under a temporary name and renames it: the record follows the rename."""

    def __init__(self, checksums: bool):
        super().__init__()
        self.checksums = checksums
        self.written: dict[str, dict] = {}
        self._lock = threading.Lock()  # DCP may write several files from threads of its own

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw, self.checksums)
            yield stream
        with self._lock:
            self.written[str(path)] = stream.record()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if str(path) in self.written:
                self.written[str(new_path)] = self.written.pop(str(path))


class RecordingWriter(FileSystemWriter):
    """DCP's FileSystemWriter (sync and async saves alike) with every file's size and checksum recorded."""

    def __init__(self, path: Path, checksums: bool):
        super().__init__(str(path))
        self.fs = _RecordingFileSystem(checksums)  # the writer opens every file through self.fs

    def records(self, root: Path) -> dict[str, dict]:
        return {os.path.relpath(name, root): record for name, record in self.fs.written.items()}


def write_file(path: Path, data: bytes, checksums: bool) -> dict:
    """Write a small file of the checkpoint from memory; its record (size, checksum) is taken from `data`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw:
        stream = _HashingStream(raw, checksums)
        stream.write(data)
    return stream.record()


# --- reading and verifying ---------------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint by what can be seen without reading its data (missing,
    incomplete, or a file missing or of another size than saved), or None. `verify_checkpoint`
    also compares the checksums."""
    if not path.is_dir():
        return "no such checkpoint directory"
    if not (path / COMPLETE_MARKER).is_file():
        return f"incomplete checkpoint: it has no {COMPLETE_MARKER}, so its save never finished"
    try:
        marker = read_marker(path)
    except (OSError, ValueError) as error:
        return f"corrupt checkpoint: cannot read its {COMPLETE_MARKER} ({type(error).__name__})"
    if not isinstance(marker, dict):
        return f"corrupt checkpoint: its {COMPLETE_MARKER} is not a marker p3d wrote"
    files = marker.get("files")
    if marker.get("format") != FORMAT_VERSION or not isinstance(files, dict):
        return f"unverifiable checkpoint: its {COMPLETE_MARKER} lists no file checksums (saved by an older p3d)"
    for name in sorted(files):
        size = _size(path / name)
        if size is None:
            return f"corrupt checkpoint: {name} is missing"
        if size != files[name]["size"]:
            return f"corrupt checkpoint: {name} is {size} bytes, {files[name]['size']} when saved"
    return None


def _size(file: Path) -> int | None:
    try:
        return file.stat().st_size if file.is_file() else None
    except OSError:
        return None


def file_checksum(file: Path) -> str:
    hasher = _new_hasher()
    with file.open("rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _content_problem(path: Path, names: list[str]) -> str | None:
    """The first of `names` whose bytes do not match the marker's checksum (after checkpoint_problem)."""
    files = read_marker(path)["files"]
    for name in names:
        expected = files[name].get(CHECKSUM)
        if expected is None:
            continue  # saved with checkpoint.checksums=false: its size was checked
        try:
            actual = file_checksum(path / name)
        except OSError as error:
            return f"corrupt checkpoint: cannot read {name} ({type(error).__name__})"
        if actual != expected:
            return f"corrupt checkpoint: {name} does not match the checksum recorded when it was saved (damaged since)"
    return None


def verify_checkpoint(path: Path, shared: bool = False) -> str | None:
    """None if `path` is a complete checkpoint whose every file has the size and checksum the marker
    recorded; otherwise why not, one line.

    With `shared` (inside a process group), the ranks split the files among themselves and every
    rank returns the same answer (each also checks that it sees the checkpoint at all)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if shared and dist.is_initialized() else (0, 1)
    try:
        problem = checkpoint_problem(path)
        if problem is None:
            problem = _content_problem(path, sorted(read_marker(path)["files"])[rank::world])
    except Exception as error:  # one rank failing must not leave the others waiting in the gather below
        problem = f"corrupt checkpoint: cannot be read ({type(error).__name__}: {error})"
    if world == 1:
        return problem
    problems: list = [None] * world
    dist.all_gather_object(problems, problem)
    return next((text for text in problems if text is not None), None)


def newest_intact(root: Path, other_than: Path, verify: Callable[[Path], str | None] = verify_checkpoint) -> Path | None:
    """The newest complete checkpoint under `root` besides `other_than` that `verify` finds intact."""
    for _, path in reversed(complete_checkpoints(root)):
        if path.resolve() != other_than.resolve() and verify(path) is None:
            return path
    return None


def remove_checkpoint(path: Path) -> None:
    """Marker first: a deletion cut short leaves an incomplete directory, never a marked one without data."""
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class PendingSave:
    path: Path
    step: int
    future: Future
    writer: RecordingWriter
    side_records: dict[str, dict]
    started: float
    blocked_s: float
    written_at: float | None = None  # when this rank's background write finished


class Checkpointer:
    """Saves (sync or async) into run.dir/checkpoints, marks them complete, applies retention.

    Every method that takes part in a save is called by all ranks at the same point.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: CheckpointConfig,
        is_main: bool,
        dims: ParallelDims,
        config_yaml: str,
        hf_config_json: str,
        info: Callable[[str], None] = print,
        data_fingerprint: dict | None = None,
    ):
        self.root = run_dir / "checkpoints"
        self.run_dir = run_dir
        self.cfg = cfg
        self.is_main = is_main
        self.dims = dims
        self.config_yaml = config_yaml
        self.hf_config_json = hf_config_json
        self.info = info
        self.data_fingerprint = data_fingerprint
        # The background writer's collectives get their own group, so they never interleave
        # with the train loop's; gloo, because DCP's coordination uses CPU tensors.
        self.group = dist.new_group(backend="gloo") if cfg.async_mode is AsyncMode.thread else None
        self.pending: PendingSave | None = None

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict, sync: bool = False) -> float:
        """Save the state of `step`; returns the seconds the caller was blocked.

        In async mode (unless `sync`), this waits for the previous save, copies the state and
        returns while a background thread writes it; `poll`/`wait` complete it later.
        """
        started = time.perf_counter()
        self.wait()
        path = self.path_for(step)
        if self.is_main and path.exists():
            remove_checkpoint(path)  # an unfinished save of a killed run, or an abandoned history
        dist.barrier()
        side_records = self._write_side_files(path)
        writer = RecordingWriter(path, self.cfg.checksums)
        if self.group is not None and not sync:
            future = dcp.async_save(state, storage_writer=writer, checkpoint_id=str(path), process_group=self.group)
            pending = PendingSave(path, step, future, writer, side_records, started, time.perf_counter() - started)
            future.add_done_callback(lambda _: setattr(pending, "written_at", time.perf_counter()))
            self.pending = pending
            return pending.blocked_s
        try:
            dcp.save(state, storage_writer=writer, checkpoint_id=str(path))
        except Exception as error:  # DCP gathers every rank's write result: all ranks raise together
            raise self._save_failed(path, f"{type(error).__name__}: {_first_line(error)}") from error
        self._mark_complete(path, step, {**side_records, **writer.records(path)}, started)
        return time.perf_counter() - started

    def local_status(self) -> int:
        if self.pending is None:
            return SAVE_IDLE
        if not self.pending.future.done():
            return SAVE_RUNNING
        return SAVE_FAILED if self.pending.future.exception() is not None else SAVE_IDLE

    def poll(self, global_status: int) -> float:
        """With every rank's status reduced by MAX: complete the pending save once all have written it."""
        if self.pending is None or global_status == SAVE_RUNNING:
            return 0.0
        started = time.perf_counter()
        pending, self.pending = self.pending, None
        if global_status == SAVE_FAILED:
            self._raise_failure(pending)
        written_s = (pending.written_at or time.perf_counter()) - pending.started
        records = {**pending.side_records, **pending.writer.records(pending.path)}
        self._mark_complete(pending.path, pending.step, records, pending.started, blocked_s=pending.blocked_s, written_s=written_s)
        return time.perf_counter() - started

    def wait(self) -> float:
        """Block until the pending save is written on every rank, then complete it."""
        if self.pending is None:
            return 0.0
        started = time.perf_counter()
        try:
            self.pending.future.result()
        except Exception:  # reported to every rank by poll below
            pass
        status = torch.tensor(self.local_status())
        dist.all_reduce(status, op=dist.ReduceOp.MAX, group=self.group)  # this rank's writer is done with the group
        self.poll(int(status))
        return time.perf_counter() - started

    def load(self, path: Path, state: dict) -> None:
        """Load a checkpoint that `verify_checkpoint` found intact (resume.plan_resume does that)."""
        dcp.load(state, checkpoint_id=str(path))

    def _write_side_files(self, path: Path) -> dict[str, dict]:
        """config.yaml and hf_config.json (rank 0) and this rank's RNG states; their records by relative name."""
        records = {}
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
            records[CONFIG_FILE] = write_file(path / CONFIG_FILE, self.config_yaml.encode(), self.cfg.checksums)
            records[HF_CONFIG_FILE] = write_file(path / HF_CONFIG_FILE, self.hf_config_json.encode(), self.cfg.checksums)
        buffer = io.BytesIO()
        torch.save(rng.capture(), buffer)
        own_rng = rng_file(path, dist.get_rank())
        records[str(own_rng.relative_to(path))] = write_file(own_rng, buffer.getvalue(), self.cfg.checksums)
        return records

    def _mark_complete(
        self, path: Path, step: int, records: dict[str, dict], started: float, blocked_s: float | None = None, written_s: float | None = None
    ) -> None:
        """Rank 0 writes the marker once it sees every rank's files. It records save_s (sync: the whole
        save; async: until rank 0's write finished) and, for async saves, blocked_s (how long training
        waited) and marked_s (until the marker)."""
        files = self._gather_written_files(path, records)
        if self.is_main:
            seconds = time.perf_counter() - started
            marker = {
                "format": FORMAT_VERSION,
                "step": step,
                "layout": {"dp": self.dims.dp, "cp": self.dims.cp, "tp": self.dims.tp},
                "world_size": self.dims.world_size,
                "saved_at": time.time(),
                "save_s": round(seconds if written_s is None else written_s, 3),
                "async": blocked_s is not None,
            }
            if blocked_s is not None:
                marker.update(blocked_s=round(blocked_s, 3), marked_s=round(seconds, 3))
            marker.update(checksum=CHECKSUM if self.cfg.checksums else None, data=self.data_fingerprint, files=files)
            _write_atomically(path / COMPLETE_MARKER, json.dumps(marker, indent=1))
            self._apply_retention(step)
            blocked = f", training blocked {blocked_s:.2f} s" if blocked_s is not None else ""
            self.info(f"checkpoint {path} complete ({marker['save_s']:.2f} s{blocked})")
        dist.barrier()

    def _gather_written_files(self, path: Path, records: dict[str, dict]) -> dict[str, dict]:
        """Every rank reports the files it wrote; rank 0 checks that it sees each of them, at its size,
        in its checkpoint directory, and every rank learns the verdict (a failure on all ranks)."""
        reports: list = [None] * dist.get_world_size()
        dist.all_gather_object(reports, {"dir": str(path.resolve()), "files": records})
        verdict = [files_missing_from(path, reports) if self.is_main else None]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RunError(
                f"run.dir={self.run_dir}: checkpoint {path.name} is not marked complete: {verdict[0]}; "
                f"run.dir must be one directory on storage that every rank writes to and rank 0 reads"
            )
        return dict(sorted((name, record) for report in reports for name, record in report["files"].items()))

    def _apply_retention(self, newest_step: int) -> None:
        """Rank 0, after the newest marker: keep the newest `keep_last` complete checkpoints."""
        if self.cfg.keep_last <= 0:
            return
        complete = self.complete()
        for _, path in complete[: -self.cfg.keep_last]:
            remove_checkpoint(path)
        complete_paths = {path for _, path in complete}
        for step, path in step_dirs(self.root):
            if step < newest_step and path not in complete_paths:
                remove_checkpoint(path)  # an older save that never finished

    def _raise_failure(self, pending: PendingSave) -> None:
        error = pending.future.exception() if pending.future.done() else None
        reasons: list = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, f"{type(error).__name__}: {_first_line(error)}" if error else None)
        rank, reason = next((r, text) for r, text in enumerate(reasons) if text is not None)
        raise self._save_failed(pending.path, reason, f" on rank {rank}")

    def _save_failed(self, path: Path, reason: str, where: str = "") -> RunError:
        return RunError(
            f"run.dir={self.run_dir}: writing checkpoint {path.name} failed{where} ({reason}); "
            f"the newest complete checkpoint is {self.latest() or 'none'}; check free space and permissions there"
        )


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def files_missing_from(path: Path, reports: list[dict]) -> str | None:
    """Rank 0's check before the marker: each rank's reported files are in `path` at their sizes."""
    for rank, report in enumerate(reports):
        for name, record in sorted(report["files"].items()):
            size = _size(path / name)
            if size != record["size"]:
                seen = "does not see it" if size is None else f"sees {size} bytes"
                return f"rank {rank} wrote {name} ({record['size']} bytes) into {report['dir']}, and rank 0 {seen} in {path.resolve()}"
    return None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
