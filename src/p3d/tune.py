"""`p3d tune [key=value ...] --world-size N [--steps K] [--rounds R]`: which layout trains fastest here.

1. Layouts: every split of N ranks over the layout dimensions of config/layouts.py (tp, cp; dp takes
   the rest), narrowed by any parallel.tp/cp/dp the command fixes.
2. Each is checked by the code that checks `p3d train` and `p3d plan`: validated for N ranks (tp
   must divide the heads, cp the sequence, dp the batch, ...), then `p3d plan`'s memory estimate
   must fit (on CPU all N ranks in this machine's memory, on a GPU one rank's tensors in the
   device's). Activation checkpointing only recomputes, so it is tried (full) only for a layout that
   does not fit without it, unless the command fixes train.activation_checkpointing.
3. The layouts that pass run K steps each as a sweep: each run a whole `p3d train` (checkpoints off,
   its own run directory <run.root>/tune/<date>/<layout>-<ac>/round<r>), R rounds, every other round
   in reverse order, so a change in the machine's load reaches every layout alike.
4. They are ranked by tokens/s: the median over every round's steps after the first (which pays for
   warm-up), with the measured peak memory per rank; the command to train with the best ends the report.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from p3d.config import layouts
from p3d.config.compose import checked_config_dirs, compose, to_object
from p3d.errors import ConfigError
from p3d.sweep import JobResult, run_in_turn, sweep_directory

AC_KEY = "train.activation_checkpointing"
AC_ORDER = ("none", "full")  # the first that fits is run
LAYOUT_KEYS = {f"parallel.{dim.key}" for dim in layouts.LAYOUT_DIMS}
# Set for every measured run (after the user's overrides, so they win): short, no checkpoints, no
# progress bar or logging services; the per-step records in metrics.jsonl are what is measured.
MEASURE_KEYS = ("train.steps", "checkpoint", "logging.every", "logging.progress", "logging.tensorboard", "logging.wandb")


@dataclass
class Candidate:
    sizes: dict[str, int]
    ac: str
    problem: str | None = None  # why it is not run: it does not validate, or does not fit
    fit: str | None = None  # the memory it needs against what there is
    memory_gb: float | None = None  # p3d plan's estimate, per rank
    runs: list[JobResult] = field(default_factory=list)  # one per round

    @property
    def name(self) -> str:
        return layouts.layout_name(self.sizes)

    @property
    def overrides(self) -> list[str]:
        return [f"parallel={self.name}", f"{AC_KEY}={self.ac}"]

    @property
    def succeeded(self) -> bool:
        return bool(self.runs) and all(run.status == "ok" for run in self.runs)

    @property
    def tokens_per_s(self) -> float | None:
        """Median over the steady steps of every round; None unless every round succeeded."""
        rates = [rate for run in self.runs for rate in steady_rates(run.run_dir)]
        return statistics.median(rates) if self.succeeded and rates else None

    @property
    def round_medians(self) -> list[float]:
        return [statistics.median(rates) for rates in (steady_rates(run.run_dir) for run in self.runs) if rates]

    @property
    def peak_mem_gb(self) -> float | None:
        peaks = [run.peak_mem_gb for run in self.runs if run.peak_mem_gb is not None]
        return max(peaks) if peaks else None

    @property
    def status(self) -> str:
        failed = next((run for run in self.runs if run.status != "ok"), None)
        if failed is None:
            return "ok" if self.runs else "not run"
        if failed.status == "not run":
            return "not run (the tuner was stopped)"
        return f"{failed.status} (exit {failed.exit_code}): {failed.error}"

    @property
    def stopped(self) -> bool:
        """A run of it was interrupted, or never started, because the tuner was stopped."""
        return any(run.status in ("interrupted", "not run") for run in self.runs)


# --- which layouts -------------------------------------------------------------------------------


def layout_splits(world_size: int) -> Iterator[dict[str, int]]:
    """Every assignment of sizes to the layout dimensions whose product is the world size (dp the rest)."""
    others = [dim.key for dim in layouts.LAYOUT_DIMS if dim.key != "dp"]

    def assign(remaining: int, keys: list[str]) -> Iterator[dict[str, int]]:
        if not keys:
            yield {"dp": remaining}
            return
        for size in (d for d in range(1, remaining + 1) if remaining % d == 0):
            for rest in assign(remaining // size, keys[1:]):
                yield {keys[0]: size, **rest}

    for sizes in assign(world_size, others):
        yield {dim.key: sizes[dim.key] for dim in layouts.LAYOUT_DIMS}


def fixed_by_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """The layout sizes and AC mode the command fixes (the tuner varies only the others)."""
    fixed = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "parallel":
            raise ConfigError(f"{override}: p3d tune chooses the layout; fix one dimension with parallel.tp=..., parallel.cp=... or parallel.dp=...")
        if key == "parallel.dp" and value == "-1":
            continue  # dp fills the world: what every split does
        if key in LAYOUT_KEYS | {AC_KEY}:
            fixed[key] = value
    return fixed


def layouts_to_try(overrides: Sequence[str], world_size: int) -> list[dict[str, int]]:
    fixed = fixed_by_overrides(overrides)
    found = [
        sizes
        for sizes in layout_splits(world_size)
        if all(fixed.get(f"parallel.{key}", str(size)) == str(size) for key, size in sizes.items())
    ]
    if not found:
        given = " ".join(f"{key}={value}" for key, value in fixed.items() if key in LAYOUT_KEYS)
        raise ConfigError(f"{given}: no split of --world-size {world_size} ranks over {layouts.GRAMMAR} has these sizes; fix sizes whose product divides {world_size}")
    return found


def without_keys(overrides: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The overrides that set none of `keys` (nor anything below them)."""

    def sets(override: str, key: str) -> bool:
        name = override.lstrip("+~").split("=", 1)[0]
        return name == key or name.startswith(key + ".")

    return [o for o in overrides if not any(sets(o, key) for key in keys)]


def check_node(overrides: Sequence[str], config_dirs: Sequence[str], world_size: int) -> None:
    """Every layout runs on this node: on accelerators, one process per device."""
    from p3d.distributed.env import resolve_device_type

    config = to_object(compose(without_keys(overrides, [*LAYOUT_KEYS, AC_KEY]), config_dirs))
    device = resolve_device_type(config.dist.device)
    if device == "cpu":
        return
    import torch

    count = torch.accelerator.device_count()
    if world_size > count:
        raise ConfigError(
            f"--world-size {world_size}: p3d tune runs every layout on this node, which has {count} {device} devices; "
            f"tune for at most {count} ranks (tuning across nodes is not available)"
        )


def check(candidate: Candidate, overrides: Sequence[str], config_dirs: Sequence[str], world_size: int) -> None:
    """Validate the candidate for the world size and compare p3d plan's memory estimate with this machine."""
    from p3d.config.validate import validate
    from p3d.distributed.env import resolve_device_type
    from p3d.errors import RunError
    from p3d.plan import GB, make_plan

    config = to_object(compose([*without_keys(overrides, [*LAYOUT_KEYS, AC_KEY]), *candidate.overrides], config_dirs))
    composed = {dim.key: getattr(config.parallel, dim.key) for dim in layouts.LAYOUT_DIMS}
    if composed != candidate.sizes:  # e.g. a recipe that sets parallel.* in its body, after the preset
        raise ConfigError(f"parallel={candidate.name} composes to {layouts.layout_name(composed)}: something in the command sets parallel.* itself; fix sizes with parallel.tp=... on the command line instead")
    try:
        setup = validate(config, world_size)
    except ConfigError as error:
        more = f" (and {len(error.problems) - 1} more)" if len(error.problems) > 1 else ""
        candidate.problem = f"does not validate: {error.problems[0]}{more}"
        return
    device = resolve_device_type(config.dist.device)
    try:
        plan = make_plan(config, setup, device)
    except RunError:  # a model whose step cannot run on the meta device: tried without an estimate
        candidate.fit = "memory unknown (p3d plan cannot run this model on the meta device)"
        return
    candidate.memory_gb = plan.largest.total / GB
    available = plan.device_memory_gb
    if device == "cpu":  # every rank shares this machine's memory
        needed, where = plan.job_bytes / GB, f"{world_size} ranks on this machine"
    else:
        needed, where = plan.largest.total / GB, "one rank on each device"
    if available is None:
        candidate.fit = f"{where}: about {needed:.1f} GB (this machine's memory is unknown)"
    elif needed > available:
        candidate.problem = f"does not fit: {where} need about {needed:.1f} GB by p3d plan's estimate, {available:.1f} GB here"
    else:
        candidate.fit = f"{needed:.1f} of {available:.1f} GB"


def candidates(overrides: Sequence[str], world_size: int, config_dirs: Sequence[str] = ()) -> list[Candidate]:
    """Every layout, checked; per layout the first AC mode that validates and fits (or the one the command fixes)."""
    fixed_ac = fixed_by_overrides(overrides).get(AC_KEY)
    checked = []
    for sizes in layouts_to_try(overrides, world_size):
        for ac in [fixed_ac] if fixed_ac else AC_ORDER:
            candidate = Candidate(sizes, ac)
            check(candidate, overrides, config_dirs, world_size)
            checked.append(candidate)
            if candidate.problem is None or candidate.problem.startswith("does not validate"):
                break  # it runs, or no AC mode helps
    return checked


# --- measuring them ------------------------------------------------------------------------------


def schedule(runnable: list[Candidate], rounds: int) -> list[tuple[int, Candidate]]:
    """(round, candidate) in the order they run: every candidate once per round, every second round reversed."""
    return [(r, c) for r in range(1, rounds + 1) for c in (runnable if r % 2 else runnable[::-1])]


def steady_rates(run_dir: str) -> list[float]:
    """tokens/s of each step after the first (the first pays for warm-up) in a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rates = [json.loads(line)["tokens_per_s"] for line in path.read_text().splitlines() if line.strip()]
    return rates[1:]


def measure(runnable: list[Candidate], overrides: Sequence[str], config_dirs: Sequence[str], steps: int, rounds: int) -> Path:
    """Run every candidate `rounds` times as `p3d train` jobs; returns the tune directory."""
    kept = without_keys(overrides, [*LAYOUT_KEYS, AC_KEY, *MEASURE_KEYS])
    settings = [f"train.steps={steps}", "checkpoint=none", f"logging.every={steps}", "logging.progress=false", "logging.tensorboard=false", "logging.wandb=false"]
    tune_dir = sweep_directory([*kept, *settings], config_dirs, kind="tune")
    jobs = []
    for number, (round_number, candidate) in enumerate(schedule(runnable, rounds)):
        run_dir = tune_dir / f"{candidate.name}-{candidate.ac}" / f"round{round_number}"
        job = JobResult(number, [*candidate.overrides, f"(round {round_number})"], [*kept, *candidate.overrides, *settings], str(run_dir))
        candidate.runs.append(job)
        jobs.append(job)
    print(f"p3d: tune: running {len(runnable)} layout{'s' if len(runnable) != 1 else ''} for {steps} steps, {rounds} round{'s' if rounds != 1 else ''}, in {tune_dir}", flush=True)
    run_in_turn(jobs, [], config_dirs, tune_dir)
    return tune_dir


def ranking(measured: list[Candidate]) -> list[Candidate]:
    return sorted((c for c in measured if c.tokens_per_s is not None), key=lambda c: -c.tokens_per_s)


def tune(overrides: list[str], world_size: int, steps: int, rounds: int = 2, config_dirs: Sequence[str] = ()) -> int:
    """List, check, measure and rank the layouts; 0 when one was found, 2 when none runs, 1 when all failed
    or the tuner was stopped (SIGINT, SIGTERM: the run under way saves nothing and stops, the rest never start)."""
    config_dirs = [str(d) for d in checked_config_dirs(config_dirs)]
    check_node(overrides, config_dirs, world_size)
    checked = candidates(overrides, world_size, config_dirs)
    print(format_candidates(checked, world_size, AC_KEY in fixed_by_overrides(overrides)), flush=True)
    runnable = [c for c in checked if c.problem is None]
    if not runnable:
        print("p3d: error: no layout validates and fits; see the reasons above", file=sys.stderr)
        return 2
    tune_dir = measure(runnable, overrides, config_dirs, steps, rounds)
    print(format_ranking(runnable, steps, rounds), flush=True)
    ranked = ranking(runnable)
    tune_dir.mkdir(parents=True, exist_ok=True)
    (tune_dir / "tune.json").write_text(json.dumps([summary(c) for c in [*ranked, *(c for c in runnable if c not in ranked)]], indent=1) + "\n")
    stopped = any(c.stopped for c in runnable)
    if not ranked:
        print(f"p3d: error: {'the tuner was stopped before any layout finished' if stopped else 'every layout failed; see the status column'}", file=sys.stderr)
        return 1
    best = ranked[0]
    config_dir_args = [f"--config-dir {d}" for d in config_dirs]
    command = " ".join(["p3d", "train", *config_dir_args, *without_keys(overrides, [*LAYOUT_KEYS, AC_KEY]), *best.overrides])
    among = "of the layouts measured before the tuner was stopped" if stopped else "here"
    print(f"p3d: tune: fastest {among}: {best.name} with activation checkpointing {best.ac}; train with:\n    {command}", flush=True)
    return 1 if stopped else 0


# --- the report ----------------------------------------------------------------------------------


def summary(candidate: Candidate) -> dict:
    return {
        "layout": candidate.name,
        "activation_checkpointing": candidate.ac,
        "tokens_per_s": candidate.tokens_per_s,
        "tokens_per_s_per_round": candidate.round_medians,
        "peak_mem_gb_per_rank": candidate.peak_mem_gb,
        "plan_mem_gb_per_rank": candidate.memory_gb,
        "final_loss": candidate.runs[-1].final_loss if candidate.runs else None,
        "status": candidate.status,
        "run_dirs": [run.run_dir for run in candidate.runs],
    }


def format_candidates(checked: list[Candidate], world_size: int, ac_fixed: bool) -> str:
    ac_rule = f"{AC_KEY} as given" if ac_fixed else "activation checkpointing only where a layout does not fit without it"
    lines = [
        f"p3d: tune: {len(checked)} candidate{'s' if len(checked) != 1 else ''} for {world_size} ranks ({ac_rule}):",
        "layout      AC    plan mem/rank  verdict",
    ]
    for c in checked:
        memory = "n/a" if c.memory_gb is None else f"{c.memory_gb:.2f} GB"
        lines.append(f"{c.name:<11} {c.ac:<5} {memory:<14} {c.problem or 'run (fits: ' + c.fit + ')'}")
    return "\n".join(lines)


def format_ranking(measured: list[Candidate], steps: int, rounds: int) -> str:
    """The table, fastest first; the layouts that failed last, unranked."""
    rounds_text = f"{rounds} rounds in alternating order" if rounds > 1 else "1 round"
    lines = [
        f"p3d: tune: ranked by tokens/s, the median of steps 2-{steps} over {rounds_text}; measured on this machine just now,",
        "so other work running on it shows in the numbers (compare the rounds):",
        "rank  layout      AC    tokens/s  per round         peak mem/rank  final loss  status",
    ]
    ranked = ranking(measured)
    for place, c in enumerate([*ranked, *(c for c in measured if c not in ranked)], start=1):
        rate = "n/a" if c.tokens_per_s is None else f"{c.tokens_per_s:,.0f}"
        per_round = " / ".join(f"{r:,.0f}" for r in c.round_medians) or "n/a"
        memory = "n/a" if c.peak_mem_gb is None else f"{c.peak_mem_gb:.2f} GB"
        loss = c.runs[-1].final_loss if c.runs else None
        loss_text = "n/a" if loss is None else f"{loss:.4f}"
        lines.append(f"{place if c in ranked else '-':<5} {c.name:<11} {c.ac:<5} {rate:<9} {per_round:<17} {memory:<14} {loss_text:<11} {c.status}")
    return "\n".join(lines)
