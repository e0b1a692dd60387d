"""benchmarks/paired_steps.py times p3d's real training-loop iteration against the plain loop in the same ranks:
its p3d steps give the losses `python -m p3d.train` gives, and its plain steps those of plain_loop.py run alone."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import _env, run_p3d

REPO = Path(__file__).resolve().parents[2]


def _throughput_module():
    """benchmarks/throughput.py (not a package, and not put on sys.path, where its siblings' names would shadow others)."""
    spec = importlib.util.spec_from_file_location("p3d_benchmarks_throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _throughput_module()

SHAPE = (64, 2, 4)  # hidden, layers, steps
SIZES = SimpleNamespace(seq_len=32, global_batch=4, warmup=1)


def test_paired_steps_alternate_p3d_and_the_plain_loop_each_as_it_trains_alone(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "paired_steps.py"), "--layouts=dp2", "--shapes=64x2:4", "--repeats=1", "--pairs=defaults-plain",
               "--warmup=1", "--seq-len=32", "--global-batch=4", f"--out={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "paired_steps.json").read_text())
    (paired,) = row["runs"]
    assert (row["pair"], row["layout"]) == ("defaults-plain", "dp2") and row["ratio"] > 0 and len(paired["p3d_losses"]) == len(paired["loop_losses"]) == 4

    p3d_alone = run_p3d(tmp_path / "alone", throughput.p3d_overrides((1, 2, 1), SHAPE, SIZES, [], tmp_path / "alone"), nproc=2)
    assert p3d_alone.returncode == 0, p3d_alone.stderr[-3000:]
    assert paired["p3d_losses"] == p3d_alone.losses

    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(REPO / "benchmarks" / "plain_loop.py"), *throughput.loop_flags((1, 2, 1), SHAPE, SIZES)],
                           capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert paired["loop_losses"] == json.loads(plain.stdout.strip().splitlines()[-1])["losses"]
