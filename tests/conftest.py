"""Shared helpers: run p3d as real processes (torchrun on gloo) and read back its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Small and fast: 6 steps of 4 sequences of 32 tokens; no checkpoints unless a test asks.
FAST = ["train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_len=32", "checkpoint=none"]


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def losses(self) -> list[float]:
        return [record["loss"] for record in self.records]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("P3D_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_p3d(run_dir: Path, overrides: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 600, cwd: Path | None = None) -> RunResult:
    """`python -m p3d.train` (nproc=1), else N ranks forked by tests/forkrun.py (the same training code,
    one import for all ranks). Tests of torchrun itself build their torchrun command with run_command."""
    if nproc == 1:
        command = [sys.executable, "-m", "p3d.train"]
    else:
        command = [sys.executable, str(Path(__file__).parent / "forkrun.py"), str(nproc)]
    command += [*overrides, f"run.dir={run_dir}"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(env), timeout=timeout, cwd=cwd or run_dir.parent)
    return RunResult(done.returncode, done.stdout, done.stderr, run_dir)


def run_command(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_env(env), timeout=timeout, cwd=cwd)


def assert_ok(result: RunResult) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def layout_overrides(tp: int, dp: int, cp: int) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.dp={dp}", f"parallel.cp={cp}"]


@pytest.fixture
def p3d_runner(tmp_path):
    counter = iter(range(1000))

    def run(overrides: list[str], nproc: int = 1, **kwargs) -> RunResult:
        return run_p3d(tmp_path / f"run{next(counter)}", overrides, nproc=nproc, **kwargs)

    return run
