"""`p3d plan`: what a config will do on N ranks, worked out without any process group or GPU.

It validates the config for the world size, maps ranks to (dp, cp, tp), estimates each rank's
memory from the model's real parameter shapes and the TP plan, and lists the collectives of a
step. The memory model follows what p3d allocates:

- fp32 master weights, fp32 gradients (none kept with optim.in_backward) and the optimizer's fp32
  state (AdamW's two moments; see optimizer_state_numel for the others), each sharded by TP
  (planned modules) and then by FSDP over the ranks ParallelDims.shard_ranks names (dp_shard x cp;
  none when replicated: every rank holds all of it) (Adafactor's small row and column factors are whole);
- step transients: FSDP's working set (the root unit unsharded throughout; untied embeddings
  and output head as units of their own, gathered only around their use; a block's unsharded
  weights, gradients and fp32 reduce-scatter buffer, the next block prefetched; with
  parallel.reshard_after_forward=false every block's weights kept from forward to backward), when
  replicated FSDP2's unsharded copy of every weight from forward to backward and a bucket's
  gradients before their all-reduce, with gradients reduced once per step the unsharded gradients
  held across the micro-batches, or without FSDP a tied output head's second gradient;
- activations saved for backward per block (fewer with activation checkpointing; the norm and
  residual tensors split over tp with sequence parallelism), what attention keeps (the model's
  own: scores of the local queries over the whole sequence; p3d's ring: only the local queries'
  log-sum-exp; allgather: the gathered keys and values), and the logits;
- a per-process baseline (torch, transformers, datasets imports), measured on this stack;
- on CPU, memory the C allocator retains: half of what a step allocates and frees (measured);
- mixture-of-experts layers under expert parallelism: a block gathers only its `experts / ep`
  experts (over the efsdp ranks that hold them), and each MoE layer sends its routed tokens to
  the experts' ranks and back by all-to-all (the traffic assumes evenly spread routing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from torch import nn

from p3d.config.schema import ACMode, CPImpl, DType, OptimConfig, P3DConfig
from p3d.config.validate import ValidatedSetup
from p3d.distributed.env import resolve_device_type
from p3d.model import build_meta_model
from p3d.models import architecture, decoder_blocks, experts_modules
from p3d.optim import muon_matrices, setting
from p3d.parallel.context import uses_p3d_attention
from p3d.parallel.fsdp import REDUCE_BYTES, embedding_units, replicate_buckets, syncs_every_micro_batch
from p3d.parallel.activation import checkpointed_block_indices
from p3d.parallel.tensor import tp_sharded_parameters

GB = 2**30
FP32 = 4
# Peak RSS of a process that has imported what a rank imports (torch 2.13 CPU, transformers 5.23,
# datasets), measured by benchmarks/memory.py; on a GPU this is host memory, not device memory.
PROCESS_BASELINE_GB = 0.41
DTYPE_BYTES = {DType.fp32: 4, DType.bf16: 2}
# On CPU, glibc keeps freed mid-size blocks (< 32 MiB: activations, per-parameter copies) in its
# heap, so peak RSS exceeds the live tensors by a share of what a step allocates and frees.
# Measured here (benchmarks/memory.py, OPT and Llama shapes, 1 to 8 ranks): about half of it.
CPU_HEAP_RETENTION = 0.5


@dataclass
class MemoryEstimate:
    """Per-rank peak memory estimate, in GB."""

    baseline: float
    weights: float
    gradients: float
    optimizer: float
    step_transients: float
    activations: float
    logits: float
    allocator_retention: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def rows(self) -> list[tuple[str, float]]:
        return [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)] + [("total", self.total)]


@dataclass
class Collective:
    name: str
    group: str
    per_step: int
    megabytes_per_step: float


def _tp_divisor(name: str, matched: set[str], tp: int) -> int:
    """How many ways TP splits a parameter (1 for replicated ones: outside the plan, a rowwise layer's bias, ...)."""
    return tp if name in matched else 1


def _sharded(model: nn.Module, plan: dict[str, str], tp: int) -> set[str]:
    return tp_sharded_parameters(model, plan) if tp > 1 else set()


def local_parameter_numel(model: nn.Module, plan: dict[str, str], tp: int, shard_ranks: int) -> int:
    matched = _sharded(model, plan, tp)
    total = 0
    for name, param in model.named_parameters():
        total += -(-param.numel() // (_tp_divisor(name, matched, tp) * shard_ranks))
    return total


def optimizer_state_numel(model: nn.Module, plan: dict[str, str], tp: int, shard_ranks: int, optim: OptimConfig) -> int:
    """Elements of optimizer state one rank keeps (in the weights' dtype): AdamW's and Adam's two moments,
    SGD's momentum (if any), Muon's momentum for its matrices and AdamW's moments for the rest, and
    Adafactor's whole row and column factors of each matrix (every rank holds them) and a second
    moment for each vector."""
    name = optim.name.value
    matched = _sharded(model, plan, tp)
    matrices = {id(param) for param in muon_matrices(model)} if name == "muon" else set()
    total = 0
    for param_name, param in model.named_parameters():
        local = -(-param.numel() // (_tp_divisor(param_name, matched, tp) * shard_ranks))
        if name == "adafactor":
            total += param.numel() // param.shape[-1] + param.numel() // param.shape[-2] if param.ndim > 1 else local
        elif name == "sgd":
            total += local if setting(optim, "momentum") else 0
        else:
            total += local if id(param) in matrices else 2 * local
    return total


def _unit_numel(module: nn.Module, matched: set[str], tp: int, prefix: str, exclude: set[int]) -> int:
    total = 0
    for name, param in module.named_parameters():
        if id(param) not in exclude:
            total += param.numel() // _tp_divisor(f"{prefix}{name}", matched, tp)
    return total


@dataclass(frozen=True)
class FsdpUnit:
    """TP-local element counts of one FSDP unit while it is unsharded."""

    weights: int
    extra_gradients: int  # a tied output head's gradient coexists with the embedding's

    def working_set_bytes(self, compute_bytes: int) -> int:
        """Unsharded weights and gradients in the compute dtype, plus the fp32 reduce-scatter buffer."""
        return self.weights * compute_bytes + (self.weights + self.extra_gradients) * compute_bytes + self.weights * FP32


def expert_numel(model: nn.Module) -> int:
    """Elements of all experts' weights (mixture-of-experts layers)."""
    return sum(p.numel() for _, module in experts_modules(model) for p in module.parameters(recurse=False))


def fsdp_units(model: nn.Module, plan: dict[str, str], tp: int, ep: int = 1) -> tuple[FsdpUnit, list[FsdpUnit], list[FsdpUnit]]:
    """The root unit, the untied embedding units (input, output head) and one unit per decoder block.

    This mirrors p3d.parallel.fsdp.apply_fsdp: a tied embedding stays in the root unit; under
    expert parallelism a block's experts are gathered only for this rank's `experts / ep`.
    """
    matched = _sharded(model, plan, tp)
    if ep > 1:
        off_rank = {id(p): p.numel() - p.numel() // ep for _, module in experts_modules(model) for p in module.parameters(recurse=False)}
        blocks_with_experts = [
            FsdpUnit(_unit_numel(block, matched, tp, "", set()) - sum(off_rank.get(id(p), 0) for p in block.parameters()), 0)
            for block in decoder_blocks(model)
        ]
    names = {module: name for name, module in model.named_modules()}
    blocks = decoder_blocks(model)
    own_unit = {id(p) for block in blocks for p in block.parameters()}
    tied = 0
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        tied = output.weight.numel() // _tp_divisor(names[output] + ".weight", matched, tp)
    embeddings = []
    for unit, _ in embedding_units(model):
        embeddings.append(FsdpUnit(_unit_numel(unit, matched, tp, names[unit] + ".", set()), 0))
        own_unit |= {id(p) for p in unit.parameters()}
    root = FsdpUnit(_unit_numel(model, matched, tp, "", own_unit), tied)
    if ep > 1:
        return root, embeddings, blocks_with_experts
    return root, embeddings, [FsdpUnit(_unit_numel(block, matched, tp, names[block] + ".", set()), 0) for block in blocks]


@dataclass(frozen=True)
class DataParallelStep:
    """How a step's data parallelism runs, as p3d.parallel.fsdp decides it for the config."""

    replicated: bool = False  # dp_shard=1 with dp_replicate > 1
    reshard_after_forward: bool = True
    micro_batches: int = 1
    every_micro_batch: bool = True  # gradients reduced after every micro-batch (else after the last only)

    @classmethod
    def of(cls, config: P3DConfig, dims) -> "DataParallelStep":
        micro_batches = config.train.global_batch_size // (config.train.micro_batch_size * dims.dp)
        return cls(
            replicated=dims.replicated,
            reshard_after_forward=config.parallel.reshard_after_forward,
            micro_batches=micro_batches,
            every_micro_batch=syncs_every_micro_batch(config.parallel.grad_sync, sharded=dims.shard_ranks > 1),
        )

    @property
    def syncs(self) -> int:
        """Gradient reductions per step."""
        return self.micro_batches if self.every_micro_batch else 1

    @property
    def holds_gradients(self) -> bool:
        """Unsharded gradients accumulate across the micro-batches before they are reduced."""
        return self.micro_batches > 1 and not self.every_micro_batch


def replicated_units(blocks: list[FsdpUnit], total: int) -> list[int]:
    """TP-local element counts of the replicated mode's units: its gradient buckets, then the root (the rest)."""
    buckets = [sum(blocks[index].weights for index in bucket) for bucket in replicate_buckets([block.weights * REDUCE_BYTES for block in blocks])]
    return [*buckets, total - sum(buckets)]


def transient_bytes(model: nn.Module, plan: dict[str, str], tp: int, sharded: bool, compute_bytes: int, ep: int = 1, step: DataParallelStep = DataParallelStep()) -> int:
    """Memory that exists only during a step, beyond the sharded state.

    With FSDP the root unit stays unsharded through forward and backward. On top of it, the
    largest of: an embedding unit's working set (the output head's as the backward starts, the
    input embedding's as it ends), or a block's with the next block prefetched and the all-gather
    output buffer it is copied out of. Without resharding after forward every block's (and the
    input embedding's) weights stay gathered until its backward. Replicated, FSDP2 keeps an
    unsharded copy of every weight from forward to backward, and a bucket's gradients exist in the
    compute dtype before they are all-reduced into the stored ones. Sharded gradients reduced only
    after a step's last micro-batch are held unsharded and in fp32, for the whole model, until then
    (replicated ones take the place of the stored gradients, which every step frees; with
    train.master_dtype=bf16 they are twice their size, which is not counted). Without FSDP: a
    tied output head's gradient is buffered beside the embedding's.
    """
    root, embeddings, blocks = fsdp_units(model, plan, tp, ep)
    if not sharded:
        return root.extra_gradients * compute_bytes
    total = root.weights + sum(unit.weights for unit in (*embeddings, *blocks))
    if step.replicated:  # gradients held across micro-batches take the place of the stored ones (freed every step)
        return total * compute_bytes + max(replicated_units(blocks, total)) * compute_bytes
    held = total * FP32 if step.holds_gradients else 0  # FSDP2 accumulates them in the reduce dtype
    largest_block = max(blocks, key=lambda unit: unit.weights, default=FsdpUnit(0, 0))
    if not step.reshard_after_forward:
        kept = sum(unit.weights for unit in blocks) + (embeddings[0].weights if embeddings else 0)
        working = max(unit.working_set_bytes(compute_bytes) - unit.weights * compute_bytes for unit in (largest_block, *embeddings))
        return (root.weights + kept) * compute_bytes + root.extra_gradients * compute_bytes + working + held
    phases = [
        largest_block.working_set_bytes(compute_bytes) + 2 * largest_block.weights * compute_bytes,
        *(unit.working_set_bytes(compute_bytes) for unit in embeddings),
    ]
    return max(root.working_set_bytes(compute_bytes), root.weights * compute_bytes + max(phases)) + held


def estimate_memory(config: P3DConfig, setup: ValidatedSetup, model: nn.Module | None = None, on_cpu: bool = True) -> MemoryEstimate:
    model = model or build_meta_model(setup.hf_config)
    dims = setup.dims
    text = setup.hf_config.get_text_config()
    compute_bytes = DTYPE_BYTES[config.train.dtype]
    weights = local_parameter_numel(model, setup.tp_plan, dims.tp, dims.shard_ranks) * DTYPE_BYTES[config.train.master_dtype]
    gradients = 0 if config.optim.in_backward else weights
    fsdp = dims.dp_cp > 1 or config.train.dtype is not DType.fp32  # FSDP2 is applied
    transients = transient_bytes(model, setup.tp_plan, dims.tp, fsdp, compute_bytes, dims.ep, step=DataParallelStep.of(config, dims))
    activations = _activation_bytes(config, setup, text, dims, len(decoder_blocks(model)), compute_bytes)
    local_tokens = config.train.micro_batch_size * config.data.seq_len // dims.cp
    logits = local_tokens * text.vocab_size * (compute_bytes + 2 * FP32)  # logits, fp32 copy for the loss, its gradient
    churn = transients + activations + logits
    return MemoryEstimate(
        baseline=PROCESS_BASELINE_GB,
        weights=weights / GB,
        gradients=gradients / GB,
        optimizer=optimizer_state_numel(model, setup.tp_plan, dims.tp, dims.shard_ranks, config.optim) * DTYPE_BYTES[config.train.master_dtype] / GB,
        step_transients=transients / GB,
        activations=activations / GB,
        logits=logits / GB,
        allocator_retention=(CPU_HEAP_RETENTION * churn if on_cpu else 0.0) / GB,
    )


def _activation_bytes(config: P3DConfig, setup: ValidatedSetup, text, dims, blocks: int, compute_bytes: int) -> float:
    """Tensors a block keeps for backward, after Korthikanti et al. (2022), for p3d's layout.

    Per block and local token: ~8 hidden-size tensors (norm inputs/outputs, residuals, outputs of
    the row-parallel layers; split over tp with sequence parallelism), ~6 TP-sharded hidden-size
    tensors (q, k, v, attention output), 3 TP-sharded MLP tensors, plus what attention keeps.
    """
    sizes = architecture(setup.hf_config).sizes(setup.hf_config)
    hidden, intermediate, heads, kv_heads, head_dim = sizes.hidden, sizes.intermediate, sizes.heads, sizes.kv_heads, sizes.head_dim
    batch, seq_len = config.train.micro_batch_size, config.data.seq_len
    local_tokens = batch * seq_len // dims.cp
    residual_split = dims.tp if config.parallel.sequence_parallel else 1
    per_token = 8 * hidden / residual_split + 6 * hidden / dims.tp + 3 * intermediate / dims.tp
    if not uses_p3d_attention(dims.cp, config.data.packing) or setup.cp_impl is CPImpl.torch:
        attention = batch * (heads / dims.tp) * (seq_len / dims.cp) * seq_len  # scores of the local queries
    elif setup.cp_impl is CPImpl.allgather:
        attention = 2 * batch * seq_len * (kv_heads / dims.tp) * head_dim * FP32 / compute_bytes  # gathered fp32 K/V
    else:
        attention = local_tokens * (heads / dims.tp) * FP32 / compute_bytes  # ring: the fp32 log-sum-exp
    per_block = (local_tokens * per_token + attention) * compute_bytes
    checkpointed = len(checkpointed_block_indices(blocks, config.train.activation_checkpointing, config.train.ac_every))
    if config.train.activation_checkpointing is ACMode.none:
        return blocks * per_block
    kept_input = local_tokens * hidden * compute_bytes  # a checkpointed block keeps only its input
    return (blocks - checkpointed) * per_block + checkpointed * kept_input + per_block  # + one block recomputed


def collectives_per_step(config: P3DConfig, setup: ValidatedSetup, model: nn.Module | None = None) -> list[Collective]:
    model = model or build_meta_model(setup.hf_config)
    dims = setup.dims
    text = setup.hf_config.get_text_config()
    blocks = len(decoder_blocks(model))
    micro = config.train.global_batch_size // (config.train.micro_batch_size * dims.dp)
    compute_bytes = DTYPE_BYTES[config.train.dtype]
    local_tokens = config.train.micro_batch_size * config.data.seq_len // dims.cp
    hidden_mb = local_tokens * text.hidden_size * compute_bytes / 2**20
    collectives = []
    step = DataParallelStep.of(config, dims)
    matched = _sharded(model, setup.tp_plan, dims.tp)
    unsharded = sum(p.numel() // _tp_divisor(n, matched, dims.tp) for n, p in model.named_parameters())
    if dims.replicated:
        units = len(replicated_units(fsdp_units(model, setup.tp_plan, dims.tp)[2], unsharded))
        # a ring all-reduce sends (and receives) about twice the buffer
        collectives.append(Collective("gradient all-reduce (replicated, one per bucket of blocks and the root)", "dp_cp", step.syncs * units, step.syncs * 2 * unsharded * FP32 / 2**20))
    elif dims.dp_cp > 1:
        experts = expert_numel(model) if dims.ep > 1 else 0  # gathered over efsdp instead, this rank's share only
        units = blocks + 1
        shard_group = "dp_shard_cp" if dims.hybrid else "dp_cp"
        gathers, gathered = (2 * blocks + 1, 2) if step.reshard_after_forward else (blocks + 1, 1)  # per micro-batch; the root once
        collectives.append(Collective("FSDP all-gather of weights (forward and backward)", shard_group, micro * gathers, micro * gathered * (unsharded - experts) * compute_bytes / 2**20))
        collectives.append(Collective("FSDP reduce-scatter of gradients", shard_group, step.syncs * units, step.syncs * (unsharded - experts) * FP32 / 2**20))
        if dims.hybrid:
            collectives.append(Collective("HSDP all-reduce of gradient shards over the replicas", "dp_replicate", step.syncs * units, step.syncs * 2 * unsharded / dims.shard_ranks * FP32 / 2**20))
        if experts and dims.efsdp > 1:
            moe_layers = len(experts_modules(model))
            collectives.append(Collective("FSDP all-gather of this rank's experts (forward and backward)", "efsdp", micro * 2 * moe_layers, micro * 2 * experts / dims.ep * compute_bytes / 2**20))
            collectives.append(Collective("FSDP reduce-scatter of this rank's expert gradients", "efsdp", step.syncs * moe_layers, step.syncs * experts / dims.ep * FP32 / 2**20))
    if dims.ep > 1:
        moe_layers = len(experts_modules(model))
        share = architecture(setup.hf_config).active_expert_share(setup.hf_config)
        per_token = max(1, round(share * _expert_count(model)))  # (token, expert) pairs per token
        leaving_mb = local_tokens * per_token * text.hidden_size * compute_bytes * (dims.ep - 1) / dims.ep / 2**20
        collectives.append(Collective("EP all-to-all of routed tokens and their outputs (forward, backward), and per-expert counts", "ep", micro * moe_layers * 5, micro * moe_layers * 4 * leaving_mb))
    if dims.tp > 1 and config.parallel.sequence_parallel:
        collectives.append(Collective("TP all-gather of norm outputs and reduce-scatter of row-parallel outputs (sequence parallel)", "tp", micro * 8 * blocks, micro * 4 * blocks * hidden_mb))
    elif dims.tp > 1:
        collectives.append(Collective("TP all-reduce of row-parallel outputs and column-parallel input gradients", "tp", micro * 4 * blocks, micro * 4 * blocks * hidden_mb))
    if dims.cp > 1:
        sizes = architecture(setup.hf_config).sizes(setup.hf_config)
        kv_mb = config.train.micro_batch_size * config.data.seq_len * sizes.kv_heads / dims.tp * sizes.head_dim * compute_bytes / 2**20
        hops = dims.cp - 1
        if setup.cp_impl is CPImpl.ring:
            # forward: K/V pass cp-1 hops; backward: K/V again and dK/dV (cp hops, back to their owner)
            collectives.append(Collective("CP ring send/recv of K/V blocks (forward, backward) and dK/dV blocks", "cp", micro * blocks * (3 * hops + 1), micro * blocks * kv_mb / dims.cp * (3 * hops + 1)))
        elif setup.cp_impl is CPImpl.allgather:
            collectives.append(Collective("CP all-gather of keys and values; reduce-scatter of their gradients", "cp", micro * 2 * blocks, micro * 2 * blocks * kv_mb))
        else:
            collectives.append(Collective("CP ring attention of PyTorch (K/V rotation, forward and backward)", "cp", micro * blocks * 3 * hops, micro * blocks * kv_mb / dims.cp * 3 * hops))
    collectives.append(Collective("valid-token count (all-reduce)", "dp", 1, 0.0))
    collectives.append(Collective("loss (all-reduce)", "dp_cp", 1, 0.0))
    collectives.append(Collective("gradient norm and peak memory (all-reduce)", "world", 2, 0.0))
    return collectives


def _expert_count(model: nn.Module) -> int:
    from p3d.parallel.expert import expert_count

    found = experts_modules(model)
    return expert_count(found[0][1]) if found else 0


def experts_line(model: nn.Module, dims, master_bytes: int, compute_bytes: int) -> str | None:
    """What a rank keeps of the experts: stored (sharded over efsdp x ep = dp x cp, or over tp) and gathered to compute."""
    found = experts_modules(model)
    if not found:
        return None
    count, elements = _expert_count(model), expert_numel(model)
    split = dims.ep if dims.ep > 1 else dims.tp
    stored = elements / (dims.shard_ranks * (dims.tp if dims.ep == 1 else 1)) * master_bytes
    held = elements / split * compute_bytes
    return (
        f"# experts: {len(found)} layers of {count}, {count // split} per rank; expert weights per rank: "
        f"{stored / 2**20:,.1f} MB stored, {held / 2**20:,.1f} MB gathered to compute (of {elements * master_bytes / 2**20:,.1f} MB)"
    )


def machine_memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError):
        return None


def render(config: P3DConfig, setup: ValidatedSetup, resolved_yaml: str, world_size: int) -> str:
    model = build_meta_model(setup.hf_config)
    dims = setup.dims
    estimate = estimate_memory(config, setup, model, on_cpu=resolve_device_type(config.dist.device) == "cpu")
    lines = ["# resolved config", resolved_yaml.rstrip(), "", f"# validation: OK for world size {world_size} ({dims.describe()})", ""]
    lines += ["# ranks", "rank  dp  cp  tp"]
    for rank in range(dims.world_size):
        coords = dims.coords(rank)
        lines.append(f"{rank:>4}  {coords['dp']:>2}  {coords['cp']:>2}  {coords['tp']:>2}")
    accumulation = config.train.global_batch_size // (config.train.micro_batch_size * dims.dp)
    total_params = sum(p.numel() for p in model.parameters())
    lines += [
        "",
        f"# model: {total_params / 1e6:,.1f}M parameters; this rank holds {local_parameter_numel(model, setup.tp_plan, dims.tp, dims.shard_ranks) / 1e6:,.1f}M",
        f"# batch: {config.train.global_batch_size} sequences x {config.data.seq_len} tokens per step; "
        f"{config.train.micro_batch_size} per dp rank per forward, {accumulation} accumulation step(s); "
        f"{config.train.micro_batch_size * config.data.seq_len // dims.cp} tokens per rank per forward",
    ]
    experts = experts_line(model, dims, DTYPE_BYTES[config.train.master_dtype], DTYPE_BYTES[config.train.dtype])
    if experts is not None:
        lines.append(experts)
    lines += [
        "",
        "# memory per rank (estimate, GB)",
    ]
    lines += [f"{name:<18} {value:8.2f}" for name, value in estimate.rows()]
    job = estimate.total * dims.world_size
    machine = machine_memory_gb()
    lines.append(f"{'whole job':<18} {job:8.2f}   (all {dims.world_size} ranks on one machine)")
    if machine is not None and job > machine and os.environ.get("LOCAL_WORLD_SIZE") is None:
        lines.append(f"warning: {dims.world_size} ranks on this machine would need about {job:.1f} GB; it has {machine:.1f} GB")
    if dims.tp > 1:
        lines += ["", f"# tensor-parallel plan ({setup.plan_source})"]
        lines += [f"{style:<32} {pattern}" for pattern, style in setup.tp_plan.items()]
    lines += ["", "# collectives per step (count, MB moved per rank)"]
    for collective in collectives_per_step(config, setup, model):
        lines.append(f"{collective.per_step:>6}  {collective.megabytes_per_step:10.1f} MB  [{collective.group}] {collective.name}")
    return "\n".join(lines)
