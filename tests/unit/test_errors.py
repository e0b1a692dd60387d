"""Errors by kind: a config problem exits 2, a failure at run time exits 3; both one line, no traceback."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch.distributed as dist

from p3d import cli
from p3d.errors import ConfigError, RunError, exits_cleanly


@pytest.fixture
def one_process_group():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("error, code", [(ConfigError("train.steps=0: must be >= 1"), 2), (RunError("step 3: loss nan is not finite"), 3)])
def test_each_kind_exits_with_its_own_code_and_one_line(error, code, capsys, monkeypatch):
    monkeypatch.delenv("P3D_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @exits_cleanly
    def fails():
        raise error

    with pytest.raises(SystemExit) as exited:
        fails()
    assert exited.value.code == code
    assert capsys.readouterr().err == f"p3d: error: {error.problems[0]}\n"


def test_a_run_error_is_not_a_config_error():
    assert not issubclass(RunError, ConfigError) and not issubclass(ConfigError, RunError)


def test_a_failed_background_save_is_a_run_error_naming_run_dir(tmp_path, one_process_group, monkeypatch):
    from torch import nn

    from p3d.checkpoint import Checkpointer, ModelAndOptimizer, TrainState
    from p3d.config.schema import AsyncMode, CheckpointConfig
    from p3d.distributed.mesh import ParallelDims

    def failing_async_save(*args, **kwargs):
        future = Future()
        future.set_exception(OSError(28, "No space left on device"))
        return future

    monkeypatch.setattr("torch.distributed.checkpoint.async_save", failing_async_save)
    model = nn.Linear(4, 4)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_mode=AsyncMode.thread), True, ParallelDims(1, 1, 1), "a: 1\n", "{}", info=lambda _: None)
    checkpointer.save(2, {"app": ModelAndOptimizer(model, __import__("torch").optim.AdamW(model.parameters())), "train": TrainState(step=2)})
    with pytest.raises(RunError, match=rf"run.dir={tmp_path}: writing checkpoint step_00000002 failed on rank 0 \(OSError: .*No space left"):
        checkpointer.wait()


def test_ranks_that_see_different_checkpoints_are_a_run_error(tmp_path, monkeypatch):
    from p3d import train
    from p3d.config.schema import P3DConfig, RunConfig

    views = [(["step_00000020"], None), (["step_00000010"], None)]  # rank 1 sees another directory
    monkeypatch.setattr(train, "on_every_rank", lambda step, what: views)
    config = P3DConfig(run=RunConfig(dir=str(tmp_path)))
    with pytest.raises(RunError, match="ranks see different checkpoints .* must be on a filesystem that every node shares"):
        train.plan_resume_on_every_rank(config, setup=None)


def process_failure(exitcode: int, timestamp: int):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="/nonexistent/error.json")
    failure.timestamp = timestamp
    return failure


@pytest.mark.parametrize(
    "failures, code, line",
    [
        # rank 1 failed with a run error; torchrun then stopped rank 0 (SIGTERM): 3 passes through, rank 1 printed its line
        ({0: (-15, 101), 1: (3, 100)}, 3, None),
        ({0: (2, 100), 1: (-15, 101)}, 2, None),
        # killed (out of memory): no p3d line was printed, so the launcher says which rank and how
        ({0: (-15, 101), 1: (-9, 100)}, 1, "p3d: error: training failed: rank 1 exited with code -9 (its message is above)"),
        ({0: (17, 100)}, 17, "p3d: error: training failed: rank 0 exited with code 17 (its message is above)"),
    ],
)
def test_p3d_train_passes_the_first_failed_workers_code_through(failures, code, line, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    def failed_run(args):
        raise ChildFailedError("p3d.train", {rank: process_failure(*failure) for rank, failure in failures.items()})

    monkeypatch.setattr("torch.distributed.run.run", failed_run)
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(SystemExit) as exited:
        cli._launch(["--nproc-per-node", "2"], ["train.steps=1"], 2)
    assert exited.value.code == code
    assert capsys.readouterr().err.strip() == (line or "")
