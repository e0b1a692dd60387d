"""`p3d train` as a launcher: the process count it derives is the one it starts."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import FAST, run_command


@pytest.mark.slow
def test_p3d_train_with_tp2_starts_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    done = run_command([sys.executable, "-m", "p3d.cli", "train", "parallel.tp=2", *FAST, "train.steps=2", f"run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "p3d: starting 2 processes per node: parallel.dp=-1 on CPU takes tp2 x cp1" in done.stdout
    assert "dp=1 cp=1 tp=2 (world 2)" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["peak_mem_gb_per_rank"]) == 2


@pytest.mark.slow
def test_config_dir_model_preset_and_recipe_train_under_p3d_train(tmp_path):
    """--config-dir reaches torchrun's workers: the user's recipe picks the user's model and tp2 (2 processes)."""
    from omegaconf import OmegaConf

    from tests.unit.test_config import user_config_dir

    mine = user_config_dir(tmp_path / "mine")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "p3d.cli", "train", "--config-dir", str(mine), "+recipe=user_run", *FAST, "train.steps=2", f"run.dir={run_dir}"]
    done = run_command(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "user_llama (llama) on dp=1 cp=1 tp=2 (world 2)" in done.stdout
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.model.name == "user_llama" and saved.model.config.num_hidden_layers == 3
    assert len(json.loads((run_dir / "summary.json").read_text())["peak_mem_gb_per_rank"]) == 2


@pytest.mark.slow
def test_cfg_job_under_torchrun_prints_once(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "p3d.train", "--cfg", "job", "train.steps=3"]
    done = run_command(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\ntrain:\n") == 1 and "  steps: 3\n" in done.stdout
    assert not (tmp_path / "runs").exists()  # printed and exited: no run started
