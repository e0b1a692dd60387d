"""`p3d plan`: what a config does on N ranks, found by running p3d's own parallel code on no data.

The plan makes this process rank 0 of a fake process group of the requested world size (torch's
`fake` backend: collectives do nothing) and builds the model on the meta device (shapes, no
memory). On it, the functions a training rank calls shard it as training does:

- `shard_for_compute` (TP, sequence parallelism, p3d's CP attention) on a model in the compute
  dtype, whose forward and backward for one micro-batch then run on the meta device. Every tensor
  autograd saves is recorded with the module that saved it, and so are the collectives TP and CP
  issue. Activations, logits and the loss's buffers are thus the model's own, for any architecture.
- `shard_for_compute` then `wrap_for_training` (activation checkpointing, FSDP2) on a model in the
  master dtype: each parameter's shard on every rank comes from its DTensor placements at that
  rank's mesh coordinates, and the FSDP2 units (which modules and parameters each holds, which stay
  gathered after forward, which mesh dimensions it shards and replicates over) from the wrapped
  modules' FSDP2 state. The data-parallel modes follow from it: sharded (FSDP over dp_shard x cp),
  HSDP (sharded over dp_shard_cp, replicated over dp_replicate: both groups' collectives) and
  replicated (FSDP2's `replicate`: whole shards, the unsharded copy kept from forward to backward,
  buckets of blocks as one unit, one all-reduce each); so do parallel.reshard_after_forward and
  parallel.grad_sync (parallel/fsdp.py decides when gradients are reduced; until then each rank
  holds its unsharded gradients).

No sharding rule is restated here. From these facts a step is replayed as a timeline of
allocations and frees (states, FSDP gathers, gradients and reduce-scatter buffers, activations,
logits and loss) and its peak is each rank's memory. Two terms are measured, not derived: the
memory a process holds before it builds anything (imports), and on CPU what glibc's allocator
keeps of freed memory; `--device cuda` replaces them by the CUDA context and adds no CPU terms.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import FSDPModule
from torch.utils.hooks import RemovableHandle

from p3d import compat
from p3d.config.schema import CPImpl, DType, P3DConfig
from p3d.config.validate import ValidatedSetup
from p3d.data import TokenBatch
from p3d.distributed.mesh import Meshes, ParallelDims
from p3d.errors import RunError
from p3d.model import build_meta_model
from p3d.models import decoder_blocks, experts_modules
from p3d.optim import optimizer_state_sizes
from p3d.parallel.expert import expert_count
from p3d.parallel.fsdp import REDUCE_BYTES, ddp_bucket_numels, syncs_every_micro_batch
from p3d.parallel.context import ContextParallel, SequenceSharding, uses_p3d_attention
from p3d.parallel.cp_attention import AttentionTimer, CPComm
from p3d.parallel.parallelize import TORCH_DTYPES, enable_p3d_attention, shard_for_compute, wrap_for_training
from p3d.parallel.tensor import plan_without_names
from p3d.parallel.vocab import vocab_parallel_head, vocabulary_weights
from p3d.trainer import token_loss_sums

GB = 1e9  # the plan reports decimal gigabytes
BYTES = {DType.fp32: 4, DType.bf16: 2}

# RSS of a rank before it builds its model: torch, transformers and p3d imported (0.37 GB), the
# process group and data set up. Measured on this stack (torch 2.13 CPU, transformers 5.23) with
# benchmarks/memory_phases.py, and as the whole peak of tiny_llama at dp8 (0.40 GB); on a GPU this
# is host memory, not device memory.
CPU_PROCESS_BASELINE_B = 0.40e9
# On CPU, glibc keeps freed blocks below its mmap threshold in its heaps for reuse (the threshold
# rises, as large blocks are freed, up to 64-bit glibc's DEFAULT_MMAP_THRESHOLD_MAX), so a rank's
# peak RSS exceeds its live tensors. Fragmentation makes that excess no simple function of the
# step; measured by benchmarks/plan_accuracy.py (default allocator against one returning every
# freed block), it is about this share of the bytes a step frees in such blocks (none with
# dist.cpu_return_freed_memory=true, which makes every block over 64 KiB its own mapping).
CPU_MMAP_THRESHOLD_B = 32 * 2**20
CPU_HEAP_RETENTION = 0.55
# Above this share of the machine's memory a CPU verdict with that estimate in it is called tight.
TIGHT_SHARE = 0.9
# On a GPU: the CUDA context and the kernels' workspaces, outside torch's allocator (nominal: not
# measured by p3d; the caching allocator's reserve above the live tensors is not counted either).
CUDA_CONTEXT_B = 0.5e9

# Memory of one device by GPU name (GB as sold; a name of metrics.PEAK_TFLOPS_BY_DEVICE_NAME).
DEVICE_MEMORY_GB = {
    "H200": 141, "H100 PCIe": 80, "H100": 80, "GH200": 96, "B200": 180, "A100": 80, "L40S": 48, "L4": 24,
    "A10G": 24, "A10": 24, "V100": 32, "MI300X": 192,
}

PARTS = ("weights", "gradients", "optimizer state", "gathered weights", "gathered gradients", "reduce buffers", "activations", "logits and loss")


# ---- what the real code does, recorded on the meta device -----------------------------------------
@dataclass
class Unit:
    """One FSDP2 unit (or, without FSDP, one decoder block or the rest of the model), TP-local sizes."""

    name: str  # its modules' names joined by " + " (one, except FSDP2 replicate's buckets); "" is the root (the whole model)
    parameters: list[str]  # names of the parameters it owns (not its sub-units')
    gathered_numel: int  # elements of its parameters on this tp rank while gathered
    keeps_gathered: bool  # stays gathered from its forward to its backward
    gathered: bool = True  # FSDP2 gathers it; false: a vocabulary-parallel head, computed on its shards in place
    prefetches: bool = True  # its backward begins by gathering the next unit's weights (parallel.backward_prefetch)
    checkpointed: bool = False  # activation checkpointing recomputes (some of) its blocks in backward
    parameter_numels: list[int] = field(default_factory=list)  # each of its parameters' elements, gathered
    state_per_shard: list[int] = field(default_factory=list)  # per parameter: optimizer tensors shaped like its shard
    state_whole_numel: int = 0  # optimizer state elements every rank holds whole (Adafactor's factors)
    group: str = ""  # the mesh dimension FSDP2 shards it over (dp_cp, HSDP's dp_shard_cp, efsdp for experts); "" if none
    group_size: int = 1
    replicate_group: str = ""  # the mesh dimension FSDP2 replicates it over (replicated: dp_cp; HSDP: dp_replicate); "" if none
    replicate_size: int = 1
    modules: list[str] = field(default_factory=list)  # the modules it wraps
    activation_bytes: int = 0  # what its own modules save for backward in one micro-batch
    activation_small: int = 0  # ... of it in blocks below the CPU allocator's mmap threshold
    checkpointed_bytes: int = 0  # ... of it in checkpointed blocks: recomputed in backward, not kept from forward
    checkpointed_small: int = 0
    input_bytes: int = 0  # its checkpointed blocks' first inputs (what activation checkpointing keeps instead)
    input_small: int = 0

    @property
    def kept_from_forward(self) -> tuple[int, int]:
        """(bytes, bytes in small blocks) its forward leaves for its backward."""
        return self.activation_bytes - self.checkpointed_bytes + self.input_bytes, self.activation_small - self.checkpointed_small + self.input_small


@dataclass
class CollectiveCount:
    name: str
    group: str
    per_micro_batch: int = 0
    bytes_per_micro_batch: int = 0
    once_per_step: bool = False  # the counts are per step: gradients reduced after the step's last micro-batch only

    def per_step(self, micro_batches: int) -> tuple[int, int]:
        """(count, bytes) in one step of `micro_batches` micro-batches."""
        times = 1 if self.once_per_step else micro_batches
        return self.per_micro_batch * times, self.bytes_per_micro_batch * times


@dataclass
class Trace:
    """Facts about one layout, read from the sharded model and its meta-device step."""

    dims: ParallelDims
    fsdp: bool
    units: list[Unit]  # in forward order; the root last
    shard_numel: dict[int, dict[str, int]]  # rank -> unit name -> elements of its parameters' shards on that rank
    tied_numel: int  # elements (tp-local) of weights used twice (a tied embedding and head): a second gradient
    head_unit: str  # the unit holding the output head
    logits_bytes: int
    loss_bytes: int  # what the loss saves for backward (fp32 log-probabilities)
    logits_fp32_bytes: int  # the fp32 copy of the logits (and each of their fp32 gradients)
    collectives: list[CollectiveCount]
    parameters: int  # of the whole model
    micro_batches: int
    reduces_every_micro_batch: bool = True  # FSDP2 reduces gradients after every micro-batch (else the step's last only)
    experts: tuple[int, int, int] | None = None  # mixture of experts: (layers, experts per layer, experts per rank)
    ddp_buckets: list[int] = field(default_factory=list)  # replicated by DDP: gradient elements per bucket (kept between steps)
    ddp_group: str = ""  # ... all-reduced over this mesh dimension
    vocabulary_modules: list[str] = field(default_factory=list)  # the embedding and head sharded over the vocabulary (parallel.vocab_parallel)

    @property
    def root(self) -> Unit:
        return self.units[-1]


class _ShapeOnlyComm(CPComm):
    """CP communication on the meta device: what arrives has the right shape; each transfer is counted."""

    def __init__(self, group, counts: dict):
        super().__init__(group)
        self.counts = counts

    def _count(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.counts.setdefault(name, CollectiveCount(name, "cp"))
        entry.per_micro_batch += 1
        entry.bytes_per_micro_batch += tensor.numel() * tensor.element_size()

    def pass_on(self, tensor, tag):
        if self.size == 1:
            return super().pass_on(tensor, tag)
        self._count("CP ring send/recv of K/V blocks and their gradients", tensor)
        return _Arrived(torch.empty_like(tensor))

    def all_gather(self, tensor):
        if self.size == 1:
            return super().all_gather(tensor)
        self._count("CP all-gather of keys and values (of its input, for attention written by hand)", tensor)
        return torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)

    def reduce_scatter(self, stacked):
        if self.size == 1:
            return super().reduce_scatter(stacked)
        self._count("CP reduce-scatter of their gradients", stacked)
        return torch.empty(stacked.shape[1:], dtype=stacked.dtype, device=stacked.device)


@dataclass
class _Arrived:
    tensor: torch.Tensor

    def wait(self) -> torch.Tensor:
        return self.tensor


@dataclass
class _Recorder:
    """Saved tensors by module (deduplicated by storage, parameters left out) and module call order."""

    parameter_storages: set
    stack: list[str] = field(default_factory=list)
    saved: dict[int, tuple[str, int]] = field(default_factory=dict)  # storage -> (module, bytes)
    call_order: list[str] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)  # module -> bytes of its first tensor input

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        local = _local(tensor)
        key = compat.storage_key(local)
        if key not in self.parameter_storages and key not in self.saved:
            self.saved[key] = (self.stack[-1] if self.stack else "", local.untyped_storage().nbytes())
        return tensor

    def hooks(self, model: nn.Module) -> list[RemovableHandle]:
        handles = []
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave(name)))
        return handles

    def _enter(self, name: str):
        def hook(module, args, kwargs):
            self.stack.append(name)
            if name not in self.inputs:
                self.call_order.append(name)
                first = next((x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)), None)
                self.inputs[name] = 0 if first is None else _local(first).untyped_storage().nbytes()

        return hook

    def _leave(self, name: str):
        def hook(module, args, output):
            self.stack.pop()

        return hook


def _local(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


class _CollectiveCounter(compat.CollectiveRecorder):
    """TP's collectives (DTensor redistributions) by the mesh dimension they run over."""

    def __init__(self, group_names: dict[str, str], counts: dict):
        super().__init__()
        self.group_names = group_names
        self.counts = counts

    def record(self, op: str, group_name: str, tensor: torch.Tensor) -> None:
        group = self.group_names.get(group_name, "other")
        name = {"all_reduce": "all-reduce", "allreduce_": "all-reduce", "all_gather_into_tensor": "all-gather", "allgather_": "all-gather", "_allgather_base_": "all-gather", "reduce_scatter_tensor": "reduce-scatter", "_reduce_scatter_base_": "reduce-scatter", "alltoall_base_": "all-to-all"}.get(op, op)
        entry = self.counts.setdefault(f"{group}:{name}", CollectiveCount(f"{group.upper()} {name} (activations and their gradients)", group))
        entry.per_micro_batch += 1
        entry.bytes_per_micro_batch += tensor.numel() * tensor.element_size()


def _trace_step(config: P3DConfig, setup: ValidatedSetup, meshes: Meshes, counts: dict) -> tuple[_Recorder, dict]:
    """One micro-batch's forward, loss and backward on the meta device, on the model as TP, SP and CP shard it."""
    model = build_meta_model(setup.hf_config, TORCH_DTYPES[config.train.dtype])  # FSDP2 computes in train.dtype
    shard_for_compute(model, config, setup.hf_config, setup.tp_plan, meshes)
    dims = setup.dims
    if not uses_p3d_attention(dims.cp, config.data.packing):
        # The model's own attention builds its mask with data-dependent checks, which the meta device
        # cannot run; p3d's saves the same tensors (queries, keys, values, output, log-sum-exp).
        enable_p3d_attention(model, setup.hf_config)
    impl = CPImpl.ring if setup.cp_impl is CPImpl.torch else setup.cp_impl  # PyTorch's runs on CUDA kernels only
    context = ContextParallel(meshes.cp, SequenceSharding(dims.cp, config.parallel.cp_layout), impl, AttentionTimer(False, torch.device("meta")))
    context.comm = _ShapeOnlyComm(meshes.cp.get_group(), counts)
    recorder = _Recorder({compat.storage_key(_local(p)) for p in model.parameters()})
    batch_size, seq_len = config.train.micro_batch_size, config.data.seq_len
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long)
    batch = TokenBatch(input_ids=tokens, labels=tokens, position_ids=torch.arange(seq_len).expand(batch_size, seq_len), document_ids=None)
    views = (("vocab", meshes.vocab), ("dp_cp", meshes.dp_cp), ("dp", meshes.dp), ("cp", meshes.cp), ("tp", meshes.tp))  # the last name of a group wins
    group_names = {mesh.get_group().group_name: name for name, mesh in views}
    if dims.ep > 1:
        group_names[meshes.ep.get_group().group_name] = "ep"
    handles = recorder.hooks(model)
    sizes: dict[str, int] = {}
    try:
        with _CollectiveCounter(group_names, counts), compat.experts_run_on_meta(), torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda tensor: tensor):
            with context.attending(batch, torch.device("meta")) as local:
                input_ids = local.input_ids.to("meta")
                logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=local.position_ids.to("meta"), use_cache=False).logits
                recorder.stack = ["loss"]
                loss, _ = token_loss_sums(vocab_parallel_head(model), logits, local.labels.to("meta"))
                recorder.stack = []
                loss.backward()
    except Exception as error:  # the model's own code, run on shapes only
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise RunError(
            f"model.arch={setup.hf_config.model_type}: p3d plan cannot run this model's step on the meta device "
            f"({type(error).__name__}: {reason}), so it cannot plan its memory; P3D_DEBUG=1 shows where"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    local_logits = _local(logits)
    sizes["logits"] = local_logits.numel() * local_logits.element_size()
    sizes["logits_fp32"] = local_logits.numel() * 4
    return recorder, sizes


def _shard_numel(param: torch.Tensor, coordinates: dict[str, int]) -> int:
    if not isinstance(param, DTensor):
        return param.numel()
    mesh = param.device_mesh
    coordinate = [coordinates[name] for name in mesh.mesh_dim_names]
    return _numel(_cached_shard_shape(tuple(param.shape), tuple(mesh.shape), tuple(coordinate), tuple(param.placements)))


@lru_cache(maxsize=None)
def _cached_shard_shape(shape, mesh_shape, coordinate, placements) -> tuple[int, ...]:
    return compat.shard_shape(shape, mesh_shape, coordinate, placements)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _owner(name: str, module_names) -> str:
    """The module a module or parameter belongs to: the longest of `module_names` it lies inside ("" if none)."""
    best = ""
    for module in module_names:
        if module and (name == module or name.startswith(module + ".")) and len(module) > len(best):
            best = module
    return best


@dataclass
class _Wrapped:
    """One unit as the wrapped model has it: its modules, and how FSDP2 gathers and reduces it."""

    modules: list[str]
    keeps_gathered: bool
    shard: tuple[str, int] | None = None  # (mesh dimension, size)
    replicate: tuple[str, int] | None = None
    gathered: bool = True  # false: a vocabulary-parallel head (no FSDP2 unit: sharded, never gathered)
    prefetches: bool = True  # FSDP2 gathers the next unit for backward as this one's backward begins

    @property
    def name(self) -> str:
        return " + ".join(self.modules)


def _units_of(model: nn.Module, fsdp: bool) -> list[_Wrapped]:
    """The FSDP2 units (the modules one `fully_shard` or `replicate` call wrapped together are one unit),
    or without FSDP the decoder blocks and the rest; vocabulary-parallel embeddings are units of their own
    (one when tied); the root last."""
    names = {module: name for name, module in model.named_modules()}
    vocabulary = _vocabulary_units(model, names)
    if not fsdp:
        return [_Wrapped([names[block]], True) for block in decoder_blocks(model)] + vocabulary + [_Wrapped([""], True)]
    units: dict[int, _Wrapped] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            facts = compat.fsdp_unit_facts(module)
            wrapped = _Wrapped([], facts.keeps_unsharded_after_forward, facts.shard, facts.replicate, prefetches=facts.prefetches_in_backward)
            units.setdefault(facts.unit, wrapped).modules.append(name)
    root = units.pop(compat.fsdp_unit_facts(model).unit)
    root.keeps_gathered = True  # FSDP2 keeps the root gathered once training starts
    return [*units.values(), *vocabulary, root]


def _vocabulary_units(model: nn.Module, names: dict) -> list[_Wrapped]:
    return [_Wrapped([names[module] for module in modules], True, gathered=False) for modules in vocabulary_weights(model)]


def trace_layout(config: P3DConfig, setup: ValidatedSetup) -> Trace:
    """Apply p3d's parallel code for `setup.dims` over a fake process group and record what it did."""
    dims = setup.dims
    counts: dict[str, CollectiveCount] = {}
    with _planning_group(dims.world_size):
        meshes = Meshes(dims, "cpu")
        recorder, sizes = _trace_step(config, setup, meshes, counts)
        model = build_meta_model(setup.hf_config, TORCH_DTYPES[config.train.master_dtype])
        shard_for_compute(model, config, setup.hf_config, setup.tp_plan, meshes)
        tp_local = {name: _local(param).numel() for name, param in model.named_parameters()}
        moe = experts_modules(model)
        experts = (len(moe), expert_count(moe[0][1]), moe[0][1].num_experts) if moe else None  # num_experts: the local count once split
        tied_numel = sum(tp_local[name] for name in _tied_parameters(model))
        checkpointed_blocks = wrap_for_training(model, config, meshes)
        state = optimizer_state_sizes(model, config.optim)  # the optimizer p3d builds for this model
        fsdp = any(isinstance(module, FSDPModule) for module in model.modules())
        buckets = ddp_bucket_numels(model)
        names = {module: name for name, module in model.named_modules()}
        blocks = decoder_blocks(model)
        checkpointed = [names[blocks[index]] for index in checkpointed_blocks]
        wrapped = _units_of(model, fsdp)
        unit_of_module = {module: unit.name for unit in wrapped for module in unit.modules}
        owned: dict[str, list[str]] = defaultdict(list)
        parameters = dict(model.named_parameters())
        for name in parameters:
            owned[unit_of_module[_owner(name, unit_of_module)]].append(name)
        units = [_unit(unit, owned[unit.name], tp_local, state) for unit in wrapped]
        order = {name: index for index, name in enumerate(recorder.call_order)}
        units = sorted(units[:-1], key=lambda unit: min(order.get(module, len(order)) for module in unit.modules)) + [units[-1]]
        by_name = {unit.name: unit for unit in units}

        def unit_of(module_name: str) -> Unit:
            return by_name[unit_of_module[_owner(module_name, unit_of_module)]]

        loss_bytes = 0
        for module_name, nbytes in recorder.saved.values():
            if module_name == "loss":
                loss_bytes += nbytes
                continue
            unit = unit_of(module_name)
            unit.activation_bytes += nbytes
            unit.activation_small += _small(nbytes)
            if _owner(module_name, checkpointed):
                unit.checkpointed_bytes += nbytes
                unit.checkpointed_small += _small(nbytes)
        for block in checkpointed:
            unit = unit_of(block)
            unit.checkpointed = True
            unit.input_bytes += recorder.inputs.get(block, 0)
            unit.input_small += _small(recorder.inputs.get(block, 0))
        shard_numel = {}
        for rank in range(dims.world_size):
            coordinates = dims.mesh_coordinates(rank)
            shard_numel[rank] = {unit.name: sum(_shard_numel(parameters[p], coordinates) for p in unit.parameters) for unit in units}
        head = model.get_output_embeddings()
        head_name = names.get(head, "") if head is not None else ""
    accumulation = config.train.global_batch_size // (config.train.micro_batch_size * dims.dp)
    return Trace(
        dims=dims,
        fsdp=fsdp,
        units=units,
        shard_numel=shard_numel,
        tied_numel=tied_numel,
        head_unit=unit_of_module[_owner(head_name, unit_of_module)],
        logits_bytes=sizes["logits"],
        loss_bytes=loss_bytes,
        logits_fp32_bytes=sizes["logits_fp32"],
        collectives=list(counts.values()),
        parameters=sum(p.numel() for p in parameters.values()),
        micro_batches=accumulation,
        reduces_every_micro_batch=syncs_every_micro_batch(config.parallel.grad_sync, dims),  # as the trainer decides it
        experts=experts,
        ddp_buckets=buckets,
        ddp_group=meshes.data_parallel.mesh_dim_names[-1] if buckets else "",
        vocabulary_modules=[module for unit in wrapped if not unit.gathered for module in unit.modules],
    )


def _unit(wrapped: _Wrapped, owned: list[str], tp_local: dict[str, int], state: dict) -> Unit:
    group, group_size = wrapped.shard or ("", 1)
    replicate_group, replicate_size = wrapped.replicate or ("", 1)
    return Unit(
        wrapped.name, owned, sum(tp_local[p] for p in owned), wrapped.keeps_gathered, wrapped.gathered, wrapped.prefetches,
        parameter_numels=[tp_local[p] for p in owned],
        state_per_shard=[state[p].per_shard if p in state else 0 for p in owned],
        state_whole_numel=sum(state[p].whole for p in owned if p in state),
        group=group, group_size=group_size, replicate_group=replicate_group, replicate_size=replicate_size,
        modules=wrapped.modules,
    )


def _tied_parameters(model: nn.Module) -> list[str]:
    """Parameters that more than one module uses (a tied input embedding and output head)."""
    uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    return [name for name, param in model.named_parameters() if uses[id(param)] > 1]


@contextmanager
def _planning_group(world_size: int):
    compat.import_dynamo()
    with compat.fake_process_group(world_size):
        yield
    _cached_shard_shape.cache_clear()


# ---- one step replayed: allocations and frees in the order a rank makes them ------------------------
class Timeline:
    """Live bytes by part, the peak of their sum and what made it up, and what was freed in small blocks."""

    def __init__(self):
        self.live: Counter = Counter()
        self.most: Counter = Counter()  # the most of each part live at any time
        self.total = 0
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.peak_phase = ""
        self.phase = ""
        self.freed_small = 0  # bytes freed in blocks below the mmap threshold: they stay in glibc's heaps

    def add(self, part: str, nbytes: int, small: int | None = None) -> None:
        """`nbytes` more of `part` (`small`: how much of it is in blocks below the mmap threshold; unused here)."""
        if nbytes <= 0:
            return
        self.live[part] += nbytes
        self.most[part] = max(self.most[part], self.live[part])
        self.total += nbytes
        if self.total > self.peak:
            self.peak, self.peak_parts, self.peak_phase = self.total, dict(self.live), self.phase

    def free(self, part: str, nbytes: int, small: int | None = None) -> None:
        """`nbytes` of `part` freed, of which `small` in blocks below the mmap threshold (default: one block)."""
        if nbytes <= 0:
            return
        self.live[part] -= nbytes
        self.total -= nbytes
        self.freed_small += _small(nbytes) if small is None else small


def _small(nbytes: int) -> int:
    return nbytes if nbytes < CPU_MMAP_THRESHOLD_B else 0


def _small_blocks(sizes: list[int]) -> int:
    return sum(size for size in sizes if size < CPU_MMAP_THRESHOLD_B)


@dataclass(frozen=True)
class Sizes:
    compute: int  # bytes per element of the compute dtype
    master: int  # of the stored weights, gradients and optimizer state


class _Replay:
    """The last micro-batch of a step on one rank: forward, loss, backward unit by unit, gradients reduced."""

    def __init__(self, trace: Trace, rank: int, sizes: Sizes, in_backward: bool):
        self.trace, self.sizes = trace, sizes
        self.shards = trace.shard_numel[rank]
        self.timeline = Timeline()
        self.gathered: set[str] = set()
        earlier = trace.micro_batches > 1 and not in_backward  # optim.in_backward takes no accumulation
        # Earlier micro-batches left their gradients: reduced, every sharded gradient in place; not reduced
        # (parallel.grad_sync), each unit's unsharded gradients, summed in the reduce dtype until the last.
        self.holds_unsharded = earlier and trace.fsdp and not trace.reduces_every_micro_batch
        # DDP's gradients live in its flat buckets from the first backward on.
        self.accumulating = (earlier and not self.holds_unsharded) or bool(trace.ddp_buckets)
        self.keeps_gradients = not in_backward  # optim.in_backward frees each gradient at once

    def run(self) -> Timeline:
        trace, timeline = self.trace, self.timeline
        units, root = trace.units[:-1], trace.root
        timeline.phase = "between steps"
        for unit in trace.units:
            state = self._shard_bytes(unit)
            timeline.add("weights", *state)
            timeline.add("optimizer state", *self._optimizer_state_bytes(unit))
            if self.accumulating:
                timeline.add("gradients", *state)
            if self.holds_unsharded:
                timeline.add("gathered gradients", *self._held_blocks(unit))
        timeline.phase = "forward"
        self.gather(root)
        timeline.add("activations", *root.kept_from_forward)
        for unit in units:
            timeline.phase = f"forward {unit.name}"
            self.gather(unit)
            timeline.add("activations", *unit.kept_from_forward)
            if not unit.keeps_gathered:
                self.release(unit)
        logits_gradient = self.loss()
        if trace.head_unit == "":  # a head in the root runs its backward first: the logits' gradient is consumed
            timeline.free("logits and loss", logits_gradient)
            logits_gradient = 0
        if trace.fsdp:  # the root's unsharded gradients (a tied head's among them) live until the end
            timeline.add("gathered gradients", *self._gradient_blocks(root))
        backward_order = list(reversed(units))
        for index, unit in enumerate(backward_order):
            timeline.phase = f"backward {unit.name}"
            self.gather(unit)
            if index + 1 < len(backward_order) and unit.prefetches:
                self.gather(backward_order[index + 1])  # FSDP2 prefetches the next unit's weights
            timeline.add("activations", unit.checkpointed_bytes, unit.checkpointed_small)  # recomputed
            self.gradients(unit)
            self.free_activations(unit)
            if unit.name == trace.head_unit:
                timeline.free("logits and loss", logits_gradient)
                logits_gradient = 0
            self.release(unit)
        timeline.phase = "backward (root)"
        timeline.free("logits and loss", logits_gradient)
        tied = trace.tied_numel * self.sizes.compute
        timeline.add("gathered gradients" if trace.fsdp else "gradients", tied)  # a tied weight's second gradient, summed into the first
        timeline.free("gathered gradients" if trace.fsdp else "gradients", tied)
        timeline.add("activations", root.checkpointed_bytes, root.checkpointed_small)  # blocks left in the root, recomputed
        if trace.fsdp:
            timeline.free("gathered gradients", *self._gradient_blocks(root))
            self.reduce(root, held=self._held_blocks(root) if self.holds_unsharded else (0, 0))
        else:
            self.gradients(root)
        self.free_activations(root)
        self.release(root)
        return timeline

    def free_activations(self, unit: Unit) -> None:
        self.timeline.free("activations", unit.activation_bytes, unit.activation_small)
        self.timeline.free("activations", unit.input_bytes, unit.input_small)

    def loss(self) -> int:
        """Logits, the loss's fp32 log-probabilities, then their gradients; returns the logits' gradient left."""
        trace, timeline, mixed = self.trace, self.timeline, self.sizes.compute != 4
        timeline.phase = "loss"
        timeline.add("logits and loss", trace.logits_bytes)
        if mixed:
            timeline.add("logits and loss", trace.logits_fp32_bytes)  # the fp32 copy the loss reads
        timeline.add("logits and loss", trace.loss_bytes)
        if mixed:
            timeline.free("logits and loss", trace.logits_fp32_bytes)
        # The loss saves its log-probabilities, not the logits, and the step keeps no reference to them
        # (p3d.trainer), so they are freed before backward.
        timeline.free("logits and loss", trace.logits_bytes)
        timeline.phase = "backward loss"
        timeline.add("logits and loss", trace.logits_fp32_bytes)  # d loss / d log-probabilities
        timeline.add("logits and loss", trace.logits_fp32_bytes)  # d loss / d fp32 logits
        timeline.free("logits and loss", trace.logits_fp32_bytes)
        timeline.free("logits and loss", trace.loss_bytes)
        if not mixed:
            return trace.logits_fp32_bytes
        timeline.add("logits and loss", trace.logits_bytes)  # cast back to the compute dtype
        timeline.free("logits and loss", trace.logits_fp32_bytes)
        return trace.logits_bytes

    def gather(self, unit: Unit) -> None:
        if self.trace.fsdp and unit.gathered and unit.name not in self.gathered:
            self.gathered.add(unit.name)
            self.timeline.add("gathered weights", unit.gathered_numel * self.sizes.compute)  # one flat all-gather buffer

    def release(self, unit: Unit) -> None:
        if self.trace.fsdp and unit.name in self.gathered:
            self.gathered.discard(unit.name)
            self.timeline.free("gathered weights", unit.gathered_numel * self.sizes.compute)

    def gradients(self, unit: Unit) -> None:
        """A unit's gradients: unsharded in the compute dtype, then reduce-scattered (FSDP2), or kept as they
        are (no FSDP2; a vocabulary-parallel head, whose shards' gradients are whole sums already)."""
        if not self.trace.fsdp or not unit.gathered:
            if self.keeps_gradients and not self.accumulating:
                self.timeline.add("gradients", *self._shard_bytes(unit))
            return
        self.timeline.add("gathered gradients", *self._gradient_blocks(unit))
        if self.holds_unsharded:  # this micro-batch's, summed into those held since the first
            self.timeline.free("gathered gradients", *self._gradient_blocks(unit))
            self.reduce(unit, held=self._held_blocks(unit))
        else:
            self.reduce(unit, held=self._gradient_blocks(unit))

    def reduce(self, unit: Unit, held: tuple[int, int]) -> None:
        """FSDP2's reduction (reduce-scatter, all-reduce or both): the unsharded gradients (`held`: bytes, in
        small blocks) copied into one fp32 buffer and freed, this rank's part kept."""
        timeline = self.timeline
        timeline.add("reduce buffers", unit.gathered_numel * REDUCE_BYTES)
        timeline.free("gathered gradients", *held)
        if self.keeps_gradients and not self.accumulating:
            timeline.add("gradients", *self._shard_bytes(unit))
        timeline.free("reduce buffers", unit.gathered_numel * REDUCE_BYTES)

    def _gradient_blocks(self, unit: Unit) -> tuple[int, int]:
        blocks = [numel * self.sizes.compute for numel in unit.parameter_numels]
        return sum(blocks), _small_blocks(blocks)

    def _held_blocks(self, unit: Unit) -> tuple[int, int]:
        """Unsharded gradients FSDP2 holds across micro-batches without reducing them: in the reduce dtype."""
        blocks = [numel * REDUCE_BYTES for numel in unit.parameter_numels]
        return sum(blocks), _small_blocks(blocks)

    def _shard_bytes(self, unit: Unit) -> tuple[int, int]:
        """(bytes, bytes in small blocks) of this rank's shards of the unit's parameters, in the master dtype."""
        share = self.shards[unit.name] / unit.gathered_numel if unit.gathered_numel else 0.0
        blocks = [numel * share * self.sizes.master for numel in unit.parameter_numels]
        return int(sum(blocks)), int(_small_blocks(blocks))

    def _optimizer_state_bytes(self, unit: Unit) -> tuple[int, int]:
        """(bytes, bytes in small blocks) of the optimizer state this rank keeps for the unit's parameters."""
        share = self.shards[unit.name] / unit.gathered_numel if unit.gathered_numel else 0.0
        blocks = [numel * share * self.sizes.master for numel, tensors in zip(unit.parameter_numels, unit.state_per_shard) for _ in range(tensors)]
        whole = unit.state_whole_numel * self.sizes.master
        return int(sum(blocks) + whole), int(_small_blocks(blocks) + _small(whole))


def replay_step(trace: Trace, rank: int, sizes: Sizes, in_backward: bool) -> Timeline:
    """Where a rank's memory peaks in a step: its last micro-batch replayed (see _Replay)."""
    return _Replay(trace, rank, sizes, in_backward).run()


# ---- the plan --------------------------------------------------------------------------------------
@dataclass
class RankMemory:
    rank: int
    parts: dict[str, float]  # bytes at the peak
    peak_phase: str
    baseline: float
    allocator: float

    @property
    def total(self) -> float:
        return sum(self.parts.values()) + self.baseline + self.allocator


@dataclass
class Plan:
    config: P3DConfig
    setup: ValidatedSetup
    trace: Trace
    device: str
    device_memory_gb: float | None
    ranks: list[RankMemory]  # every rank

    @property
    def largest(self) -> RankMemory:
        return max(self.ranks, key=lambda memory: memory.total)

    @property
    def job_bytes(self) -> float:
        return sum(memory.total for memory in self.ranks)

    @property
    def fits(self) -> bool | None:
        """Whether the job fits: per device on a GPU; on CPU all ranks share one machine's memory."""
        if self.device_memory_gb is None:
            return None
        needed = self.largest.total if self.device == "cuda" else self.job_bytes
        return needed <= self.device_memory_gb * GB

    def breakdown(self, memory: RankMemory | None = None) -> dict[str, float]:
        memory = memory or self.largest
        rows = {"process baseline" if self.device == "cpu" else "CUDA context": memory.baseline}
        rows.update({part: memory.parts.get(part, 0) for part in PARTS})
        if self.device == "cpu":
            rows["allocator retention"] = memory.allocator
        return rows

    def as_json(self) -> dict:
        largest = self.largest
        dims = self.setup.dims
        return {
            "world_size": dims.world_size,
            "layout": {"dp": dims.dp, "cp": dims.cp, "tp": dims.tp, "ep": dims.ep, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard},
            "data_parallel": data_parallel(self.trace),
            "device": self.device,
            "device_memory_gb": self.device_memory_gb,
            "per_rank_gb": round(largest.total / GB, 4),
            "largest_rank": largest.rank,
            "peak_phase": largest.peak_phase,
            "job_gb": round(self.job_bytes / GB, 4),
            "fits": self.fits,
            "breakdown": {part: round(value / GB, 4) for part, value in self.breakdown(largest).items()},
            "per_rank": _compact_per_rank(self.ranks),
            "parameters": self.trace.parameters,
            "fsdp_units": len(self.trace.units) if self.trace.fsdp else 0,
            "micro_batches_per_step": self.trace.micro_batches,
            "collectives_per_step": [_collective_json(c, self.trace.micro_batches) for c in collectives(self.trace, self.config)],
        }


def _collective_json(collective: CollectiveCount, micro_batches: int) -> dict:
    count, nbytes = collective.per_step(micro_batches)
    return {"name": collective.name, "group": collective.group, "count": count, "mb": round(nbytes / 1e6, 3)}


def _compact_per_rank(ranks: list[RankMemory]) -> list[dict]:
    """Ranks with the same total, as runs: [{"ranks": "0-3", "gb": 1.23}, ...]."""
    runs: list[dict] = []
    for memory in ranks:
        gb = round(memory.total / GB, 4)
        if runs and runs[-1]["gb"] == gb and runs[-1]["last"] == memory.rank - 1:
            runs[-1]["last"] = memory.rank
        else:
            runs.append({"first": memory.rank, "last": memory.rank, "gb": gb})
    return [{"ranks": f"{r['first']}" if r["first"] == r["last"] else f"{r['first']}-{r['last']}", "gb": r["gb"]} for r in runs]


def make_plan(config: P3DConfig, setup: ValidatedSetup, device: str | None = None, device_memory_gb: float | None = None) -> Plan:
    from p3d.distributed.env import resolve_device_type

    device = device or resolve_device_type(config.dist.device)
    trace = trace_layout(config, setup)
    sizes = Sizes(BYTES[config.train.dtype], BYTES[config.train.master_dtype])
    replayed: dict[tuple, Timeline] = {}
    ranks = []
    for rank in range(setup.dims.world_size):
        signature = tuple(sorted(trace.shard_numel[rank].items()))
        if signature not in replayed:
            replayed[signature] = replay_step(trace, rank, sizes, config.optim.in_backward)
        timeline = replayed[signature]
        if device == "cpu":
            retention = 0.0 if config.dist.cpu_return_freed_memory else CPU_HEAP_RETENTION
            baseline, allocator = CPU_PROCESS_BASELINE_B, retention * timeline.freed_small
        else:
            baseline, allocator = CUDA_CONTEXT_B, 0.0
        ranks.append(RankMemory(rank, timeline.peak_parts, timeline.peak_phase, baseline, allocator))
    if device_memory_gb is None:
        device_memory_gb = this_machines_device_memory_gb(device)
    return Plan(config, setup, trace, device, device_memory_gb, ranks)


def this_machines_device_memory_gb(device: str) -> float | None:
    if device == "cuda":
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GB
        return None
    return machine_memory_gb()


def machine_memory_gb() -> float | None:
    """This machine's memory (GB), which all its ranks share on CPU."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError):
        return None


def collectives(trace: Trace, config: P3DConfig) -> list[CollectiveCount]:
    """FSDP2's per unit, over the mesh dimensions each unit shards and replicates over (from the units),
    per micro-batch or, for gradients reduced after the step's last micro-batch only, per step; TP's and
    CP's per micro-batch (counted in the meta-device step)."""
    found: dict[tuple[str, str], CollectiveCount] = {}
    compute = BYTES[config.train.dtype]
    once = not trace.reduces_every_micro_batch

    def count(name: str, group: str, times: int, nbytes: int, once_per_step: bool = False) -> None:
        entry = found.setdefault((group, name), CollectiveCount(name, group, once_per_step=once_per_step))
        entry.per_micro_batch += times
        entry.bytes_per_micro_batch += times * nbytes

    for numel in trace.ddp_buckets:
        count("all-reduce of gradients (fp32), one per DDP bucket", trace.ddp_group, 1, numel * REDUCE_BYTES, once)
    for unit in trace.units if trace.fsdp else ():
        if not unit.gathered_numel or not unit.gathered:
            continue
        if unit.group_size > 1:
            gathers = 1 if unit.keeps_gathered else 2
            count("FSDP all-gather of weights (forward, and backward for units resharded after forward)", unit.group, gathers, unit.gathered_numel * compute)
            count("FSDP reduce-scatter of gradients (fp32)", unit.group, 1, unit.gathered_numel * REDUCE_BYTES, once)
        if unit.replicate_size > 1:
            what = "HSDP all-reduce of gradient shards (fp32) over the replicas" if unit.group_size > 1 else "all-reduce of gradients (fp32), one per replicated unit"
            count(what, unit.replicate_group, 1, trace.shard_numel[0][unit.name] * REDUCE_BYTES, once)
    return list(found.values()) + sorted(trace.collectives, key=lambda c: (c.group, c.name))


# ---- text ------------------------------------------------------------------------------------------
def render(plan: Plan, show_ranks: bool = False) -> str:
    config, setup, trace = plan.config, plan.setup, plan.trace
    dims = setup.dims
    lines = [f"# validation: OK for world size {dims.world_size} ({dims.describe()})", ""]
    replicas = f", dp = dp_replicate*{dims.dp_shard} + dp_shard" if dims.dp_replicate > 1 else ""
    lines += ["# mesh", f"dims (dp, cp, tp) = ({dims.dp}, {dims.cp}, {dims.tp}); rank = dp*{dims.cp * dims.tp} + cp*{dims.tp} + tp (tp fastest{replicas}); "
              f"{data_parallel(trace)}" + ("" if show_ranks else "; every rank's coordinates with --ranks")]
    if dims.ep > 1:
        lines.append(f"experts: the dp*cp ranks as (efsdp, ep) = ({dims.efsdp}, {dims.ep}), ep innermost; FSDP shards the experts over efsdp")
    if show_ranks:
        lines.append("rank  dp  cp  tp")
        for rank in range(dims.world_size):
            coords = dims.coords(rank)
            lines.append(f"{rank:>4}  {coords['dp']:>2}  {coords['cp']:>2}  {coords['tp']:>2}")
    text = setup.hf_config.get_text_config()
    local = sum(trace.shard_numel[plan.largest.rank].values())
    lines += [
        "",
        f"# model: {setup.hf_config.model_type}, {trace.parameters / 1e6:,.1f}M parameters ({text.num_hidden_layers} layers, hidden {text.hidden_size}, vocab {text.vocab_size}); "
        f"the largest rank holds {local / 1e6:,.1f}M; {len(trace.units) if trace.fsdp else 0} FSDP units",
        f"# batch: {config.train.global_batch_size} sequences x {config.data.seq_len} tokens per step; "
        f"{config.train.micro_batch_size} per dp rank per forward, {trace.micro_batches} accumulation step(s); "
        f"{config.train.micro_batch_size * config.data.seq_len // dims.cp} tokens per rank per forward",
    ]
    if trace.experts is not None:
        layers, count, local = trace.experts
        lines.append(f"# experts: {layers} mixture-of-experts layers of {count} experts, {local} per rank to compute (routing taken as even)")
    lines += [
        "",
        f"# memory per rank on {plan.device} (GB = 1e9 bytes), the largest rank ({plan.largest.rank}) at its peak ({plan.largest.peak_phase})",
    ]
    lines += [f"{name:<22} {value / GB:8.3f}" for name, value in plan.breakdown().items()]
    lines.append(f"{'total':<22} {plan.largest.total / GB:8.3f}")
    distinct = sorted({round(memory.total / GB, 3) for memory in plan.ranks})
    if len(distinct) > 1:
        lines.append(f"(ranks range from {distinct[0]:.3f} to {distinct[-1]:.3f} GB: uneven shards)")
    lines.append(f"{'whole job':<22} {plan.job_bytes / GB:8.3f}   (all {dims.world_size} ranks)")
    lines.append(verdict(plan))
    if plan.largest.allocator > 0:
        lines.append("(allocator retention is an estimate of what glibc keeps of freed blocks, the least exact term: peak RSS "
                     "varies by up to 10% between runs of one config; dist.cpu_return_freed_memory=true makes a rank's peak "
                     "its live tensors, which the plan counts, at a speed cost)")
    if dims.tp > 1:
        lines += ["", f"# tensor-parallel plan ({setup.plan_source})"]
        lines += [f"{style:<32} {pattern}" for pattern, style in plan_without_names(setup.tp_plan, trace.vocabulary_modules).items()]
    if trace.vocabulary_modules:
        lines += ["", f"# vocabulary-parallel (sharded over all {dims.world_size} ranks, never gathered): {', '.join(trace.vocabulary_modules)}"]
    lines += ["", "# collectives per step (count, MB: size of the tensors)"]
    for collective in collectives(trace, config):
        count, nbytes = collective.per_step(trace.micro_batches)
        lines.append(f"{count:>6}  {nbytes / 1e6:10.1f} MB  [{collective.group}] {collective.name}")
    return "\n".join(lines)


def data_parallel(trace: Trace) -> str:
    """How the model is held over the data-parallel ranks: DDP's buckets, or FSDP2's units as the root unit says."""
    root = trace.root
    if trace.ddp_buckets:
        return f"DDP: every rank holds the whole model, gradients in {len(trace.ddp_buckets)} flat bucket(s) all-reduced during the backward"
    if not trace.fsdp:
        return "no FSDP (one data-parallel rank, fp32)"
    shard = f"FSDP2 shards over {root.group} ({root.group_size} ranks)"
    replicate = f"replicates over {root.replicate_group} ({root.replicate_size} ranks)"
    if root.group and root.replicate_group:
        return f"{shard} and {replicate} (HSDP)"
    if root.replicate_group:
        return f"FSDP2 {replicate}: every rank holds the whole (TP-local) model, gradients all-reduced per unit"
    return shard


def verdict(plan: Plan) -> str:
    if plan.fits is None:
        return "fits: unknown (no device memory given: --device-memory-gb GB or a GPU name)"
    if plan.device == "cuda":
        need, what = plan.largest.total, f"each device has {plan.device_memory_gb:.1f} GB"
    else:
        need, what = plan.job_bytes, f"the machine has {plan.device_memory_gb:.1f} GB for all {plan.setup.dims.world_size} ranks"
    line = f"fits: {'yes' if plan.fits else 'NO'} (needs {need / GB:.1f} GB; {what})"
    if plan.device != "cpu":
        return line
    advice = returned_memory_advice(need, sum(memory.allocator for memory in plan.ranks), plan.device_memory_gb * GB)
    return f"{line}; {advice}" if advice else line


def returned_memory_advice(need: float, retained: float, memory: float) -> str | None:
    """On CPU: what dist.cpu_return_freed_memory=true needs (bytes `need` - `retained`), when `need` does not
    fit `memory` or is within the allocator estimate's error of it and that key would fit; else None."""
    live = need - retained
    if retained == 0 or live > memory or need <= TIGHT_SHARE * memory:
        return None
    if need > memory:
        return f"with dist.cpu_return_freed_memory=true it needs {live / GB:.1f} GB and fits"
    # the allocator term's error is about that large (docs/results/plan_accuracy.md)
    return f"tight for an estimate of glibc's retention, dist.cpu_return_freed_memory=true needs {live / GB:.1f} GB"
