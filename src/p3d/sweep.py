"""`p3d train -m ...`: a sweep, one job per combination of the swept values (Hydra's override syntax:
`a,b`, `range(1,4)`, `choice(a,b)`, `glob(tiny_*)` over a group's presets).

Each job is a whole `p3d train` (its own validation, process count and torchrun) in its own run
directory, `<sweep dir>/<job number>`; the sweep directory is `run.dir` when given (rerunning the
sweep then resumes every job), else `<run.root>/multirun/<date>_<time>`. Jobs run in turn; a
failing job does not stop the sweep. At the end a table gives each job's swept overrides, final
loss, validation loss (n/a: p3d has no validation pass), tokens/s, peak memory per rank and status
(a failed job's error line), and `<sweep dir>/sweep.json` the same.

With `hydra/launcher=submitit_slurm` (hydra-submitit-launcher: `pip install 'p3d[slurm]'`) and its
settings (`hydra.launcher.nodes=2 hydra.launcher.partition=...`), every job is a Slurm job submitted
through submitit; on each of its nodes it runs `p3d train`, the nodes meeting at a c10d rendezvous on
the first; the sweep waits for them and prints the same table.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from p3d.config.compose import checked_config_dirs, checked_overrides, compose, compose_hydra_node, describe_compose_error, group_presets
from p3d.errors import ConfigError

LAUNCHER_KEYS = ("hydra/launcher", "hydra.launcher")
SLURM_LAUNCHER = "submitit_slurm"


@dataclass
class JobResult:
    number: int
    swept: list[str]  # the overrides that differ between jobs
    overrides: list[str]  # all of the job's overrides
    run_dir: str
    status: str = "not run"  # ok, failed, interrupted, not run
    exit_code: int | None = None
    error: str | None = None  # the job's first `p3d: error:` line, or why it did not finish
    final_loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    peak_mem_gb: float | None = None  # the highest of any rank
    slurm_job_id: str | None = None

    def read_summary(self) -> None:
        """Final loss, throughput and peak memory from the run's summary.json (written by a finished run)."""
        path = Path(self.run_dir) / "summary.json"
        if not path.exists():
            return
        summary = json.loads(path.read_text())
        self.final_loss = summary.get("loss")
        self.val_loss = summary.get("val_loss")
        self.tokens_per_s = summary.get("tokens_per_s")
        peaks = summary.get("peak_mem_gb_per_rank") or []
        self.peak_mem_gb = max(peaks) if peaks else None


# --- the jobs of a sweep --------------------------------------------------------------------------


def split_sweep(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> tuple[list[list[str]], list[str]]:
    """The jobs (each one list of overrides, in Hydra's order: the last swept key varies fastest) and
    the Slurm launcher's overrides, taken apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    launcher = [o for o in overrides if o.lstrip("+~").startswith(LAUNCHER_KEYS)]
    rest = [o for o in overrides if o not in launcher]
    checked_overrides(rest)  # flags and Hydra settings p3d does not apply: refused before any job
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
    except HydraException as error:
        raise ConfigError(describe_compose_error(error)) from error
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif override.is_interval_sweep():
            raise ConfigError(f"{override.input_line}: interval() needs a sampling sweeper; p3d sweeps a,b, range() and choice()")
        elif key.lstrip("+~") == "run.dir":
            raise ConfigError(f"{override.input_line}: a sweep puts each job in <run.dir>/<job number>; give one run.dir")
        elif override.value_type is ValueType.GLOB_CHOICE_SWEEP:
            names = override.value().filter(list(group_presets(key.lstrip("+~"), config_dirs)))
            if not names:
                raise ConfigError(f"{override.input_line}: matches no preset of group '{key.lstrip('+~')}'")
            choices.append([f"{key}={name}" for name in names])
        else:
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(job) for job in itertools.product(*choices)], launcher


def swept_overrides(jobs: list[list[str]]) -> list[list[str]]:
    """Each job's overrides that are not the same in every job."""
    common = set(jobs[0]).intersection(*jobs[1:])
    return [[o for o in job if o not in common] for job in jobs]


def sweep_directory(common: list[str], config_dirs: Sequence[str], kind: str = "multirun") -> Path:
    """run.dir when given, else a new <run.root>/<kind>/<date>_<time>."""
    from p3d.config.compose import to_object

    config = to_object(compose(common, config_dirs))
    if any(o.lstrip("+~").split("=", 1)[0] == "run.dir" for o in common):
        return Path(config.run.dir)
    base = Path(config.run.root) / kind / time.strftime("%Y-%m-%d_%H-%M-%S")
    candidate, suffix = base, 1
    while candidate.exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}_{suffix}")
    return candidate


def run_sweep(launcher_args: list[str], overrides: list[str], config_dirs: Sequence[str] = ()) -> int:
    """Run every job of the sweep (here in turn, or on Slurm), print the table; 0 when every job succeeded."""
    config_dirs = [str(d) for d in checked_config_dirs(config_dirs)]
    jobs, launcher_overrides = split_sweep(overrides, config_dirs)
    common = [o for o in jobs[0] if all(o in job for job in jobs)]
    sweep_dir = sweep_directory(common, config_dirs)
    results = [
        JobResult(number, swept, job, str(sweep_dir / str(number)))
        for number, (job, swept) in enumerate(zip(jobs, swept_overrides(jobs)))
    ]
    slurm = SlurmSweep(launcher_overrides, common, config_dirs, sweep_dir) if launcher_overrides else None  # refused before anything is said
    print(f"p3d: sweep of {len(jobs)} job{'s' if len(jobs) != 1 else ''} in {sweep_dir}" + (f" (every job: {' '.join(common)})" if common else ""), flush=True)
    if slurm is not None:
        slurm.run(results, launcher_args)
    else:
        run_in_turn(results, launcher_args, config_dirs, sweep_dir)
    print(format_table(results), flush=True)
    failed = [result for result in results if result.status != "ok"]
    if failed:
        print(f"p3d: {len(failed)} of {len(results)} jobs did not succeed (see the status column)", file=sys.stderr, flush=True)
    return 0 if not failed else 1


def write_results(sweep_dir: Path, results: list[JobResult]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps([asdict(result) for result in results], indent=1) + "\n")


# --- here, in turn ------------------------------------------------------------------------------


def job_command(launcher_args: list[str], config_dirs: Sequence[str], overrides: list[str], run_dir: str) -> list[str]:
    """The `p3d train` command of one job (its run.dir set, quoted for Hydra)."""
    from p3d.cli import with_run_dir

    config_dir_args = [arg for directory in config_dirs for arg in ("--config-dir", directory)]
    return [sys.executable, "-m", "p3d.cli", "train", *launcher_args, *config_dir_args, *with_run_dir(overrides, run_dir)]


def run_in_turn(results: list[JobResult], launcher_args: list[str], config_dirs: Sequence[str], sweep_dir: Path) -> None:
    stop: list[int] = []
    for result in results:
        if stop:
            break
        print(f"p3d: job {result.number + 1}/{len(results)}: {' '.join(result.swept) or '(no swept values)'} -> {result.run_dir}", flush=True)
        result.exit_code, result.error = run_and_watch(job_command(launcher_args, config_dirs, result.overrides, result.run_dir), stop)
        finish(result, interrupted=bool(stop))
        write_results(sweep_dir, results)


def finish(result: JobResult, interrupted: bool = False) -> None:
    if result.exit_code == 0:
        result.status = "ok"
        result.read_summary()
    else:
        result.status = "interrupted" if interrupted else "failed"
        result.error = result.error or f"exited with code {result.exit_code}"


def run_and_watch(command: list[str], stop: list[int]) -> tuple[int, str | None]:
    """Run one job with its output passed through; returns its exit code and its first `p3d: error:` line.
    SIGINT and SIGTERM reach the job (which saves a checkpoint and stops) and end the sweep after it."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)

    def forward(signum, frame):
        stop.append(signum)
        if signum != signal.SIGINT:  # SIGINT from a terminal reaches the job's process group by itself
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    error = None
    try:
        for line in process.stderr:
            sys.stderr.write(line)
            if error is None and line.startswith("p3d: error: "):
                error = line[len("p3d: error: ") :].strip()
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, error


# --- on Slurm ------------------------------------------------------------------------------------


class SlurmSweep:
    """Each job a Slurm job through submitit, with hydra-submitit-launcher's settings (`hydra.launcher.*`)."""

    def __init__(self, launcher_overrides: list[str], common: list[str], config_dirs: Sequence[str], sweep_dir: Path):
        import importlib.util

        chosen = [o.split("=", 1)[1] for o in launcher_overrides if o.lstrip("+~").split("=", 1)[0] == "hydra/launcher"]
        if chosen != [SLURM_LAUNCHER]:
            given = f"hydra/launcher={chosen[-1]}" if chosen else launcher_overrides[0]
            raise ConfigError(f"{given}: p3d sweeps run in turn here, or on Slurm with hydra/launcher={SLURM_LAUNCHER} (and hydra.launcher.* settings)")
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            raise ConfigError(f"hydra/launcher={SLURM_LAUNCHER}: needs hydra-submitit-launcher; pip install 'p3d[slurm]'")
        hydra_node = compose_hydra_node([*common, *launcher_overrides], config_dirs, honoured_hydra=LAUNCHER_KEYS)
        hydra_node.sweep.dir = str(sweep_dir)  # hydra.launcher.submitit_folder defaults to ${hydra.sweep.dir}/.submitit/%j
        from omegaconf import OmegaConf

        self.params = OmegaConf.to_container(hydra_node.launcher, resolve=True)
        if self.params["tasks_per_node"] != 1:
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={self.params['tasks_per_node']}: p3d runs one launcher per node, which starts "
                "its ranks; keep it 1 and set hydra.launcher.gpus_per_node"
            )
        self.config_dirs = list(config_dirs)
        self.sweep_dir = sweep_dir

    def executor(self):
        """submitit's executor, configured as hydra-submitit-launcher configures it."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = {k: v for k, v in self.params.items() if k != "_target_"}
        executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in params.items()})
        return executor

    def run(self, results: list[JobResult], launcher_args: list[str]) -> None:
        executor = self.executor()
        nproc = ["--nproc-per-node", str(self.params["gpus_per_node"])] if self.params.get("gpus_per_node") and "--nproc-per-node" not in launcher_args else []
        submitted = []
        for result in results:
            task = SlurmTrainJob(job_command([*launcher_args, *nproc], self.config_dirs, result.overrides, result.run_dir)[3:], self.params["nodes"])
            job = executor.submit(task)
            result.slurm_job_id = str(job.job_id)
            print(f"p3d: job {result.number + 1}/{len(results)}: {' '.join(result.swept) or '(no swept values)'} -> Slurm job {job.job_id}, {result.run_dir}", flush=True)
            submitted.append(job)
        write_results(self.sweep_dir, results)
        for result, job in zip(results, submitted):
            try:
                outcomes = job.results()  # one per node: the first that failed, else the first node's
                result.exit_code, result.error = next((outcome for outcome in outcomes if outcome[0] != 0), outcomes[0])
            except Exception as error:  # submitit: the Slurm job failed, was cancelled or timed out
                result.exit_code = -1
                result.error = f"Slurm job {job.job_id} {job.state}: {str(error).strip().splitlines()[0]}"
            finish(result)
            write_results(self.sweep_dir, results)


@dataclass
class SlurmTrainJob:
    """Runs on every node of a Slurm job (through submitit): `p3d train` with a c10d rendezvous on the
    job's first node. On a timeout or preemption submitit requeues it, and the run resumes."""

    train_args: list[str]  # after `python -m p3d.cli`: train [launcher options] [overrides]
    nodes: int

    def __call__(self) -> tuple[int, str | None]:
        import submitit

        env = submitit.JobEnvironment()
        command = [sys.executable, "-m", "p3d.cli", *self.train_args[:1], *self.rendezvous(env.hostnames[0], str(env.job_id)), *self.train_args[1:]]
        return run_and_watch(command, [])

    def rendezvous(self, head: str, job_id: str) -> list[str]:
        """torchrun's multi-node options (none for one node). The port depends on the job id, so
        jobs that share a first node do not meet each other."""
        if self.nodes == 1:
            return []
        port = 20000 + int("".join(filter(str.isdigit, job_id)) or 0) % 20000
        return ["--nnodes", str(self.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:{port}", "--rdzv-id", f"p3d-{job_id}"]

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# --- the table -----------------------------------------------------------------------------------


def format_table(results: list[JobResult]) -> str:
    def number(value: float | None, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    header = ["#", "overrides", "final loss", "val loss", "tokens/s", "peak mem/rank", "status"]
    rows = [
        [
            str(r.number),
            " ".join(r.swept) or "-",
            number(r.final_loss, ".4f"),
            number(r.val_loss, ".4f"),
            number(r.tokens_per_s, ",.0f"),
            "n/a" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.2f} GB",
            r.status if r.status in ("ok", "not run") else f"{r.status} (exit {r.exit_code}): {r.error}",
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in [header, *rows]]
    return "\n".join(lines)
