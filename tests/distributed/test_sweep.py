"""`p3d train -m`: a sweep runs every job (here in turn, or as Slurm jobs through submitit with
stand-ins for sbatch, srun and sacct), a failing job does not stop it, and the table says why."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, run_command

TWO_STEPS = [*FAST, "train.steps=2"]


def table_rows(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#\s+overrides\s+final loss\s+val loss\s+tokens/s\s+peak mem/rank\s+status", line))
    return lines[start + 1 :]


@pytest.mark.slow
def test_a_2x2_sweep_runs_4_jobs_and_reports_the_failing_ones(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "p3d.cli", "train", "-m", "train.seed=0,1", "parallel=default,tp3", *TWO_STEPS, f"run.dir={sweep_dir}"]
    done = run_command(command, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # the sweep went on after the first failure
    rows = table_rows(done.stdout)
    assert [row.split()[:3] for row in rows] == [["0", "train.seed=0", "parallel=default"], ["1", "train.seed=0", "parallel=tp3"],
                                                ["2", "train.seed=1", "parallel=default"], ["3", "train.seed=1", "parallel=tp3"]]
    for ok in (rows[0], rows[2]):
        assert ok.endswith("  ok") and re.search(r"\d\.\d{4}\s+n/a\s+[\d,]+\s+\d\.\d\d GB", ok), ok
    for failed in (rows[1], rows[3]):
        assert failed.endswith("failed (exit 2): parallel.tp=3 does not divide model.config.num_attention_heads=8: choose a tp that divides it")
    assert "p3d: 2 of 4 jobs did not succeed" in done.stderr
    results = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["status"] for r in results] == ["ok", "failed", "ok", "failed"]
    assert [r["run_dir"] for r in results] == [str(sweep_dir / str(n)) for n in range(4)]
    for number in (0, 2):  # each job its own run directory, with its own config
        saved = json.loads((sweep_dir / str(number) / "summary.json").read_text())
        assert saved["step"] == 2 and results[number]["final_loss"] == saved["loss"]
    assert (sweep_dir / "0" / "config.yaml").read_text() != (sweep_dir / "2" / "config.yaml").read_text()


# --- Slurm through submitit, with stand-in commands -----------------------------------------------

SBATCH = r"""#!/bin/bash
# sbatch stand-in: start the job script at once, in the background, on "nodes" that are all this machine
script="${@: -1}"
id=$((1000 + $(ls "$FAKE_SLURM" | grep -c '\.state$')))
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script"); nodes=${nodes:-1}
cp "$script" "$FAKE_SLURM/$id.sbatch"
echo RUNNING > "$FAKE_SLURM/$id.state"
hosts=$(for _ in $(seq "$nodes"); do printf '127.0.0.1,'; done); hosts=${hosts%,}
(
  export SLURM_JOB_ID=$id SLURM_JOB_NUM_NODES=$nodes SLURM_NNODES=$nodes SLURM_JOB_NODELIST=$hosts
  if bash "$script"; then echo COMPLETED > "$FAKE_SLURM/$id.state"; else echo FAILED > "$FAKE_SLURM/$id.state"; fi
) </dev/null >"$FAKE_SLURM/$id.log" 2>&1 &
echo "Submitted batch job $id"
"""

SRUN = r"""#!/bin/bash
# srun stand-in: one task per node, all here; --output/--error patterns as Slurm's (%j job, %t task)
out= err=
while [[ "$1" == -* ]]; do
  case "$1" in
    --output) out=$2; shift 2;;
    --error) err=$2; shift 2;;
    *) shift;;
  esac
done
printf '%s\n' "$@" > "$FAKE_SLURM/$SLURM_JOB_ID.srun"
pids=()
for ((task = 0; task < SLURM_JOB_NUM_NODES; task++)); do
  o=${out//%j/$SLURM_JOB_ID}; o=${o//%t/$task}; e=${err//%j/$SLURM_JOB_ID}; e=${e//%t/$task}
  # A real job starts after sbatch has returned and submitit has made the job's folder; this
  # stand-in starts at once, so it waits for that folder (under load submitit can be slower).
  for ((i = 0; i < 1200; i++)); do [ -d "$(dirname "$o")" ] && break; sleep 0.1; done
  SLURM_PROCID=$task SLURM_NODEID=$task SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_JOB_NUM_NODES "$@" >>"$o" 2>>"${e:-$o}" &
  pids+=($!)
done
rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done; exit $rc
"""

SACCT = r"""#!/bin/bash
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
  if [ "$1" = -j ]; then echo "$2|$(cat "$FAKE_SLURM/$2.state" 2>/dev/null || echo PENDING)|127.0.0.1"; shift; fi
  shift
done
"""


def fake_slurm(tmp_path: Path) -> dict:
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("scancel", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(state)}


@pytest.mark.slow
def test_slurm_launcher_runs_each_job_as_a_two_node_slurm_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = fake_slurm(tmp_path)
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "p3d.cli", "train", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
        "hydra.launcher.timeout_min=30", "hydra.launcher.partition=cpu", "parallel=dp2,tp3", *TWO_STEPS, f"run.dir={sweep_dir}",
    ]
    done = run_command(command, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "p3d: job 1/2: parallel=dp2 -> Slurm job 1000" in done.stdout and "p3d: job 2/2: parallel=tp3 -> Slurm job 1001" in done.stdout
    rows = table_rows(done.stdout)
    assert rows[0].startswith("0  parallel=dp2") and rows[0].endswith("  ok"), rows
    assert rows[1].endswith("failed (exit 2): parallel.tp=3 does not divide model.config.num_attention_heads=8: choose a tp that divides it"), rows
    state = Path(env["FAKE_SLURM"])
    directives = [line for line in (state / "1000.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=30", "#SBATCH --partition=cpu"):
        assert expected in directives, directives
    # Both nodes ran p3d train, meeting at a rendezvous on the first node: one job of 2 ranks.
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["step"] == 2 and len(summary["peak_mem_gb_per_rank"]) == 2
    logs = "".join(path.read_text() for path in sweep_dir.glob(".submitit/1000/*_log.out"))
    assert logs.count("p3d: starting 1 process per node") == 2 and "dp=2 cp=1 tp=1 (world 2)" in logs


@pytest.mark.slow
def test_tune_runs_the_layouts_that_fit_and_ends_with_the_command_for_the_fastest(tmp_path):
    """Two layouts of 2 ranks, one round (the order of several rounds and their median: tests/unit/test_tune.py)."""
    fixed = ["parallel.tp=1", "train.activation_checkpointing=none"]
    command = [sys.executable, "-m", "p3d.cli", "tune", *FAST, *fixed, "--world-size", "2", "--steps", "3", "--rounds", "1"]
    done = run_command(command, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "p3d: tune: 2 candidates for 2 ranks (train.activation_checkpointing as given)" in done.stdout
    assert "p3d: tune: running 2 layouts for 3 steps, 1 round, in " in done.stdout
    assert re.findall(r"p3d: job \d/2: parallel=(\w+) \S+ \(round 1\)", done.stdout) == ["dp2", "dp1cp2"]
    assert done.stdout.count("p3d: starting 2 processes per node") == 2  # each a whole p3d train
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank  layout"))
    ranked = [line.split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in ranked] == ["1", "2"] and {row[1] for row in ranked} == {"dp2", "dp1cp2"}
    rates = [float(row[3].replace(",", "")) for row in ranked]
    assert rates[0] >= rates[1] > 0 and all(row[-1] == "ok" for row in ranked)
    best = ranked[0][1]
    assert lines[-1] == f"    p3d train {' '.join(FAST)} parallel={best} train.activation_checkpointing=none"
    (tune_dir,) = (tmp_path / "runs" / "tune").iterdir()
    report = json.loads((tune_dir / "tune.json").read_text())
    assert [entry["layout"] for entry in report] == [row[1] for row in ranked]
    for entry in report:  # the reported rate is the median of the run's own per-step records after its first
        (run_dir,) = entry["run_dirs"]
        assert tmp_path / run_dir == tune_dir / f"{entry['layout']}-none" / "round1"  # under run.root, relative to the cwd
        records = [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert entry["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in records[1:])
