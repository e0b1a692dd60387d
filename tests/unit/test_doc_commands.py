"""Every command in README.md, docs/, examples/ and `p3d --help` composes and validates as written,
for the world size the command itself gives (its launcher's process count), without training.

A command is a code line or an inline code span that starts with p3d, torchrun, python -m p3d.train,
accelerate launch or sbatch. Templates (`<overrides>`, `N`, `...`, `$VARS`) are not commands. Files
a command names that cannot exist here (a corpus, a pretrained directory) get stand-ins in a
scratch directory; nothing else is changed.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from p3d import cli
from p3d.config.compose import compose, to_object
from p3d.config.flags import split_hydra_flags
from p3d.config.validate import validate

ROOT = Path(__file__).resolve().parents[2]
STARTS = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(p3d\s|p3d$|torchrun\s|python -m p3d\.train\b|accelerate launch\s|sbatch\s)")


@dataclass(frozen=True)
class Command:
    source: str
    text: str


def _code_fragments(path: Path, text: str) -> list[str]:
    """Code lines (fenced or indented blocks, inline spans) of a Markdown file; comment and code lines of a script."""
    text = re.sub(r"\\\n\s*", " ", text)  # continued lines
    if path.suffix != ".md":
        return [line.lstrip("#").strip() for line in text.splitlines()]
    fragments, fenced, prose = [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            fragments.append(line.strip())
        else:
            prose.append(line)
    return fragments + re.findall(r"`([^`]+)`", " ".join(prose))  # an inline span may wrap over lines


def _strip_comment(fragment: str) -> str:
    return re.split(r"\s+#\s", fragment, maxsplit=1)[0].strip()


def _is_template(command: str) -> bool:
    try:
        tokens = shlex.split(command)
    except ValueError:  # unbalanced quotes: a fragment of a longer shell line, not a command
        return True
    return any(re.search(r"[<>$]|\.\.\.|^\[|^[A-Z]+$", token) for token in tokens)


def documented_commands() -> list[Command]:
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(p for p in (ROOT / "examples").rglob("*") if p.is_file())]
    found = []
    for path in sources:
        for fragment in _code_fragments(path, path.read_text()):
            for part in re.split(r"\s(?:&&|;)\s", _strip_comment(fragment)):
                command = part.strip()
                if STARTS.match(command) and not _is_template(command):
                    found.append(Command(str(path.relative_to(ROOT)), command))
    usage = cli.USAGE  # what `p3d --help` prints
    for line in usage.splitlines():
        command = line.strip()
        if STARTS.match(command) and not _is_template(command):
            found.append(Command("p3d --help", command))
    return found


COMMANDS = documented_commands()


def test_the_documents_hold_commands_of_every_kind():
    starts = {STARTS.match(command.text).group(1).strip() for command in COMMANDS}
    assert {"p3d", "torchrun", "python -m p3d.train", "accelerate launch", "sbatch"} <= starts, starts
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("doc_commands")


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.source}: {c.text}" for c in COMMANDS])
def test_documented_command_composes_and_validates(command, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    monkeypatch.delenv("RANK", raising=False)
    for config_dirs, overrides, world_size in jobs_of(command.text):
        overrides = with_stand_ins(overrides, config_dirs, scratch)
        config = to_object(compose(overrides, config_dirs))
        if world_size is not None:
            validate(config, world_size)


# --- what a command runs ------------------------------------------------------------------------


def jobs_of(command: str) -> list[tuple[list[str], list[str], int | None]]:
    """(config dirs, overrides, world size) of each job the command starts; world size None: composed only."""
    words = shlex.split(re.sub(r"^(?:[A-Z_]+=\S+\s+)*", "", command))
    if words[:2] == ["python", "-m"]:
        return [_module_job(words[3:], 1)]
    if words[0] == "torchrun":
        from torch.distributed.run import parse_args

        args = parse_args(words[1:])
        assert args.module and args.training_script == "p3d.train", command
        nnodes = int(args.nnodes.split(":")[-1])  # min:max nodes: the largest world
        return [_module_job(args.training_script_args, nnodes * int(args.nproc_per_node))]
    if words[:2] == ["accelerate", "launch"]:
        module = words.index("-m")
        assert words[module + 1] == "p3d.train", command
        options = words[2:module]
        processes = int(options[options.index("--num_processes") + 1]) if "--num_processes" in options else 1
        return [_module_job(words[module + 2 :], processes)]
    if words[0] == "sbatch":
        return [_sbatch_job(words[1:])]
    assert words[0] == "p3d", command
    subcommand, rest = (words[1], words[2:]) if len(words) > 1 else ("--help", [])
    if subcommand == "train":
        return _train_jobs(rest)
    if subcommand == "plan":
        flags, rest = _flags(rest)
        options, overrides = cli._plan_options(rest, required=False)
        return [(flags.config_dirs, overrides, options["world_size"])]
    if subcommand == "tune":
        return _tune_jobs(rest)
    return []  # ls, export, --help: nothing to compose


def _tune_jobs(args: list[str]) -> list[tuple[list[str], list[str], int | None]]:
    """The command composed; with --world-size, the tuner finds a layout that validates and fits."""
    flags, rest = _flags(args)
    for option, at_least in (("--steps", 2), ("--rounds", 1)):
        _, rest = cli._int_option(rest, option, default=at_least, at_least=at_least)
    world_size, overrides = cli._world_size_arg(rest, required=False)
    if world_size is not None:
        assert _runnable_layouts(tuple(flags.config_dirs), tuple(overrides), world_size), f"no layout of {overrides} validates and fits {world_size} ranks"
    return [(flags.config_dirs, overrides, None)]


@functools.lru_cache(maxsize=None)
def _runnable_layouts(config_dirs: tuple[str, ...], overrides: tuple[str, ...], world_size: int) -> list[str]:
    """The layouts `p3d tune` would run (validated by the tuner itself; the same command in several documents is checked once)."""
    from p3d.tune import candidates

    return [c.name for c in candidates(list(overrides), world_size, list(config_dirs)) if c.problem is None]


def _flags(args: list[str]):
    """Hydra's flags and the rest; documented config directories are relative to the repository."""
    flags, rest = split_hydra_flags(args)
    flags.config_dirs = [str(ROOT / directory) for directory in flags.config_dirs]
    return flags, rest


def _module_job(args: list[str], world_size: int) -> tuple[list[str], list[str], int | None]:
    flags, overrides = _flags(args)
    return flags.config_dirs, overrides, None if flags.prints_and_exits else world_size


def _train_jobs(args: list[str]) -> list[tuple[list[str], list[str], int | None]]:
    flags, rest = _flags(args)
    launcher, overrides = cli.split_launcher_args(rest)
    if flags.prints_and_exits:
        return [(flags.config_dirs, overrides, None)]
    jobs = [overrides]
    if flags.multirun:
        from p3d.sweep import split_sweep

        jobs, slurm = split_sweep(overrides)
        settings = dict(o.split("=", 1) for o in slurm)  # a Slurm job's nodes and ranks per node
        launcher = [*launcher, "--nnodes", settings.get("hydra.launcher.nodes", "1")]
        if "hydra.launcher.gpus_per_node" in settings:
            launcher += ["--nproc-per-node", settings["hydra.launcher.gpus_per_node"]]
    return [(flags.config_dirs, job, _train_world_size(launcher, job, flags.config_dirs)) for job in jobs]


def _train_world_size(launcher: list[str], overrides: list[str], config_dirs: list[str]) -> int:
    nnodes = cli._option_value(launcher, "--nnodes") or "1"
    nproc = cli._option_value(launcher, "--nproc-per-node", "--nproc_per_node")
    if nproc is None:
        nproc, _ = cli.processes_per_node(to_object(compose(overrides, config_dirs)), nnodes)
    return int(nnodes) * int(nproc)


def _sbatch_job(args: list[str]) -> tuple[list[str], list[str], int]:
    script_index = next(i for i, word in enumerate(args) if not word.startswith("-"))
    script = ROOT / args[script_index]
    directives = dict(
        line.split(None, 1)[1].lstrip("-").split("=", 1) for line in script.read_text().splitlines() if line.startswith("#SBATCH") and "=" in line
    )
    options = dict(word.lstrip("-").split("=", 1) for word in args[:script_index] if "=" in word)
    nodes = int(options.get("nodes", directives["nodes"]))
    gpus = int(options.get("gpus-per-node", directives["gpus-per-node"]))
    flags, overrides = _flags(args[script_index + 1 :])
    return flags.config_dirs, overrides, nodes * gpus


# --- stand-ins for files that cannot exist here ---------------------------------------------------


def with_stand_ins(overrides: list[str], config_dirs: list[str], scratch: Path) -> list[str]:
    result = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in ("data.path", "data.eval_path") and not Path(value).exists():
            override = f"{key}={_corpus_stand_in(value, scratch)}"
        elif key == "data.sources":
            items = yaml.safe_load(value)
            for item in items:
                if item.get("path") is not None and not Path(item["path"]).exists():
                    item["path"] = str(_corpus_stand_in(item["path"], scratch))
            override = "data.sources=[" + ", ".join("{" + ", ".join(f"{k}: {v!r}" for k, v in item.items()) + "}" for item in items) + "]"
        elif key == "model.pretrained" and not Path(value).exists():
            override = f"model.pretrained={_pretrained_stand_in(overrides, config_dirs, scratch)}"
        result.append(override)
    return result


def _corpus_stand_in(value: str, scratch: Path) -> Path:
    """A corpus where a documented command names one: a file of its suffix, or a directory of .jsonl."""
    path = scratch / "stand_ins" / Path(value).name
    file = path if path.suffix else path / "part-0.jsonl"
    file.parent.mkdir(parents=True, exist_ok=True)
    line = '{"text": "a stand-in corpus of a few words"}\n' if file.suffix == ".jsonl" else "a stand-in corpus of a few words\n"
    file.write_text(line * 2000)
    return path


def _pretrained_stand_in(overrides: list[str], config_dirs: list[str], scratch: Path) -> Path:
    """A directory holding the config.json of the command's model preset (validation reads no weights);
    for `model=hf`, which takes every size from the checkpoint, a tiny one of the type its path names."""
    from p3d.model import build_hf_config

    random_init = [o for o in overrides if not o.startswith(("model.init=", "model.pretrained="))]
    model = to_object(compose(random_init, config_dirs)).model
    if model.arch is None:
        pretrained = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.pretrained="))
        model = to_object(compose(["model=tiny", f"model.arch={_arch_named_in(pretrained)}"])).model
    hf_config = build_hf_config(model)
    directory = scratch / "stand_ins" / f"pretrained_{hf_config.model_type}_{len(list((scratch / 'stand_ins').glob('pretrained_*')))}"
    hf_config.save_pretrained(directory)
    return directory


def _arch_named_in(path: str) -> str:
    """The Hugging Face model type a checkpoint's path names (/models/phi-3: phi3), else llama."""
    from transformers import CONFIG_MAPPING

    def letters_and_digits(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    name = letters_and_digits(Path(path).name)
    named = [model_type for model_type in CONFIG_MAPPING.keys() if name.startswith(letters_and_digits(model_type))]
    return max(named, key=len, default="llama")
