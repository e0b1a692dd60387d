"""run.dir's lock: one job per run directory; stale locks taken over, live ones refused (one process;
tests/distributed/test_checkpoint.py runs real jobs against each other)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from p3d.cli import with_run_dir
from p3d.config.compose import compose
from p3d.errors import ConfigError
from p3d.rundir import LOCK_FILE, RunLock, this_process


def write_lock(run_dir, **holder) -> None:
    (run_dir / LOCK_FILE).write_text(json.dumps({**this_process(), **holder}))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lock_records_the_holder_is_taken_once_and_released(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire(notice=pytest.fail)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == this_process()["host"] and holder["started"]
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_FILE]  # nothing left from writing it
    with pytest.raises(ConfigError, match=rf"run.dir={tmp_path} is in use by another p3d job \(pid {os.getpid()} on host .*\); wait for it"):
        RunLock(tmp_path).acquire(notice=pytest.fail)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).check()


def test_a_live_job_on_this_host_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, process_start=None)
        with pytest.raises(ConfigError, match=rf"in use by another p3d job \(pid {sleeper.pid} on host"):
            RunLock(tmp_path).check()
        with pytest.raises(ConfigError):
            RunLock(tmp_path).acquire(notice=pytest.fail)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("why", ["dead pid", "pid reused"])
def test_a_stale_lock_on_this_host_is_taken_over_with_a_notice(why, tmp_path):
    holder = {"pid": dead_pid()} if why == "dead pid" else {"pid": os.getpid(), "process_start": "1"}  # our pid, another process
    write_lock(tmp_path, **holder)
    RunLock(tmp_path).check()
    notices = []
    lock = RunLock(tmp_path)
    lock.acquire(notice=notices.append)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    (notice,) = notices
    assert notice.startswith(f"run.dir={tmp_path}: took over the lock of pid {holder['pid']} on host")
    assert notice.endswith(f"its process {holder['pid']} is no longer running")
    lock.release()


def test_a_lock_from_another_host_is_refused_unless_it_is_an_earlier_attempt_of_this_job(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node7", pid=1234, job="torchrun:myjob", attempt=[0, 0])
    with pytest.raises(ConfigError) as error:
        RunLock(tmp_path).acquire(notice=pytest.fail)
    (problem,) = error.value.problems
    assert problem.startswith(f"run.dir={tmp_path} is in use by a p3d job on another host (pid 1234 on host node7, started ")
    assert problem.endswith(f"if that job is no longer running, delete {tmp_path / LOCK_FILE} and rerun, or choose another run.dir")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "myjob")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(ConfigError):  # the same attempt: another rank 0 of this very job cannot exist
        RunLock(tmp_path).acquire(notice=pytest.fail)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the group; rank 0 moved hosts
    notices = []
    RunLock(tmp_path).acquire(notice=notices.append)
    assert notices[0].endswith("it was left by an earlier attempt of this job")


def test_sigterm_outside_the_train_loop_releases_the_lock(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from p3d.rundir import RunLock\n"
        "RunLock(Path(sys.argv[1])).acquire(notice=print); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (tmp_path / LOCK_FILE).exists()
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=30) == -signal.SIGTERM  # terminated as before, by the signal
        assert not (tmp_path / LOCK_FILE).exists()
    finally:
        holder.kill()


@pytest.mark.parametrize("run_dir", ["runs/plain", "runs/a b=c,d", "runs/it's", "runs/lit${now:%H}", "runs/back\\slash", "runs/end\\"])
def test_p3d_train_hands_its_resolved_run_dir_to_the_workers_verbatim(run_dir):
    overrides = with_run_dir(["train.steps=1", "run.dir=runs/x_${now:%H%M%S_%f}"], run_dir)
    assert overrides[0] == "train.steps=1" and len(overrides) == 2
    assert compose(overrides).run.dir == run_dir


def test_run_dir_is_resolved_once_to_a_plain_string():
    from omegaconf import OmegaConf

    calls = iter(range(1000))
    OmegaConf.register_new_resolver("p3d_test_counter", lambda: next(calls), use_cache=False, replace=True)
    cfg = compose(["run.dir=runs/x_${p3d_test_counter:}"])
    assert cfg.run.dir == cfg.run.dir == "runs/x_0" and not OmegaConf.is_interpolation(cfg.run, "dir")


def test_a_lock_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "file" / "run"  # below a file: nothing can be written there, not even by root
    with pytest.raises(ConfigError, match=rf"run.dir={run_dir}: cannot write its lock file there \(Not a directory\); choose a writable run.dir"):
        RunLock(run_dir).acquire(notice=pytest.fail)
