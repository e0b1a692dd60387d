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
