"""Compose the p3d config with Hydra from `conf/`, `recipes/`, the user's `--config-dir`s and overrides.

The search path, first match wins: the user's --config-dir directories (in the order given), p3d's
conf/, the layout names (`parallel=tp2dp4cp2`, config/layouts.py), then the ConfigStore (the
schema and recipes/). So a user's `model/my_model.yaml` or `recipe/my_run.yaml` is found like a
shipped preset, and one of the same name as a shipped preset replaces it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import typing
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.errors import HydraException, MissingConfigException
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from p3d.config import layouts
from p3d.config.schema import P3DConfig
from p3d.errors import ConfigError

SCHEMA_NAME = "p3d_schema"
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Overrides that change how a run is laid out, reported or evaluated, or where its token cache lives,
# not what it trains: they do not change the default run directory, so rerunning with another layout
# or more steps resumes.
_RUN_ID_EXCLUDED = (
    "parallel", "train.steps", "train.micro_batch_size", "checkpoint", "logging", "run", "dist", "eval", "data.eval_path",
    "data.cache_dir", "data.tokenize_workers",
)


def _shipped_dir(installed_name: str, repo_name: str) -> Path:
    """conf/ and recipes/ sit inside the installed package, or at the root of a source checkout."""
    installed = PACKAGE_DIR / installed_name
    return installed if installed.is_dir() else PACKAGE_DIR.parents[1] / repo_name


def conf_dir() -> Path:
    return _shipped_dir("_conf", "conf")


def recipes_dir() -> Path:
    return _shipped_dir("_recipes", "recipes")


@lru_cache(maxsize=None)
def register_configs() -> None:
    """Store the schema and every recipe in Hydra's ConfigStore, and register p3d's search path and
    layout source with Hydra (once per process)."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=P3DConfig)
    for recipe in sorted(recipes_dir().glob("*.yaml")):
        store.store(group="recipe", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_")
    Plugins.instance().register(layouts.LayoutSource)
    Plugins.instance().register(P3DSearchPath)


# The user's config directories of the composition under way (None: no p3d composition under way,
# so the search path plugin leaves other Hydra apps of the process alone).
_active_config_dirs: tuple[Path, ...] | None = None


class P3DSearchPath(SearchPathPlugin):
    """The user's --config-dir directories in front of p3d's conf/ ("main"), layout names after it."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if _active_config_dirs is None:
            return
        for directory in _active_config_dirs:
            search_path.prepend(provider="p3d --config-dir", path=f"file://{directory}", anchor=SearchPathQuery(provider="main"))
        search_path.append(provider="p3d layouts", path=f"{layouts.LayoutSource.scheme()}://", anchor=SearchPathQuery(provider="main"))


def checked_config_dirs(config_dirs: Sequence[str | Path]) -> tuple[Path, ...]:
    """Absolute paths of existing directories (workers, Slurm jobs and a changed cwd see the same)."""
    checked = []
    for directory in config_dirs:
        path = Path(directory).expanduser().absolute()
        if not path.is_dir():
            raise ConfigError(f"--config-dir {directory}: no such directory; give a directory holding your groups (model/, parallel/, recipe/, ...)")
        checked.append(path)
    return tuple(checked)


@contextmanager
def hydra_context(config_dirs: Sequence[str | Path] = ()) -> Iterator[None]:
    """Hydra initialised on p3d's conf/ with the user's config directories in front (for compose and --info)."""
    global _active_config_dirs
    register_configs()
    previous, _active_config_dirs = _active_config_dirs, checked_config_dirs(config_dirs)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="p3d"):
            yield
    finally:
        _active_config_dirs = previous


def _normalise_overrides(overrides: Sequence[str]) -> list[str]:
    """`model.config.<field>=v` may name any Hugging Face config field, present in the preset or not.

    `model.arch=X` without a model preset (or a recipe that may pick one) means a tiny X: the default
    preset's sizes are written for its own architecture, so `model=tiny` is used instead."""
    keys = [override.lstrip("+~").split("=", 1)[0] for override in overrides]
    normalised = ["model=tiny"] if "model.arch" in keys and "model" not in keys and "recipe" not in keys else []
    for override in overrides:
        if override.startswith("model.config.") and "=" in override:
            override = "++" + override
        normalised.append(override)
    return normalised


def compose(overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with the overrides, the user's config directories in front of p3d's;
    every problem becomes a one-line ConfigError."""
    hydra_overrides = checked_overrides(overrides)
    config_dirs = checked_config_dirs(config_dirs)
    try:
        with hydra_context(config_dirs):
            cfg = hydra_compose(config_name="config", overrides=hydra_overrides)
        unknown = unknown_keys(cfg)
        if unknown:
            raise ConfigError([_unknown_key_line(key) for key in unknown])
        if not cfg.model.name:
            OmegaConf.update(cfg, "model.name", derived_model_name(cfg.model.pretrained, cfg.model.arch))
        # Resolved once, to a plain string: OmegaConf re-resolves an interpolation on every access,
        # and `${now:...}` or any custom resolver must name one directory for the whole run.
        run_dir = cfg.run.dir
        if run_dir is None:
            run_dir = Path(cfg.run.root) / f"{cfg.model.name}-{run_id(overrides)}"
        set_run_dir(cfg, str(run_dir))
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves, or fails here with its key
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(describe_compose_error(error, config_dirs)) from error
    return cfg


def checked_overrides(overrides: Sequence[str], honoured_hydra: Sequence[str] = ()) -> list[str]:
    """The overrides as Hydra takes them, after refusing flags and Hydra settings that p3d does not
    apply (those whose key starts with one of `honoured_hydra` pass)."""
    for override in overrides:
        if override.startswith("-"):
            raise ConfigError(f"{override}: not a key=value override; {FLAGS_HINT}")
    honoured = tuple(honoured_hydra)
    checked = [override for override in overrides if not (honoured and override.lstrip("+~").startswith(honoured))]
    refused = [problem for problem in map(_hydra_setting_problem, checked) if problem]
    if refused:
        raise ConfigError(refused)
    return _normalise_overrides(overrides)


def compose_hydra_node(overrides: Sequence[str], config_dirs: Sequence[str | Path] = (), honoured_hydra: Sequence[str] = ()) -> DictConfig:
    """Hydra's own config (`hydra:`) as composed with the overrides: its launcher, search path, ..."""
    hydra_overrides = checked_overrides(overrides, honoured_hydra)
    config_dirs = checked_config_dirs(config_dirs)
    try:
        with hydra_context(config_dirs):
            cfg = hydra_compose(config_name="config", overrides=hydra_overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(describe_compose_error(error, config_dirs)) from error
    return cfg.hydra


FLAGS_HINT = "p3d's Hydra flags are --config-dir DIR, --cfg job|all|hydra [--resolve] [--package KEY], --info, --help and -m (p3d train)"


def derived_model_name(pretrained: str | None, arch: str | None) -> str:
    """A run name for a preset without one: the checkpoint's directory (or hub repo) name, else the arch."""
    if pretrained:
        return Path(str(pretrained).rstrip("/")).name or "model"
    return arch or "model"


def set_run_dir(cfg: DictConfig, run_dir: str) -> None:
    """Set run.dir to a plain string (a literal `${` in it stays literal, not an interpolation)."""
    OmegaConf.update(cfg, "run.dir", run_dir.replace("${", "\\${"))


def to_object(cfg: DictConfig) -> P3DConfig:
    """Typed view of a composed config (attribute access with real types and enums)."""
    try:
        return OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as error:  # e.g. an interpolation that gives a value of the wrong type
        raise ConfigError(describe_compose_error(error)) from error


def _hydra_setting_problem(override: str) -> str | None:
    """Hydra's own settings (`hydra.*`, `hydra/<group>=`) are not applied by p3d's composition: refuse
    them rather than ignore them (`p3d train -m` takes the Slurm launcher's apart before composing)."""
    key = override.lstrip("+~").split("=", 1)[0]
    if key != "hydra" and not key.startswith(("hydra.", "hydra/")):
        return None
    if key in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.runtime.output_dir"):
        fix = "set run.dir=... for the output directory (of a sweep too)"
    elif key == "hydra.searchpath":
        fix = "--config-dir DIR puts your own groups in front of p3d's"
    elif key in ("hydra/launcher", "hydra.launcher") or key.startswith("hydra.launcher."):
        fix = "for Slurm, sweep with `p3d train -m hydra/launcher=submitit_slurm ...`; else launch with `p3d train` (--nnodes, --nproc-per-node) or torchrun"
    elif key == "hydra/sweeper" or key.startswith("hydra.sweeper"):
        fix = "`p3d train -m` sweeps the combinations of comma-separated values (a,b), range() and choice()"
    else:
        fix = "remove it"
    return f"{override}: p3d does not apply this Hydra setting; {fix}"


def group_presets(group: str, config_dirs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """A group's preset files by name, as the search path finds them (the user's directories first)."""
    found: dict[str, Path] = {}
    for directory in [*checked_config_dirs(config_dirs), conf_dir()]:
        for preset in sorted((directory / group).glob("*.yaml")):
            found.setdefault(preset.stem, preset)
    if group == "recipe":
        for recipe in sorted(recipes_dir().glob("*.yaml")):
            found.setdefault(recipe.stem, recipe)
    return dict(sorted(found.items()))


def config_groups(config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Every config group: p3d's, those of the user's directories, and recipe."""
    groups = {path.name for directory in [*checked_config_dirs(config_dirs), conf_dir()] for path in directory.iterdir() if path.is_dir()}
    return sorted(groups - {"recipe"}) + ["recipe"]


def unknown_keys(cfg: DictConfig, schema: type = P3DConfig, prefix: str = "") -> list[str]:
    """Keys of the composed config that the schema does not declare (`+key=value` adds them past Hydra's
    own check). Fields typed Dict/Any, such as model.config (Hugging Face fields), stay open."""
    hints = typing.get_type_hints(schema)
    declared = {item.name for item in dataclasses.fields(schema)}
    unknown = []
    for key, node in cfg.items_ex(resolve=False):
        path = f"{prefix}{key}"
        if key not in declared:
            unknown.append(path)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node, DictConfig):
            unknown += unknown_keys(node, hints[key], f"{path}.")
    return unknown


def _unknown_key_line(key: str) -> str:
    """`train.stepz: unknown config key (did you mean train.steps?)`, from the schema's own key names."""
    section, _, name = key.rpartition(".")
    schema = P3DConfig
    for part in filter(None, section.split(".")):
        schema = typing.get_type_hints(schema).get(part)
    names = [item.name for item in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    close = difflib.get_close_matches(name, names, n=1)
    fix = f"did you mean {section + '.' if section else ''}{close[0]}?" if close else "check the spelling"
    return f"{key}: unknown config key; {fix} (docs/config.md lists every key, `p3d ls` the presets)"


def run_id(overrides: Sequence[str]) -> str:
    """A short id shared by all ranks (it depends only on the overrides, never on a clock)."""
    kept = sorted(o.lstrip("+~") for o in overrides if not _is_layout_override(o.lstrip("+~")))
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:8]


def _is_layout_override(override: str) -> bool:
    key = override.split("=", 1)[0]
    return any(key == prefix or key.startswith(prefix + ".") for prefix in _RUN_ID_EXCLUDED)


def describe_compose_error(error: BaseException, config_dirs: Sequence[str | Path] = ()) -> str:
    """One line for Hydra's and OmegaConf's multi-line composition messages."""
    if isinstance(error, MissingConfigException):
        return _describe_missing(error, config_dirs)
    chain = []
    current: BaseException | None = error
    while current is not None:
        chain.append(current)
        current = current.__cause__ or current.__context__
    overridden = next((m.group(1) for link in chain if (m := re.search(r"(?:Could not override '|Error merging override )([^'=]+)", str(link)))), None)
    for link in chain:
        full_key = getattr(link, "full_key", None)
        if isinstance(link, OmegaConfBaseException) and full_key:
            reason = str(link).splitlines()[0]
            if overridden and not full_key.startswith(overridden.split(".")[0]):
                # a key inside a list item (data.sources=[{...}]): OmegaConf names it relative to the item
                return f"{overridden}: {reason} (docs/config.md lists the keys of {overridden}[])"
            if "not in" in reason or "is not in struct" in reason:
                return _unknown_key_line(full_key)
            if isinstance(link, InterpolationResolutionError):
                return f"{full_key}: {reason}; an interpolation names an existing key (${{model.name}}), ${{now:...}} or ${{oc.env:VAR}}"
            return f"{full_key}: {reason}"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    override = re.search(r"Could not override '([^']+)'", text)
    if override:
        return _unknown_key_line(override.group(1))
    sweep = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if sweep:
        return (
            f"{sweep.group(1)}: several values; add -m (`p3d train -m ...`) to run one job per value, "
            "or write a list as key=[a,b] or a string with a comma as key='a,b'"
        )
    return text


def _describe_missing(error: MissingConfigException, config_dirs: Sequence[str | Path]) -> str:
    text = str(error)
    match = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if not match:
        match = re.search(r"In '[^']*': Could not find '([^/']+)/([^']+)'", text)
    if match:
        group, name = match.groups()
        options = ", ".join(group_presets(group, config_dirs)) or "none"
        if group == layouts.GROUP:
            return f"{group}={name}: no such preset or layout name; {layouts.describe_bad_name(name)}; or a preset: {options}"
        return f"{group}={name}: no such preset in group '{group}' (available: {options}); or write DIR/{group}/{name}.yaml and pass --config-dir DIR"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
