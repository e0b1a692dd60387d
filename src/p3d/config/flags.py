"""Hydra's command-line flags, as p3d's entry points honour them.

    --config-dir DIR, -cd DIR     DIR's groups (model/, parallel/, recipe/, ...) in front of p3d's (repeatable)
    --cfg job|all|hydra, -c       print the composed config and exit (--resolve: interpolations resolved;
                                  --package KEY, -p KEY: only that part)
    --info [WHAT], -i             Hydra's report (search path, defaults list, config) and exit
    --help, -h                    usage, the config groups and the composed config, and exit
    -m, --multirun                one job per combination of comma-separated values (`p3d train` only)

They print on rank 0 only under torchrun. Hydra's other flags are refused with one line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from omegaconf import Container, OmegaConf

from p3d.errors import ConfigError

CFG_KINDS = ("job", "all", "hydra")
INFO_KINDS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_WITH_VALUE = {"--config-dir": "config_dirs", "-cd": "config_dirs", "--cfg": "cfg", "-c": "cfg", "--package": "package", "-p": "package"}
_SWITCHES = {"--resolve": "resolve", "--help": "help", "-h": "help", "--multirun": "multirun", "-m": "multirun"}
_REFUSED = {
    "--config-path": "--config-dir DIR adds your groups in front of p3d's; select a whole experiment with +recipe=NAME",
    "-cp": "--config-dir DIR adds your groups in front of p3d's; select a whole experiment with +recipe=NAME",
    "--config-name": "write your experiment as DIR/recipe/NAME.yaml and select it with --config-dir DIR +recipe=NAME",
    "-cn": "write your experiment as DIR/recipe/NAME.yaml and select it with --config-dir DIR +recipe=NAME",
    "--hydra-help": "--help lists p3d's groups and config; --info shows Hydra's search path and defaults",
    "--version": "pip show p3d hydra-core",
    "--run": "p3d runs one job unless -m is given",
    "--shell-completion": "not available in p3d",
    "-sc": "not available in p3d",
    "--experimental-rerun": "rerun the same command: it resumes from the run directory",
}


@dataclass
class HydraFlags:
    config_dirs: list[str] = field(default_factory=list)
    cfg: str | None = None
    resolve: bool = False
    package: str | None = None
    info: str | None = None
    help: bool = False
    multirun: bool = False

    @property
    def prints_and_exits(self) -> bool:
        return self.help or self.cfg is not None or self.info is not None

    def config_dir_args(self) -> list[str]:
        """The flags that a worker (or a sweep's job) needs to compose the same config."""
        return [arg for directory in self.config_dirs for arg in ("--config-dir", directory)]


def split_hydra_flags(args: Sequence[str]) -> tuple[HydraFlags, list[str]]:
    """Hydra's flags out of `args`; the rest (overrides, launcher options) in order."""
    flags, rest = HydraFlags(), []
    index = 0
    while index < len(args):
        arg = args[index]
        name, has_value, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _REFUSED:
            raise ConfigError(f"{name}: p3d does not take this Hydra flag; {_REFUSED[name]}")
        if name in _WITH_VALUE:
            if not has_value:
                if index + 1 >= len(args):
                    raise ConfigError(f"{name}: needs a value ({_expected(name)})")
                index += 1
                value = args[index]
            _set(flags, _WITH_VALUE[name], name, value)
        elif name in ("--info", "-i"):
            if not has_value and index + 1 < len(args) and args[index + 1] in INFO_KINDS:
                index += 1
                value = args[index]
            if value and value not in INFO_KINDS:
                raise ConfigError(f"--info {value}: one of {', '.join(INFO_KINDS)}")
            flags.info = value or "all"
        elif name in _SWITCHES and not has_value:
            setattr(flags, _SWITCHES[name], True)
        else:
            rest.append(arg)
        index += 1
    if flags.resolve and flags.cfg is None:
        raise ConfigError("--resolve: goes with --cfg job|all|hydra")
    return flags, rest


def _expected(name: str) -> str:
    return {"config_dirs": "a directory", "cfg": "job, all or hydra", "package": "a config key such as parallel"}[_WITH_VALUE[name]]


def _set(flags: HydraFlags, attribute: str, name: str, value: str) -> None:
    if attribute == "config_dirs":
        flags.config_dirs.append(value)
    elif attribute == "cfg" and value not in CFG_KINDS:
        raise ConfigError(f"{name} {value}: one of {', '.join(CFG_KINDS)}")
    else:
        setattr(flags, attribute, value)


def show(flags: HydraFlags, overrides: Sequence[str], usage: str) -> None:
    """--help, --cfg, --info: print (rank 0 only under torchrun) what Hydra would print."""
    if os.environ.get("RANK", "0") != "0":
        return
    if flags.help:
        print(help_text(flags, overrides, usage))
    elif flags.cfg is not None:
        print_config(flags, overrides)
    else:
        from p3d.compat import hydra_show_info
        from p3d.config.compose import checked_overrides, describe_compose_error, hydra_context

        try:
            with hydra_context(flags.config_dirs):
                hydra_show_info(flags.info, checked_overrides(overrides))
        except Exception as error:  # Hydra's errors, and OmegaConf's, as one line
            raise ConfigError(describe_compose_error(error, flags.config_dirs)) from error
    sys.stdout.flush()


def print_config(flags: HydraFlags, overrides: Sequence[str]) -> None:
    """As Hydra's --cfg: the job's config (`job`, as p3d composed it), Hydra's (`hydra`) or both (`all`)."""
    from p3d.config.compose import compose, compose_hydra_node

    if flags.cfg == "job":
        cfg = compose(overrides, flags.config_dirs)
    else:
        hydra_node = compose_hydra_node(overrides, flags.config_dirs)
        cfg = OmegaConf.create({"hydra": hydra_node})
        if flags.cfg == "all":
            job = OmegaConf.to_container(compose(overrides, flags.config_dirs), enum_to_str=True)
            cfg = OmegaConf.merge(cfg, job)
    node = cfg if flags.package in (None, "", "_global_") else OmegaConf.select(cfg, flags.package)
    if node is None:
        raise ConfigError(f"--package {flags.package}: no such key in the config")
    if not isinstance(node, Container):
        print(node)
        return
    if flags.package not in (None, "", "_global_"):
        print(f"# @package {flags.package}")
    if flags.resolve:
        OmegaConf.resolve(node)
    sys.stdout.write(OmegaConf.to_yaml(node))


def help_text(flags: HydraFlags, overrides: Sequence[str], usage: str) -> str:
    """As Hydra's app help: usage, the config groups with their options, the composed config."""
    from p3d.config import layouts
    from p3d.config.compose import compose, config_groups, group_presets

    cfg = compose(overrides, flags.config_dirs)
    lines = [usage.rstrip(), "", "== Configuration groups ==", "Compose your configuration from those groups (group=option)", ""]
    for group in config_groups(flags.config_dirs):
        options = ", ".join(group_presets(group, flags.config_dirs))
        if group == layouts.GROUP:
            options += f", or any layout by name {layouts.GRAMMAR} ({layouts.EXAMPLES})"
        lines.append(f"{'+recipe' if group == 'recipe' else group}: {options}")
    lines += ["", "== Config ==", "Override anything in the config (foo.bar=value)", "", OmegaConf.to_yaml(cfg).rstrip()]
    return "\n".join(lines)
