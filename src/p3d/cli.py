"""The `p3d` command line.

    p3d train [torchrun options] [key=value ...]   validate, then launch (torchrun in-process)
    p3d plan [key=value ...] --world-size N        validate and explain a config for N ranks
    p3d tune [key=value ...] --world-size N        rank the layouts that fit by measured tokens/s (p3d/tune.py)
    p3d export <checkpoint> <out_dir>              a checkpoint as a Hugging Face model directory
    p3d generate <run dir or checkpoint> --prompt  what a checkpoint writes (one process)
    p3d ls                                         presets of every config group, and the recipes
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Sequence

from p3d.errors import CONFIG_ERROR_EXIT, RUN_ERROR_EXIT, ConfigError, exits_cleanly

USAGE = """usage: p3d <command> [...]

commands:
  train [torchrun options] [key=value ...]   validate the config, then launch training
                                             (--nproc-per-node defaults to dp*cp*tp; with
                                             parallel.dp=-1 the node's GPUs, or tp*cp*dp_replicate on CPU)
  plan [key=value ...] --world-size N        validate a config for N ranks and run p3d's sharding on the
                                             meta device (no GPU, no processes): memory per rank, fits,
                                             collectives (--json, --device, --device-memory-gb; see plan -h)
  tune [key=value ...] --world-size N        run each layout that validates and fits N ranks for a few
       [--steps K] [--rounds R]              steps here, rank them by tokens/s, print the command for
                                             the fastest
  export <checkpoint or run dir> <out_dir>   write a checkpoint as a Hugging Face model directory
                                             (safetensors, config, tokenizer); a run dir means its newest
  generate <run dir or checkpoint> --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--chat]
                                             continue TEXT with a checkpoint (a run dir: its newest
                                             complete one) on one process; greedy by default
  ls                                         list the presets of every config group and the recipes

examples:
  p3d train parallel=tp2dp2cp2 model=tiny_llama train.steps=20
  p3d train --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:29500 parallel=tp2dp4cp2
  p3d plan parallel=tp2dp2cp2 model=opt1.3b --world-size 8
  p3d tune model=tiny_llama --world-size 8 --steps 10
  p3d export runs/tiny_llama-1a2b3c4d/checkpoints/step_00000020 exported/tiny_llama
  p3d generate runs/tiny_llama-1a2b3c4d --prompt "The " --max-new-tokens 40
  p3d ls"""


def main(argv: Sequence[str] | None = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `p3d ls | head` ends quietly
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "train":
        train_command(rest)
    elif command == "plan":
        plan_command(rest)
    elif command == "export":
        export_command(rest)
    elif command == "tune":
        tune_command(rest)
    elif command == "generate":
        generate_command(rest)
    elif command == "ls":
        list_command(rest)
    else:
        print(f"p3d: error: unknown command '{command}' (use train, plan, tune, export, generate or ls)", file=sys.stderr)
        sys.exit(2)


def _torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def split_launcher_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate torchrun options (`--x v`, `--x=v`, `--flag`) from Hydra overrides (`key=value`)."""
    takes_value = {}
    for action in _torchrun_parser()._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    launcher, overrides = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if name not in takes_value:
                raise ConfigError(f"{name}: not a torchrun option (Hydra overrides are key=value, without dashes)")
            launcher.append(arg)
            if takes_value[name] and "=" not in arg:
                if index + 1 >= len(args):
                    raise ConfigError(f"{name}: needs a value")
                launcher.append(args[index + 1])
                index += 1
        else:
            overrides.append(arg)
        index += 1
    return launcher, overrides


def _option_value(launcher: list[str], *names: str) -> str | None:
    for index, arg in enumerate(launcher):
        name, _, value = arg.partition("=")
        if name in names:
            return value if value else launcher[index + 1]
    return None


@exits_cleanly
def train_command(args: Sequence[str]) -> None:
    from p3d.config.flags import show, split_hydra_flags

    flags, rest = split_hydra_flags(args)
    launcher, overrides = split_launcher_args(rest)
    if flags.prints_and_exits:
        show(flags, overrides, USAGE)
    elif flags.multirun:
        from p3d.sweep import run_sweep

        sys.exit(run_sweep(launcher, overrides, flags.config_dirs))
    else:
        train_one(launcher, overrides, flags.config_dirs)


def train_one(launcher: list[str], overrides: list[str], config_dirs: Sequence[str] = ()) -> None:
    """Validate, check run.dir and the checkpoints, then train in this process (one rank) or under torchrun."""
    from p3d.checkpoint import checkpoint_problem
    from p3d.config.compose import checked_config_dirs, compose, to_object
    from p3d.config.validate import validate
    from p3d.resume import plan_resume
    from p3d.rundir import RunLock

    config = to_object(compose(overrides, config_dirs))
    overrides = with_run_dir(overrides, config.run.dir)  # the workers use the directory checked here
    worker_args = [arg for directory in checked_config_dirs(config_dirs) for arg in ("--config-dir", str(directory))] + overrides
    nnodes = _option_value(launcher, "--nnodes") or "1"
    nproc = _option_value(launcher, "--nproc-per-node", "--nproc_per_node")
    if nproc is None:
        nproc, reason = processes_per_node(config, nnodes)
        print(f"p3d: starting {nproc} process{'es' if nproc != 1 else ''} per node: {reason}", flush=True)
        nproc = str(nproc)
        launcher += ["--nproc-per-node", nproc]
    if nnodes.isdigit() and nproc.isdigit():
        setup = validate(config, int(nnodes) * int(nproc))
        if nnodes_is_single(launcher):
            RunLock(Path(config.run.dir)).check()  # another job on this run.dir; on several nodes, rank 0 alone decides
        # A bad checkpoint or a refused change fails here, before any worker; the workers then verify
        # the checksums too (reading the files is shared among them).
        plan_resume(config, setup.hf_config, verify=checkpoint_problem)
        _warn_if_it_will_not_fit(config, setup, int(nproc))
    if launcher == ["--nproc-per-node", "1"]:
        from p3d.train import main as train_main

        train_main(worker_args)
        return
    _launch(launcher, worker_args, int(nproc) if nproc.isdigit() else 1)


def processes_per_node(config, nnodes: str) -> tuple[int, str]:
    """How many processes `p3d train` starts per node, and why, from the parallel.* sizes: dp*cp*tp
    over the nodes (dp: parallel.dp, or dp_replicate*dp_shard when only those are set); with parallel.dp=-1,
    the node's accelerators (GPUs), or tp*cp*dp_replicate on CPU."""
    from p3d.distributed.env import resolve_device_type

    parallel = config.parallel
    nodes = int(nnodes) if nnodes.isdigit() else 1
    layout = f"tp{parallel.tp} x cp{parallel.cp}"
    dp = parallel.dp if parallel.dp != -1 or parallel.dp_shard == -1 else parallel.dp_replicate * parallel.dp_shard
    if dp != -1:
        world = dp * parallel.cp * parallel.tp
        if world % nodes:
            raise ConfigError(f"parallel.dp*parallel.cp*parallel.tp={world} ranks do not split evenly over --nnodes {nnodes}; pass --nproc-per-node or change the layout")
        per_node = world // nodes
        where = f" over {nodes} nodes" if nodes > 1 else ""
        return per_node, f"parallel tp{parallel.tp} x dp{dp} x cp{parallel.cp} = {world} ranks{where} (--nproc-per-node N to choose)"
    device = resolve_device_type(config.dist.device)
    if device == "cpu":
        replicas = f" x dp_replicate{parallel.dp_replicate}" if parallel.dp_replicate > 1 else ""
        per_node = parallel.tp * parallel.cp * parallel.dp_replicate
        return per_node, (
            f"parallel.dp=-1 on CPU takes {layout}{replicas} = {per_node} per node, dp {nodes * parallel.dp_replicate} "
            "(--nproc-per-node N for more data-parallel ranks)"
        )
    import torch

    count = torch.accelerator.device_count()
    if count % (parallel.tp * parallel.cp):
        raise ConfigError(
            f"parallel.dp=-1: this node's {count} {device} devices are not a multiple of parallel.tp*parallel.cp={parallel.tp * parallel.cp}; "
            "set parallel.dp or pass --nproc-per-node"
        )
    return count, f"parallel.dp=-1 fills this node's {count} {device} devices ({layout}, dp {count * nodes // (parallel.tp * parallel.cp)}; --nproc-per-node N to choose)"


def with_run_dir(overrides: list[str], run_dir: str) -> list[str]:
    """The overrides with run.dir set to the directory resolved here, quoted for Hydra's override parser
    (so a run.dir with `${now:...}` names the same directory in every worker, and on a restart)."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "run.dir"]
    # Hydra's quoted values: backslashes are literal except before a quote or at the end (doubled
    # there), a quote is \', and \${ keeps a literal ${ from being an interpolation.
    quoted = re.sub(r"(\\+)(?='|$)", r"\1\1", run_dir).replace("'", "\\'").replace("${", "\\${")
    return [*kept, f"run.dir='{quoted}'"]


def _warn_if_it_will_not_fit(config, setup, ranks_here: int) -> None:
    """On CPU, compare `p3d plan`'s memory for the ranks of this machine with its memory."""
    from p3d.distributed.env import resolve_device_type
    from p3d.errors import RunError
    from p3d.plan import GB, make_plan, returned_memory_advice

    if resolve_device_type(config.dist.device) != "cpu":
        return
    try:
        plan = make_plan(config, setup, "cpu")
    except RunError:  # a model the plan cannot run on the meta device: no estimate, no warning
        return
    if plan.device_memory_gb is None:
        return
    largest = sorted(plan.ranks, key=lambda memory: memory.total, reverse=True)[:ranks_here]
    needed = sum(memory.total for memory in largest)
    advice = returned_memory_advice(needed, sum(memory.allocator for memory in largest), plan.device_memory_gb * GB)
    if needed > plan.device_memory_gb * GB or advice:
        print(
            f"p3d: warning: {ranks_here} ranks need about {needed / GB:.1f} GB by `p3d plan` and this machine has "
            f"{plan.device_memory_gb:.1f} GB; {advice or 'see docs/parallelism.md for memory levers'}",
            file=sys.stderr,
        )


def _launch(launcher: list[str], overrides: list[str], nproc: int) -> None:
    """Run torchrun in this process; a failed worker becomes one line, not torchrun's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torch 2.13's default shares the rendezvous TCPStore with the workers, and a restarted group
    # (--max-restarts) then reads the previous attempt's addresses and cannot connect
    # (pytorch/pytorch#135712); a store per rendezvous round avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 1) // nproc, 1))
    if nnodes_is_single(launcher) and "--rdzv-endpoint" not in " ".join(launcher) and "--master-port" not in " ".join(launcher):
        launcher = ["--standalone", *launcher]
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_drop_worker_failure_records)
    try:
        run(parse_args([*launcher, "-m", "p3d.train", *overrides]))
    except ChildFailedError as error:
        # The first worker to fail is the cause; torchrun then stops the others (SIGTERM, code -15).
        first_rank, first = error.get_first_failure() if error.failures else (None, None)
        code = first.exitcode if first is not None else 1
        if code not in (CONFIG_ERROR_EXIT, RUN_ERROR_EXIT):  # p3d's own errors are collective: rank 0 printed the line
            print(f"p3d: error: training failed: rank {first_rank} exited with code {code} (its message is above)", file=sys.stderr)
        sys.exit(code if isinstance(code, int) and code > 0 else 1)
    except SignalException as error:
        # torchrun passed the signal on to the workers, which save a checkpoint before they exit.
        name = signal.Signals(error.sigval).name
        print(f"p3d: stopped by {name}; the workers saved a checkpoint if they had time (see above); rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + int(error.sigval))


def _drop_worker_failure_records(record: logging.LogRecord) -> bool:
    """torchrun's own lines about a failed worker and the others it stops: p3d's one line replaces them."""
    return not str(record.msg).startswith(("failed (exitcode:", "Sending process"))


def nnodes_is_single(launcher: list[str]) -> bool:
    return (_option_value(launcher, "--nnodes") or "1") in ("1", "1:1")


PLAN_USAGE = """usage: p3d plan [--config-dir DIR] [key=value ...] --world-size N [--device cpu|cuda] [--device-memory-gb GB|GPU] [--json] [--ranks]

Validates the config for N ranks, then applies p3d's own TP, SP, CP, activation checkpointing and
FSDP2 code (sharded, HSDP or replicated) to the model on the meta device over a fake process group
of N ranks, and replays one step: memory per rank (GB = 1e9 bytes), whether the job fits, the
collectives of a step by kind and mesh dimension.

  --device cpu|cuda         the kind of device the ranks run on (default: this machine's); it decides
                            the per-process terms: on cpu the process baseline and allocator
                            retention (all ranks share the machine), on cuda the CUDA context
  --device-memory-gb GB     memory of one device (cuda) or of the machine (cpu), or a GPU name
                            (H100, A100, ...); default: this machine's
  --json                    one JSON object: per_rank_gb (the largest rank), job_gb, fits, breakdown, ...
  --ranks                   every rank's (dp, cp, tp) coordinates
  --cfg job [--resolve]     print the composed config and exit (Hydra's flag, as for p3d train)"""


@exits_cleanly
def plan_command(args: Sequence[str]) -> None:
    """Print the plan; an invalid config exits 2 with the validation messages, like `p3d train`."""
    import json

    from p3d.config.compose import compose, to_object
    from p3d.config.flags import show, split_hydra_flags
    from p3d.config.validate import validate
    from p3d.plan import make_plan, render

    flags, rest = split_hydra_flags(args)
    if flags.multirun:
        raise ConfigError("-m/--multirun: p3d plan explains one config; `p3d tune` compares layouts")
    options, overrides = _plan_options(rest, required=not flags.prints_and_exits)
    if flags.prints_and_exits:
        show(flags, overrides, PLAN_USAGE)
        return
    cfg = compose(overrides, flags.config_dirs)
    config = to_object(cfg)
    setup = validate(config, options["world_size"])
    plan = make_plan(config, setup, options["device"], options["device_memory_gb"])
    if options["json"]:
        print(json.dumps(plan.as_json()))
    else:
        print(render(plan, options["ranks"]))


def _plan_options(args: Sequence[str], required: bool = True) -> tuple[dict, list[str]]:
    """p3d plan's own options (--name value or --name=value); everything else is a Hydra override."""
    from p3d.plan import DEVICE_MEMORY_GB

    options = {"world_size": None, "device": None, "device_memory_gb": None, "json": False, "ranks": False}
    overrides = []
    iterator = iter(args)
    for arg in iterator:
        if not arg.startswith("--"):
            overrides.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        key = name[2:].replace("-", "_")
        if key in ("json", "ranks") and not has_value:
            options[key] = True
            continue
        if key not in ("world_size", "device", "device_memory_gb"):
            raise ConfigError(f"{name}: not an option of p3d plan (--world-size, --device, --device-memory-gb, --json, --ranks, Hydra's --config-dir/--cfg/--help; overrides are key=value)")
        if not has_value:
            value = next(iterator, "")
        if key == "world_size":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size needs a positive number, got '{value}'")
            options[key] = int(value)
        elif key == "device":
            if value not in ("cpu", "cuda"):
                raise ConfigError(f"--device {value}: use cpu or cuda")
            options[key] = value
        else:
            options[key] = _device_memory_gb(value, DEVICE_MEMORY_GB)
    if options["world_size"] is None and required:
        raise ConfigError("p3d plan needs --world-size N (the number of ranks to plan for)")
    return options, overrides


def _device_memory_gb(value: str, table: dict[str, float]) -> float:
    try:
        gb = float(value)
    except ValueError:
        names = {name.lower(): gb for name, gb in table.items()}
        if value.lower() in names:
            return float(names[value.lower()])
        raise ConfigError(f"--device-memory-gb {value}: give a number of GB or a GPU name ({', '.join(table)})") from None
    if not gb > 0:
        raise ConfigError(f"--device-memory-gb {value}: must be a positive number of GB")
    return gb


TUNE_USAGE = "usage: p3d tune [--config-dir DIR] [key=value ...] --world-size N [--steps K] [--rounds R]"


@exits_cleanly
def tune_command(args: Sequence[str]) -> None:
    """Rank the layouts that validate and fit by measured tokens/s (p3d/tune.py)."""
    from p3d.config.flags import show, split_hydra_flags
    from p3d.tune import tune

    flags, rest = split_hydra_flags(args)
    if flags.multirun:
        raise ConfigError("-m/--multirun: p3d tune runs its own sweep over the layouts")
    steps, rest = _int_option(rest, "--steps", default=10, at_least=2)
    rounds, rest = _int_option(rest, "--rounds", default=2, at_least=1)
    if flags.prints_and_exits:
        show(flags, _world_size_arg(rest, required=False)[1], TUNE_USAGE)
        return
    world_size, overrides = _world_size_arg(rest, command="p3d tune", what="the number of ranks to tune for")
    sys.exit(tune(overrides, world_size, steps, rounds, flags.config_dirs))


def _int_option(args: Sequence[str], name: str, default: int, at_least: int) -> tuple[int, list[str]]:
    """`--name N` or `--name=N` taken out of args."""
    value, rest = str(default), []
    iterator = iter(args)
    for arg in iterator:
        if arg == name or arg.startswith(name + "="):
            value = arg.split("=", 1)[1] if "=" in arg else next(iterator, "")
        else:
            rest.append(arg)
    if not value.isdigit() or int(value) < at_least:
        raise ConfigError(f"{name} {value}: needs a whole number >= {at_least}")
    return int(value), rest


def _world_size_arg(
    args: Sequence[str], required: bool = True, command: str = "p3d plan", what: str = "the number of ranks to plan for"
) -> tuple[int | None, list[str]]:
    overrides, world_size = [], None
    iterator = iter(args)
    for arg in iterator:
        if arg.startswith("--world-size") or arg.startswith("--world_size"):
            value = arg.split("=", 1)[1] if "=" in arg else next(iterator, "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size needs a positive number, got '{value}'")
            world_size = int(value)
        else:
            overrides.append(arg)
    if world_size is None and required:
        raise ConfigError(f"{command} needs --world-size N ({what})")
    return world_size, overrides


@exits_cleanly
def export_command(args: Sequence[str]) -> None:
    from p3d.export import export_checkpoint

    if any(arg in ("-h", "--help") for arg in args) or len(args) != 2:
        print("usage: p3d export <checkpoint dir, or a run dir for its newest checkpoint> <out_dir>")
        if len(args) != 2 and not any(arg in ("-h", "--help") for arg in args):
            sys.exit(2)
        return
    out_dir = export_checkpoint(Path(args[0]), Path(args[1]))
    print(f"p3d: exported to {out_dir}")


@exits_cleanly
def generate_command(args: Sequence[str]) -> None:
    from p3d.generate import main as generate_main

    generate_main(args)


@exits_cleanly
def list_command(args: Sequence[str] = ()) -> None:
    """Every group's presets (the user's --config-dir ones first), the layout names, and the recipes."""
    from p3d.config import layouts
    from p3d.config.compose import config_groups, group_presets
    from p3d.config.flags import split_hydra_flags

    flags, rest = split_hydra_flags(args)
    if rest:
        raise ConfigError(f"{rest[0]}: p3d ls takes only --config-dir DIR")
    for group in config_groups(flags.config_dirs):
        print("recipe (select with +recipe=NAME):" if group == "recipe" else f"{group}:")
        for name, path in group_presets(group, flags.config_dirs).items():
            print(f"  {name:<22} {_summary(path)}")
        if group == layouts.GROUP:
            print(f"  {layouts.GRAMMAR:<22} any layout by name, e.g. {layouts.EXAMPLES} (a part left out: tp and cp 1, dp filling the world)")


def _summary(path: Path) -> str:
    """The first comment line of a YAML file that is not a Hydra directive."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


if __name__ == "__main__":
    main()
