"""ParallelDims: the one object that owns the layout (sizes, rank coordinates, named meshes).

Data parallelism has two factors, as in torchtitan: dp = dp_replicate x dp_shard. The model
state is sharded (FSDP2) over the dp_shard x cp ranks and replicated over dp_replicate (HSDP when
both are > 1). With dp_shard = 1 and dp_replicate > 1 nothing is sharded: the model is replicated
on every dp x cp rank and gradients are all-reduced over them (DDP-style). `parallel.dp` stays the
data-parallel degree; dp_shard = -1 takes dp / dp_replicate, so the default (dp_replicate = 1) is
FSDP over dp x cp, as before the two keys existed.

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

# Mesh dimension order: tp innermost (neighbouring ranks, the fastest links), dp outermost, its
# replicas outside its shards (a shard group on neighbouring ranks, as in torchtitan's HSDP).
MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int
    ep: int = 1
    dp_replicate: int = 1

    @classmethod
    def resolve(cls, dp: int, cp: int, tp: int, world_size: int, ep: int = 1, dp_replicate: int = 1, dp_shard: int = -1) -> "ParallelDims":
        """Sizes for this world; dp=-1 takes what cp and tp leave (or dp_replicate x dp_shard when dp_shard is
        given), dp_shard=-1 takes dp / dp_replicate. Raises ConfigError if they do not fit."""
        for key, value in (("parallel.cp", cp), ("parallel.tp", tp), ("parallel.dp_replicate", dp_replicate)):
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if dp_shard != -1 and dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard={dp_shard}: must be >= 1, or -1 to take parallel.dp / parallel.dp_replicate")
        if dp != -1 and dp_shard != -1 and dp != dp_replicate * dp_shard:
            raise ConfigError(
                f"parallel.dp={dp} but parallel.dp_replicate*parallel.dp_shard = {dp_replicate}*{dp_shard} = {dp_replicate * dp_shard}: "
                f"leave parallel.dp_shard=-1 (it takes parallel.dp / parallel.dp_replicate) or make the product {dp}"
            )
        dp_keys, fix_keys = "parallel.dp", "parallel.dp/cp/tp"
        if dp == -1 and dp_shard != -1:
            dp, dp_keys, fix_keys = dp_replicate * dp_shard, "parallel.dp_replicate*parallel.dp_shard", "parallel.dp_replicate/dp_shard/cp/tp"
        if dp == -1:
            if world_size % (cp * tp):
                raise ConfigError(
                    f"parallel.cp*parallel.tp = {cp}*{tp} does not divide the world size {world_size}: "
                    f"launch a multiple of {cp * tp} processes or change parallel.cp / parallel.tp"
                )
            dp = world_size // (cp * tp)
        elif dp < 1:
            raise ConfigError(f"parallel.dp={dp}: must be >= 1, or -1 to infer it from the world size")
        if dp % dp_replicate:
            raise ConfigError(f"parallel.dp_replicate={dp_replicate} does not divide the data-parallel degree dp={dp}: choose a parallel.dp_replicate that divides {dp}")
        if dp * cp * tp != world_size:
            raise ConfigError(
                f"{dp_keys}*parallel.cp*parallel.tp = {dp}*{cp}*{tp} = {dp * cp * tp} but the world size is {world_size}: "
                f"launch {dp * cp * tp} processes (e.g. {launch_example(dp * cp * tp)}) or change {fix_keys}"
            )
        if ep > 1 and dp_replicate > 1:
            raise ConfigError(f"parallel.ep={ep} with parallel.dp_replicate={dp_replicate}: expert parallelism is not combined with replicated data parallelism yet; use parallel.dp_replicate=1 or parallel.ep=1")
        if (dp * cp) % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide dp*cp = {dp}*{cp} = {dp * cp} (expert parallelism borrows the dp x cp ranks): choose an ep that divides {dp * cp}")
        if ep > 1 and tp > 1:
            raise ConfigError(f"parallel.ep={ep} with parallel.tp={tp}: experts are split over tp or over ep, not both; use parallel.ep=1 (experts split over tp) or parallel.tp=1")
        return cls(dp=dp, cp=cp, tp=tp, ep=ep, dp_replicate=dp_replicate)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def dp_cp(self) -> int:
        """Ranks that hold different data (data and context parallel together): gradients are summed over them."""
        return self.dp * self.cp

    @property
    def replicated(self) -> bool:
        """dp_shard = 1 with dp_replicate > 1: the whole (TP-local) model on every dp x cp rank, gradients all-reduced."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def hybrid(self) -> bool:
        """HSDP: sharded over dp_shard x cp, replicated over dp_replicate."""
        return self.dp_replicate > 1 and self.dp_shard > 1

    @property
    def shard_ranks(self) -> int:
        """Ranks that FSDP shards the model state over: dp_shard x cp, or 1 when replicated."""
        return 1 if self.replicated else self.dp_shard * self.cp

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> its (dp, cp, tp) coordinates, tp varying fastest."""
        return {"dp": rank // (self.cp * self.tp), "cp": (rank // self.tp) % self.cp, "tp": rank % self.tp}

    def mesh_coordinates(self, rank: int) -> dict[str, int]:
        """Rank -> its coordinate on every named mesh dimension, the flattened and unflattened views of
        Meshes included (dp_cp, HSDP's dp_replicate x dp_shard_cp, the experts' efsdp x ep)."""
        coords = self.coords(rank)
        dp_cp = coords["dp"] * self.cp + coords["cp"]
        shard_cp = self.dp_shard * self.cp
        return {
            **coords,
            "dp_replicate": coords["dp"] // self.dp_shard,
            "dp_shard": coords["dp"] % self.dp_shard,
            "dp_cp": dp_cp,
            "dp_shard_cp": dp_cp % shard_cp,  # Meshes.data_parallel: replicas outside their shards
            "efsdp": dp_cp // self.ep,
            "ep": dp_cp % self.ep,  # Meshes.experts: ep innermost
            "vocab": rank,  # Meshes.vocab: every rank
        }

    @property
    def efsdp(self) -> int:
        """Ranks that hold the same experts (FSDP shards the experts over them)."""
        return self.dp_cp // self.ep

    def describe(self) -> str:
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        replicas = f" dp_replicate={self.dp_replicate} dp_shard={self.dp_shard}" if self.dp_replicate > 1 else ""
        return f"dp={self.dp} cp={self.cp} tp={self.tp}{ep}{replicas} (world {self.world_size})"


class Meshes:
    """The (dp_replicate, dp_shard, cp, tp) DeviceMesh and its named views."""

    def __init__(self, dims: ParallelDims, device_type: str):
        self.dims = dims
        sizes = (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
        self.world: DeviceMesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)

    @cached_property
    def dp(self) -> DeviceMesh:
        """All data-parallel ranks (replicas and shards): the batch is split over them."""
        return flatten_mesh(self.world, ("dp_replicate", "dp_shard"), "dp")

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]

    @property
    def tp(self) -> DeviceMesh:
        return self.world["tp"]

    @cached_property
    def dp_cp(self) -> DeviceMesh:
        """Ranks holding different data: losses and gradients are summed over this 1-D view."""
        return flatten_mesh(self.world, ("dp_replicate", "dp_shard", "cp"), "dp_cp")

    @cached_property
    def vocab(self) -> DeviceMesh:
        """Every rank as one 1-D view: a vocabulary-parallel head is sharded over it (parallel.vocab_parallel)."""
        return flatten_mesh(self.world, MESH_DIMS, "vocab")

    @cached_property
    def data_parallel(self) -> DeviceMesh:
        """The mesh FSDP2 is applied over: dp x cp (1-D) when only sharded or only replicated (see
        ParallelDims.replicated), else (dp_replicate, dp_shard_cp) for HSDP."""
        if not self.dims.hybrid:
            return self.dp_cp
        return unflatten_mesh(self.dp_cp, (self.dims.dp_replicate, self.dims.shard_ranks), ("dp_replicate", "dp_shard_cp"))

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
