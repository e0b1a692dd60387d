"""The run directory: one per job, the same on every rank, held by one job at a time.

- Every rank composes its own config (plain torchrun), so per-process interpolations such as
  `run.dir=runs/x_${now:%H%M%S}` can resolve differently; once the process group exists, rank 0's
  resolved run.dir is the run's on every rank (`agree_on_run_dir`).
- Global rank 0 of a job holds a lock file in run.dir (`RunLock`): host, pid, start time, and the
  job's identity under torchrun or Slurm, written atomically. A second job on the same run.dir stops
  with one line naming the holder. A lock whose process is gone (the same host, its pid dead or
  reused), or one left by an earlier attempt of the same job (a torchrun restart, a Slurm requeue,
  wherever its rank 0 ran), is taken over with a notice. A lock from another host that may still
  be alive is refused, saying how to remove it if that job is dead. The lock is released at exit,
  also on errors, and on SIGTERM outside the train loop (inside it SIGTERM saves and stops).
  Multi-node jobs share the one run directory and its one lock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from omegaconf import DictConfig

from p3d.config.compose import set_run_dir
from p3d.config.schema import P3DConfig
from p3d.errors import ConfigError

LOCK_FILE = "p3d.lock"


def agree_on_run_dir(cfg: DictConfig, config: P3DConfig) -> Path:
    """Rank 0's run.dir becomes every rank's (in both views of the config); returns it."""
    chosen = [str(config.run.dir)]
    dist.broadcast_object_list(chosen, src=0)
    set_run_dir(cfg, chosen[0])
    config.run.dir = chosen[0]
    return Path(chosen[0])


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run.dir={run_dir}: cannot create it ({error.strerror or error}); choose a writable run.dir") from None


# --- the lock -------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid; None elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _job() -> tuple[str | None, list[int]]:
    """This job's identity across restarts (Slurm job and step, or torchrun's rendezvous id) and its attempt."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        job = f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    elif env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        job = f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    else:
        job = None
    attempt = [int(env.get("SLURM_RESTART_COUNT", "0") or 0), int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)]
    return job, attempt


def this_process() -> dict:
    job, attempt = _job()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "process_start": _process_start(os.getpid()),
        "job": job,
        "attempt": attempt,
    }


def _alive_here(holder: dict) -> bool:
    """Whether the holder's process (on this host) still runs: its pid exists and is the same process."""
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    recorded, now = holder.get("process_start"), _process_start(int(holder["pid"]))
    return recorded is None or now is None or recorded == now


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why the holder's lock may be taken over, or None when that job may still be running."""
    if holder.get("host") == me["host"]:
        return None if _alive_here(holder) else f"its process {holder.get('pid')} is no longer running"
    if holder.get("job") is not None and holder.get("job") == me["job"] and list(holder.get("attempt", [])) < me["attempt"]:
        return "it was left by an earlier attempt of this job"
    return None


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class RunLock:
    """The lock file of one run directory, held by global rank 0 of the job using it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.held: str | None = None  # our lock's text, while we hold it
        self._previous_sigterm = None

    def holder(self) -> dict | None:
        """The current holder (None: no lock); a lock file that cannot be read counts as held by someone unknown."""
        for _ in range(3):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            except OSError:
                text = ""
            try:
                return json.loads(text)
            except ValueError:
                time.sleep(0.1)  # being written without hard links (see _create)
        return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}

    def check(self, me: dict | None = None) -> None:
        """Raise if a job that may still be running holds the lock (`p3d train` asks before it launches)."""
        holder = self.holder()
        if holder is not None and stale_reason(holder, me or this_process()) is None:
            raise ConfigError(self._held_message(holder, me or this_process()))

    def acquire(self, notice: Callable[[str], None]) -> None:
        """Take the lock, or raise ConfigError naming run.dir and the holder."""
        me = this_process()
        text = json.dumps(me, indent=1) + "\n"
        for _ in range(5):
            try:
                created = self._create(text)
            except OSError as error:
                raise ConfigError(f"run.dir={self.run_dir}: cannot write its lock file there ({error.strerror or error}); choose a writable run.dir") from None
            if created:
                self.held = text
                self._release_on_sigterm()
                return
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            reason = stale_reason(holder, me)
            if reason is None:
                raise ConfigError(self._held_message(holder, me))
            if self._remove_stale(holder):
                notice(f"run.dir={self.run_dir}: took over the lock of {describe(holder)}: {reason}")
        raise ConfigError(f"run.dir={self.run_dir}: other jobs keep taking its lock ({self.path}); start one job per run.dir")

    def release(self) -> None:
        """Remove the lock if it is still ours (never one another job has taken over)."""
        if self.held is None:
            return
        try:
            if self.path.read_text() == self.held:
                self.path.unlink()
        except OSError:
            pass
        self.held = None
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _held_message(self, holder: dict, me: dict) -> str:
        if holder.get("host") == me["host"]:
            return f"run.dir={self.run_dir} is in use by another p3d job ({describe(holder)}); wait for it to end or choose another run.dir"
        return (
            f"run.dir={self.run_dir} is in use by a p3d job on another host ({describe(holder)}); if that job is no longer "
            f"running, delete {self.path} and rerun, or choose another run.dir"
        )

    def _create(self, text: str) -> bool:
        """Create the lock file with its whole content at once: False if it exists already.

        The content goes to a private file first, which is then hard-linked to the lock name
        (atomic, also on NFS); where hard links are not supported, an exclusive create."""
        private = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.tmp")
        private.write_text(text)
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            return self._create_exclusive(text)
        finally:
            private.unlink(missing_ok=True)

    def _create_exclusive(self, text: str) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
        return True

    def _remove_stale(self, holder: dict) -> bool:
        """Move the stale lock aside and delete it, unless another job took it over meanwhile."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != holder:  # a live lock taken meanwhile: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _release_on_sigterm(self) -> None:
        """SIGTERM before or after the train loop (which saves and stops on it) ends the process as
        before, releasing the lock first."""
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def release_and_terminate(signum, frame):
            self.release()
            os.kill(os.getpid(), signal.SIGTERM)

        self._previous_sigterm = signal.signal(signal.SIGTERM, release_and_terminate)
