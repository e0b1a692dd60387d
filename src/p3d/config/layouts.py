"""Parallel layouts by name, for any sizes: `parallel=tp2dp4cp2`, `parallel=dp8`, `parallel=tp2cp2`.

A layout name gives mesh dimensions as <prefix><size>, in the order of LAYOUT_DIMS; a dimension
left out takes its default (tp and cp 1, dp -1: whatever the world size leaves). There is no YAML
file per combination: a Hydra config source (`p3d-layouts://`, after p3d's conf/ in the search
path) answers `parallel/<name>` for every well-formed name, so a name works on the command line,
in a recipe's defaults list and in a sweep (`parallel=tp2dp2cp2,dp8`), and a preset file of the
same name (conf/parallel/, or a user's --config-dir) still takes precedence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

GROUP = "parallel"


@dataclass(frozen=True)
class LayoutDim:
    prefix: str  # in the name: tp2
    key: str  # the parallel.* key it sets
    default: int  # its value when the name leaves it out


# The dimensions a layout name may give, in name order. A new mesh dimension (dp_replicate, ep)
# adds one row here once its key exists in ParallelConfig; names, `p3d ls` and the tuner follow.
LAYOUT_DIMS = (LayoutDim("tp", "tp", 1), LayoutDim("dp", "dp", -1), LayoutDim("cp", "cp", 1))

GRAMMAR = "".join(f"{dim.prefix}{{{dim.prefix[0].upper()}}}" for dim in LAYOUT_DIMS)  # tp{T}dp{D}cp{C}
EXAMPLES = "tp2dp4cp2, dp8, tp2cp2"
_NAME = re.compile("".join(f"(?:{dim.prefix}([1-9][0-9]*))?" for dim in LAYOUT_DIMS))


def parse_layout_name(name: str) -> dict[str, int] | None:
    """{'tp': 2, 'dp': 4, 'cp': 2} for 'tp2dp4cp2', defaults for the parts left out; None if not a layout name."""
    match = _NAME.fullmatch(name)
    if not name or match is None:
        return None
    return {dim.key: int(size) if size else dim.default for dim, size in zip(LAYOUT_DIMS, match.groups())}


def layout_name(sizes: dict[str, int]) -> str:
    """The shortest name of a layout: dp always (unless it is -1), other dimensions when not 1."""
    parts = []
    for dim in LAYOUT_DIMS:
        size = sizes.get(dim.key, dim.default)
        if size != dim.default or (dim.key == "dp" and size != -1):
            parts.append(f"{dim.prefix}{size}")
    return "".join(parts) or "default"


def describe_bad_name(name: str) -> str:
    """The fix for a `parallel=` name that is neither a preset nor a layout name."""
    return (
        f"layouts are named {GRAMMAR} with whole sizes >= 1, any part left out (tp and cp 1, dp filling the world), "
        f"in this order: {EXAMPLES}"
    )


class LayoutSource(ConfigSource):
    """Hydra config source of every well-formed layout name in group `parallel`."""

    @staticmethod
    def scheme() -> str:
        return "p3d-layouts"

    def load_config(self, config_path: str) -> ConfigResult:
        sizes = self._sizes(config_path)
        if sizes is None:
            raise ConfigLoadError(f"{config_path}: not a layout name; {describe_bad_name(config_path)}")
        return ConfigResult(config=OmegaConf.create(sizes), path=self.full_path(), provider=self.provider, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") == GROUP

    def is_config(self, config_path: str) -> bool:
        return self._sizes(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        return []  # infinitely many; `p3d ls` shows the grammar

    @staticmethod
    def _sizes(config_path: str) -> dict[str, int] | None:
        group, _, name = config_path.strip("/").partition("/")
        if group != GROUP:
            return None
        return parse_layout_name(name[: -len(".yaml")] if name.endswith(".yaml") else name)
