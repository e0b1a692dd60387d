"""examples/slurm/p3d.sbatch, run with stand-ins for srun and scontrol, launches a valid multi-node job."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from p3d.cli import split_launcher_args
from p3d.config.compose import compose, to_object
from p3d.config.validate import validate

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "p3d.sbatch"


def fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "srun_args"}\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def test_sbatch_script_starts_one_rendezvousing_launcher_per_node(tmp_path):
    bin_dir = fake_slurm(tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="opt", SLURM_GPUS_ON_NODE="4")
    done = subprocess.run(["bash", str(SCRIPT), "parallel=tp2dp2cp2", "model=tiny_llama"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[:3] == ["--kill-on-bad-exit=1", "p3d", "train"], shlex.join(args)

    launcher, overrides = split_launcher_args(args[3:])
    from torch.distributed.run import parse_args

    torchrun = parse_args([*launcher, "-m", "p3d.train"])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.rdzv_backend) == ("2", "4", "c10d")
    assert torchrun.rdzv_endpoint == "gpu07:29500" and torchrun.rdzv_id == "p3d-4242" and torchrun.max_restarts == 3
    # The run directory comes from the job name, so a requeued job (same command) resumes.
    assert overrides == ["run.dir=runs/opt", "parallel=tp2dp2cp2", "model=tiny_llama"]
    config = to_object(compose(overrides))
    assert validate(config, 2 * 4).dims.world_size == 8


def test_sbatch_script_asks_for_sigterm_before_the_time_limit_and_requeues():
    directives = [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=TERM@300" in directives and "--requeue" in directives
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
