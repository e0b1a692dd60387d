"""benchmarks/gpu.sh (the GPU check) keeps working where no GPU is: its CPU dry run goes through the whole
script path (one variant: p3d under torchrun with the worker that records the device binding and backend, the
hand-written loop, MFU, the cp_impl=torch check, the report) on a tiny shape (two short runs: about 20 s of CPU time, mostly imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import _env

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_measures_both_loops_and_writes_its_report(tmp_path):
    command = ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--models=tiny_llama", "--variants=eager+ac", f"--out={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**_env(), "PYTHON": sys.executable}, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert [row["variant"] for row in result["rows"]] == ["eager+ac"]
    for row in result["rows"]:
        assert row["p3d"]["tokens_per_s"] > 0 and row["hand"]["tokens_per_s"] > 0 and row["ratio"] > 0
        assert len(row["p3d"]["losses"]) == len(row["hand"]["losses"]) == 3
        assert (row["p3d"]["trainer_device"], row["p3d"]["parameter_device"], row["p3d"]["backend"]) == ("cpu", "cpu", "gloo")
    assert result["cuda_path"]["torch_cp"] == {"ran": False, "outcome": "not run: no CUDA device (parallel.cp_impl=torch is CUDA only)"}
    report = (tmp_path / "gpu_dry_run.md").read_text()
    assert report.startswith("# GPU check (CPU dry run") and "| tiny_llama | eager+ac | hand-written |" in report
    assert not (tmp_path / "gpu.md").exists()  # a dry run never stands in for GPU results
