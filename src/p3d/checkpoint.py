"""DCP checkpoints under <run.dir>/checkpoints/step_NNNNNNNN, complete only once marked.

A checkpoint directory counts only after every rank has written its shards and rank 0 has
written the completion marker last; a save that dies midway leaves a directory without the
marker, which resume ignores. Model and optimizer are saved as sharded DTensors, so a
checkpoint loads on any layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

COMPLETE_MARKER = "p3d_complete.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optimizer_state}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class Checkpointer:
    def __init__(self, run_dir: Path, is_main: bool):
        self.root = run_dir / "checkpoints"
        self.is_main = is_main

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict) -> Path:
        path = self.path_for(step)
        if self.is_main and path.exists():
            shutil.rmtree(path)  # an incomplete leftover of a killed run at the same step
        dist.barrier()
        dcp.save(state, checkpoint_id=str(path))
        dist.barrier()  # every rank's shards are on disk before the marker says so
        if self.is_main:
            _write_atomically(path / COMPLETE_MARKER, json.dumps({"step": step, "time": time.time()}))
        dist.barrier()
        return path

    def load(self, path: Path, state: dict) -> None:
        dcp.load(state, checkpoint_id=str(path))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
