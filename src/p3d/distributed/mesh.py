"""ParallelDims: the one object that owns the layout (sizes, rank coordinates, named meshes)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from p3d.errors import ConfigError
from p3d.compat import flatten_mesh

# Mesh dimension order: tp innermost (neighbouring ranks, the fastest links), dp outermost.
MESH_DIMS = ("dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int

    @classmethod
    def resolve(cls, dp: int, cp: int, tp: int, world_size: int) -> "ParallelDims":
        """Sizes for this world; dp=-1 takes what cp and tp leave. Raises ConfigError if they do not fit."""
        for key, value in (("parallel.cp", cp), ("parallel.tp", tp)):
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if dp == -1:
            if world_size % (cp * tp):
                raise ConfigError(
                    f"parallel.cp*parallel.tp = {cp}*{tp} does not divide the world size {world_size}: "
                    f"launch a multiple of {cp * tp} processes or change parallel.cp / parallel.tp"
                )
            dp = world_size // (cp * tp)
        elif dp < 1:
            raise ConfigError(f"parallel.dp={dp}: must be >= 1, or -1 to infer it from the world size")
        if dp * cp * tp != world_size:
            raise ConfigError(
                f"parallel.dp*parallel.cp*parallel.tp = {dp}*{cp}*{tp} = {dp * cp * tp} but the world size is {world_size}: "
                f"launch {dp * cp * tp} processes (e.g. torchrun --nproc_per_node={dp * cp * tp}) or change parallel.dp/cp/tp"
            )
        return cls(dp=dp, cp=cp, tp=tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def dp_cp(self) -> int:
        """Ranks that FSDP shards parameters over (data and context parallel together)."""
        return self.dp * self.cp

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> its (dp, cp, tp) coordinates, tp varying fastest."""
        return {"dp": rank // (self.cp * self.tp), "cp": (rank // self.tp) % self.cp, "tp": rank % self.tp}

    def mesh_coordinates(self, rank: int) -> dict[str, int]:
        """Rank -> its coordinate on every named mesh dimension, the flattened `dp_cp` (Meshes.dp_cp) included."""
        coords = self.coords(rank)
        return {**coords, "dp_cp": coords["dp"] * self.cp + coords["cp"]}

    def describe(self) -> str:
        return f"dp={self.dp} cp={self.cp} tp={self.tp} (world {self.world_size})"


class Meshes:
    """The (dp, cp, tp) DeviceMesh and its named views."""

    def __init__(self, dims: ParallelDims, device_type: str):
        self.dims = dims
        self.world: DeviceMesh = init_device_mesh(device_type, (dims.dp, dims.cp, dims.tp), mesh_dim_names=MESH_DIMS)

    @property
    def dp(self) -> DeviceMesh:
        return self.world["dp"]

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]

    @property
    def tp(self) -> DeviceMesh:
        return self.world["tp"]

    @cached_property
    def dp_cp(self) -> DeviceMesh:
        """FSDP2 shards over this 1-D view; losses are summed over it."""
        return flatten_mesh(self.world, ("dp", "cp"), "dp_cp")
