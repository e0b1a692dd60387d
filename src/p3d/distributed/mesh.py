"""ParallelDims: the one object that owns the layout (sizes, rank coordinates, named meshes).

Expert parallelism borrows its ranks from dp x cp: the dp*cp ranks (FSDP's) are viewed as
(efsdp, ep), ep innermost. The ranks of one ep group hold different experts of each MoE layer and
exchange tokens; the ranks of one efsdp group hold the same experts and FSDP shards those over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from p3d.compat import flatten_mesh, unflatten_mesh
from p3d.distributed.env import launch_example
from p3d.errors import ConfigError

# Mesh dimension order: tp innermost (neighbouring ranks, the fastest links), dp outermost.
MESH_DIMS = ("dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int
    ep: int = 1

    @classmethod
    def resolve(cls, dp: int, cp: int, tp: int, world_size: int, ep: int = 1) -> "ParallelDims":
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
                f"launch {dp * cp * tp} processes (e.g. {launch_example(dp * cp * tp)}) or change parallel.dp/cp/tp"
            )
        if (dp * cp) % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide dp*cp = {dp}*{cp} = {dp * cp} (expert parallelism borrows the dp x cp ranks): choose an ep that divides {dp * cp}")
        if ep > 1 and tp > 1:
            raise ConfigError(f"parallel.ep={ep} with parallel.tp={tp}: experts are split over tp or over ep, not both; use parallel.ep=1 (experts split over tp) or parallel.tp=1")
        return cls(dp=dp, cp=cp, tp=tp, ep=ep)

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
        dp_cp = coords["dp"] * self.cp + coords["cp"]
        return {**coords, "dp_cp": dp_cp, "efsdp": dp_cp // self.ep, "ep": dp_cp % self.ep}  # Meshes.experts: ep innermost

    @property
    def efsdp(self) -> int:
        """Ranks that hold the same experts (FSDP shards the experts over them)."""
        return self.dp_cp // self.ep

    def describe(self) -> str:
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        return f"dp={self.dp} cp={self.cp} tp={self.tp}{ep} (world {self.world_size})"


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

    @cached_property
    def experts(self) -> DeviceMesh:
        """The dp*cp ranks as (efsdp, ep): experts split over ep, FSDP-sharded over efsdp."""
        return unflatten_mesh(self.dp_cp, (self.dims.efsdp, self.dims.ep), ("efsdp", "ep"))

    @property
    def ep(self) -> DeviceMesh:
        return self.experts["ep"]

    @property
    def efsdp(self) -> DeviceMesh:
        return self.experts["efsdp"]
