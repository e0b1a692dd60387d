"""Compose the p3d config with Hydra from `conf/`, `recipes/` and command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from p3d.config.schema import P3DConfig
from p3d.errors import ConfigError

SCHEMA_NAME = "p3d_schema"
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Overrides that change how a run is laid out or reported, not what it computes: they do not
# change the default run directory, so rerunning with another layout or more steps resumes.
_RUN_ID_EXCLUDED = ("parallel", "train.steps", "train.micro_batch_size", "checkpoint", "logging", "run", "dist")


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
    """Store the schema and every recipe in Hydra's ConfigStore (once per process)."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=P3DConfig)
    for recipe in sorted(recipes_dir().glob("*.yaml")):
        store.store(group="recipe", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_")


def _normalise_overrides(overrides: Sequence[str]) -> list[str]:
    """`model.config.<field>=v` may name any Hugging Face config field, present in the preset or not."""
    normalised = []
    for override in overrides:
        if override.startswith("model.config.") and "=" in override:
            override = "++" + override
        normalised.append(override)
    return normalised


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with the overrides; every problem becomes a one-line ConfigError."""
    for override in overrides:
        if override.startswith("-"):
            raise ConfigError(f"{override}: p3d takes only key=value overrides here (Hydra flags and multirun are not supported)")
    refused = [problem for problem in map(_hydra_setting_problem, overrides) if problem]
    if refused:
        raise ConfigError(refused)
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=_normalise_overrides(overrides))
        unknown = unknown_keys(cfg)
        if unknown:
            raise ConfigError([_unknown_key_line(key) for key in unknown])
        # Resolved once, to a plain string: OmegaConf re-resolves an interpolation on every access,
        # and `${now:...}` or any custom resolver must name one directory for the whole run.
        run_dir = cfg.run.dir
        if run_dir is None:
            run_dir = Path(cfg.run.root) / f"{cfg.model.name}-{run_id(overrides)}"
        set_run_dir(cfg, str(run_dir))
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves, or fails here with its key
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(describe_compose_error(error)) from error
    return cfg


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
    """Hydra's own settings (`hydra.*`, `hydra/<group>=`) are not applied by p3d: refuse them rather than ignore them."""
    key = override.lstrip("+~").split("=", 1)[0]
    if key != "hydra" and not key.startswith(("hydra.", "hydra/")):
        return None
    if key in ("hydra.run.dir", "hydra.sweep.dir", "hydra.runtime.output_dir"):
        fix = "set run.dir=... for the output directory"
    elif key == "hydra/launcher":
        fix = "launch with `p3d train` (--nnodes, --nproc-per-node) or torchrun (examples/slurm/p3d.sbatch for Slurm)"
    else:
        fix = "remove it"
    return f"{override}: p3d does not apply Hydra's own settings (hydra.*, hydra/<group>) yet; {fix}"


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


def describe_compose_error(error: BaseException) -> str:
    """One line for Hydra's and OmegaConf's multi-line composition messages."""
    if isinstance(error, MissingConfigException):
        return _describe_missing(error)
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
    return text


def _describe_missing(error: MissingConfigException) -> str:
    text = str(error)
    match = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if not match:
        match = re.search(r"In '[^']*': Could not find '([^/']+)/([^']+)'", text)
    if match:
        group, name = match.groups()
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        if group == "recipe":
            options = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
        return f"{group}={name}: no such preset in group '{group}' (available: {', '.join(options) or 'none'})"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
