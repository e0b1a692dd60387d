"""`p3d train -m`: which jobs a sweep runs, where, and the table it prints."""

from __future__ import annotations

import pytest

from p3d.errors import ConfigError
from p3d import cli
from p3d.sweep import JobResult, format_table, split_sweep, sweep_directory, swept_overrides


def test_a_sweep_is_the_product_of_its_values_the_last_varying_fastest():
    jobs, launcher = split_sweep(["optim.lr=1e-3,3e-4", "model=tiny_opt", "parallel=tp2dp2cp2,dp8"])
    assert jobs == [
        ["optim.lr=0.001", "model=tiny_opt", "parallel=tp2dp2cp2"],
        ["optim.lr=0.001", "model=tiny_opt", "parallel=dp8"],
        ["optim.lr=0.0003", "model=tiny_opt", "parallel=tp2dp2cp2"],
        ["optim.lr=0.0003", "model=tiny_opt", "parallel=dp8"],
    ]
    assert launcher == []
    assert swept_overrides(jobs)[1] == ["optim.lr=0.001", "parallel=dp8"]


def test_range_choice_glob_and_the_slurm_launcher():
    jobs, launcher = split_sweep(["train.steps=range(1,4)", "model=glob(tiny_*)", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2"])
    assert len(jobs) == 6 and jobs[0] == ["train.steps=1", "model=tiny_llama"] and jobs[-1] == ["train.steps=3", "model=tiny_opt"]
    assert launcher == ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2"]
    assert split_sweep(["+logging=choice(default,tensorboard)"])[0] == [["+logging=default"], ["+logging=tensorboard"]]
    assert split_sweep(["optim.lr=1e-3"])[0] == [["optim.lr=1e-3"]]  # one job: still a sweep of one


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=interval(0,1)"], "optim.lr=interval(0,1): interval() needs a sampling sweeper"),
        (["run.dir=a,b"], "run.dir=a,b: a sweep puts each job in <run.dir>/<job number>; give one run.dir"),
        (["model=glob(gpt5*)"], "model=glob(gpt5*): matches no preset of group 'model'"),
        (["hydra.sweep.dir=x"], "hydra.sweep.dir=x: p3d does not apply this Hydra setting; set run.dir"),
        (["--cfg"], "--cfg: not a key=value override"),
    ],
)
def test_what_a_sweep_refuses_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        split_sweep(overrides)
    (line,) = error.value.problems
    assert line.startswith(message), line


def test_a_launcher_other_than_slurm_is_refused_before_the_sweep_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "-m", "hydra/launcher=basic", "optim.lr=1e-3,3e-4", f"run.root={tmp_path}"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and not (tmp_path / "multirun").exists()
    assert err == "p3d: error: hydra/launcher=basic: p3d sweeps run in turn here, or on Slurm with hydra/launcher=submitit_slurm (and hydra.launcher.* settings)\n"


def test_the_sweep_directory_is_run_dir_or_a_new_dated_one_under_run_root(tmp_path):
    assert sweep_directory([f"run.dir={tmp_path}/mine"], []) == tmp_path / "mine"
    first = sweep_directory([f"run.root={tmp_path}"], [])
    assert first.parent == tmp_path / "multirun"
    first.mkdir(parents=True)
    assert sweep_directory([f"run.root={tmp_path}"], []) != first  # never a directory that exists


def test_the_table_gives_losses_throughput_memory_and_why_a_job_failed():
    done = JobResult(0, ["optim.lr=0.001"], [], "runs/x/0", "ok", 0, None, 4.56789, None, 1234.5, 0.59)
    failed = JobResult(1, ["optim.lr=10.0"], [], "runs/x/1", "failed", 3, "step 2: loss nan is not finite")
    never = JobResult(2, ["optim.lr=20.0"], [], "runs/x/2")
    lines = format_table([done, failed, never]).splitlines()
    assert lines[0].split() == ["#", "overrides", "final", "loss", "val", "loss", "tokens/s", "peak", "mem/rank", "status"]
    assert lines[1].split() == ["0", "optim.lr=0.001", "4.5679", "n/a", "1,234", "0.59", "GB", "ok"]
    assert lines[2].endswith("failed (exit 3): step 2: loss nan is not finite") and lines[2].split()[2:5] == ["n/a"] * 3
    assert lines[3].endswith("not run")
