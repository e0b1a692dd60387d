"""DCP checkpoints under <run.dir>/checkpoints/step_NNNNNNNN, complete only once marked.

One checkpoint directory holds:

    .metadata, __R_N.distcp   torch.distributed.checkpoint: model and optimizer (sharded DTensors
                              under their full names) and the train state (step, samples consumed)
    config.yaml               the run's resolved config (rank 0)
    hf_config.json            the Hugging Face model config (rank 0); `p3d export` builds from it
    rng/rank_RRRRR.pt         each rank's random-number generator states
    p3d_complete.json         the completion marker, written by rank 0 after every rank is done

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

import json
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from p3d import rng
from p3d.config.schema import AsyncMode, CheckpointConfig
from p3d.distributed.mesh import ParallelDims
from p3d.errors import ConfigError

COMPLETE_MARKER = "p3d_complete.json"
CONFIG_FILE = "config.yaml"
HF_CONFIG_FILE = "hf_config.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

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


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint (missing, incomplete or corrupt), or None if it is."""
    if not path.is_dir():
        return "no such checkpoint directory"
    if not (path / COMPLETE_MARKER).is_file():
        return f"incomplete checkpoint: it has no {COMPLETE_MARKER}, so its save never finished"
    try:
        read_marker(path)
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # unpickling a damaged file raises many types
        return f"corrupt checkpoint: cannot read its metadata ({type(error).__name__})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            return f"corrupt checkpoint: data file {name} is missing or truncated"
    for name in (CONFIG_FILE, HF_CONFIG_FILE):
        if not (path / name).is_file():
            return f"incomplete checkpoint: it has no {name}"
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
    ):
        self.root = run_dir / "checkpoints"
        self.run_dir = run_dir
        self.cfg = cfg
        self.is_main = is_main
        self.dims = dims
        self.config_yaml = config_yaml
        self.hf_config_json = hf_config_json
        self.info = info
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
        self._write_side_files(path)
        if self.group is not None and not sync:
            future = dcp.async_save(state, checkpoint_id=str(path), process_group=self.group)
            pending = PendingSave(path, step, future, started, time.perf_counter() - started)
            future.add_done_callback(lambda _: setattr(pending, "written_at", time.perf_counter()))
            self.pending = pending
            return pending.blocked_s
        dcp.save(state, checkpoint_id=str(path))
        self._mark_complete(path, step, started)
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
        self._mark_complete(pending.path, pending.step, pending.started, blocked_s=pending.blocked_s, written_s=written_s)
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
        dcp.load(state, checkpoint_id=str(path))

    def _write_side_files(self, path: Path) -> None:
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
            (path / CONFIG_FILE).write_text(self.config_yaml)
            (path / HF_CONFIG_FILE).write_text(self.hf_config_json)
        rng.save(rng_file(path, dist.get_rank()))

    def _mark_complete(
        self, path: Path, step: int, started: float, blocked_s: float | None = None, written_s: float | None = None
    ) -> None:
        """The marker records save_s (sync: the whole save; async: until rank 0's write finished) and,
        for async saves, blocked_s (how long training waited) and marked_s (until the marker)."""
        dist.barrier()  # every rank's files are on disk before the marker says so
        if self.is_main:
            seconds = time.perf_counter() - started
            marker = {
                "step": step,
                "layout": {"dp": self.dims.dp, "cp": self.dims.cp, "tp": self.dims.tp},
                "world_size": self.dims.world_size,
                "saved_at": time.time(),
                "save_s": round(seconds if written_s is None else written_s, 3),
                "async": blocked_s is not None,
            }
            if blocked_s is not None:
                marker.update(blocked_s=round(blocked_s, 3), marked_s=round(seconds, 3))
            _write_atomically(path / COMPLETE_MARKER, json.dumps(marker, indent=1))
            self._apply_retention(step)
            blocked = f", training blocked {blocked_s:.2f} s" if blocked_s is not None else ""
            self.info(f"checkpoint {path} complete ({marker['save_s']:.2f} s{blocked})")
        dist.barrier()

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
        dist.all_gather_object(reasons, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error else None)
        rank, reason = next((r, text) for r, text in enumerate(reasons) if text is not None)
        latest = self.latest()
        raise ConfigError(
            f"run.dir={self.run_dir}: writing checkpoint {pending.path.name} failed on rank {rank} ({reason}); "
            f"the newest complete checkpoint is {latest or 'none'}; check free space and permissions there"
        )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
