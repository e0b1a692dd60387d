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
    for name in ("P3D_TEST_HOOKS", "P3D_TEST_FAULT_RANK", "P3D_TEST_REPORT"):
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


TESTS = Path(__file__).parent
HOOKRUN = TESTS / "hookrun.py"


def run_p3d(run_dir: Path, overrides: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 600, cwd: Path | None = None) -> RunResult:
    """`python -m p3d.train` (nproc=1; tests/hookrun.py when `env` names test hooks), else N ranks forked
    by tests/forkrun.py (the same training code, one import for all ranks). Tests of torchrun itself
    build their torchrun command with run_command."""
    if nproc > 1:
        command = [sys.executable, str(TESTS / "forkrun.py"), str(nproc)]
    elif env and "P3D_TEST_HOOKS" in env:
        command = [sys.executable, str(HOOKRUN)]
    else:
        command = [sys.executable, "-m", "p3d.train"]
    command += [*overrides, f"run.dir={run_dir}"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(env), timeout=timeout, cwd=cwd or run_dir.parent)
    return RunResult(done.returncode, done.stdout, done.stderr, run_dir)


def hooks_env(*hooks: str, fault_rank: int | None = None, report: Path | None = None) -> dict:
    """The environment that installs test hooks (tests/hooks.py) in every rank: hooks_env("kill_in_save=10", fault_rank=1)."""
    env = {"P3D_TEST_HOOKS": ",".join(hooks)}
    if fault_rank is not None:
        env["P3D_TEST_FAULT_RANK"] = str(fault_rank)
    if report is not None:
        env["P3D_TEST_REPORT"] = str(report)
    return env


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
