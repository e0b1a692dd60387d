"""Shared helpers: run p3d as real processes (torchrun on gloo) and read back its metrics."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
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
    by tests/forkrun.py (the same training code, one import for all ranks), each started by the test
    session's zygote where it can (see Zygote). Tests of torchrun itself build their torchrun command
    with run_command."""
    if nproc > 1:
        argv = [str(TESTS / "forkrun.py"), str(nproc)]
    elif env and "P3D_TEST_HOOKS" in env:
        argv = [str(HOOKRUN)]
    else:
        argv = ["-m", "p3d.train"]
    argv += [*overrides, f"run.dir={run_dir}"]
    done = run_python(argv, env=_env(env), timeout=timeout, cwd=cwd or run_dir.parent)
    return RunResult(done.returncode, done.stdout, done.stderr, run_dir)


class Zygote:
    """tests/zygote.py: one process that has imported p3d and forks a fresh child per run, so that a
    run does not spend ~5 s importing torch and transformers. It serves only runs whose environment
    differs from its own in P3D_* keys (read at run time, never at import) and pytest's PYTEST_CURRENT_TEST;
    others start afresh."""

    def __init__(self) -> None:
        self.env = _env()
        self.process = subprocess.Popen([sys.executable, str(TESTS / "zygote.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, bufsize=0)
        self.outputs = Path(tempfile.mkdtemp(prefix="p3d-zygote-"))

    def serves(self, env: dict) -> bool:
        changed = {key for key in env.keys() | self.env.keys() if env.get(key) != self.env.get(key)}
        return all(key.startswith("P3D_") or key == "PYTEST_CURRENT_TEST" for key in changed)

    def run(self, argv: list[str], env: dict, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
        stdout, stderr = self.outputs / "stdout", self.outputs / "stderr"
        stdout.write_text("")
        stderr.write_text("")
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr)}
        data = (json.dumps(request) + "\n").encode()
        while data:
            data = data[self.process.stdin.write(data):]
        pid = self.last_pid = self.answer()["pid"]
        answer = self.answer(timeout)
        timed_out = answer is None
        if timed_out:  # end the run, forked ranks included
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            answer = self.answer()
        done = subprocess.CompletedProcess([sys.executable, *argv], answer["returncode"], stdout.read_text(), stderr.read_text())
        if timed_out:
            raise subprocess.TimeoutExpired(done.args, timeout, done.stdout, done.stderr)
        return done

    def answer(self, timeout: float | None = None) -> dict | None:
        """The server's next line (unbuffered, so that select sees every byte not yet read), or None after `timeout` s."""
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                return None
            byte = os.read(self.process.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError(f"tests/zygote.py ended (exit {self.process.wait()})")
            line += byte
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        shutil.rmtree(self.outputs, ignore_errors=True)


_zygote: Zygote | None = None


def run_python(argv: list[str], env: dict, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """`python *argv`, in a child of the session's zygote when it serves this environment."""
    global _zygote
    if _zygote is None or _zygote.process.poll() is not None:
        _zygote = Zygote()
        atexit.register(_zygote.close)
    if _zygote.serves(env):
        return _zygote.run(argv, env, timeout, cwd)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


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
