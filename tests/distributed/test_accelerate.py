"""`accelerate launch` as a launcher: the README's CPU flags start N ranks that train as torchrun's do."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import FAST, assert_ok, run_command

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install '.[accelerate]'; the test extra has it)")

# The README's flags for N processes on CPU: --multi_gpu picks accelerate's torchrun launcher (without
# it, one plain process starts); the other three only silence accelerate's "defaults used" warning.
CPU_FLAGS = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
TRAIN = ["model=tiny_llama", "parallel.dp=2", *FAST, "train.steps=3"]


def accelerate_launch(options: list[str], overrides: list[str], tmp_path):
    """`accelerate launch OPTIONS -m p3d.train OVERRIDES`, blind to any `accelerate config` of this machine."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--main_process_port", "0", "-m", "p3d.train", *overrides]
    return run_command(command, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf_home")})


@pytest.mark.slow
def test_accelerate_launch_trains_two_ranks_like_forkrun(tmp_path, p3d_runner):
    run_dir = tmp_path / "accelerate"
    done = accelerate_launch([*CPU_FLAGS, "--num_processes", "2"], [*TRAIN, f"run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("p3d: tiny_llama (llama) on dp=2 cp=1 tp=1 (world 2)") == 1  # rank 0 speaks, as under torchrun
    assert len(json.loads((run_dir / "summary.json").read_text())["peak_mem_gb_per_rank"]) == 2
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    forked = p3d_runner(TRAIN, nproc=2)
    assert_ok(forked)
    assert len(losses) == 3
    assert losses == pytest.approx(forked.losses, abs=1e-4)


@pytest.mark.slow
def test_accelerate_without_multi_gpu_and_with_its_own_settings_is_told_what_to_change(tmp_path):
    """One plain process (no --multi_gpu) with accelerate's mixed precision: p3d names both fixes and fails."""
    done = accelerate_launch(["--num_processes", "2", "--mixed_precision", "bf16", "--quiet"], TRAIN, tmp_path)
    assert done.returncode != 0
    assert "launch 2 processes (e.g. accelerate launch --multi_gpu --num_processes=2" in done.stderr
    assert "accelerate launch --mixed_precision bf16: p3d does not use accelerate's settings" in done.stderr
    assert "use train.dtype=bf16" in done.stderr
    assert "Traceback" not in done.stderr  # --quiet: accelerate adds none; p3d never does
