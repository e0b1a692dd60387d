"""Tensor parallelism from a Hugging Face style plan ({module pattern: style}).

The plan's patterns are module (or parameter) names of the causal-LM model with `*` for one name
segment (a layer index), exactly like transformers' `model._tp_plan`; where a plan comes from is the
models/ seam's business. Every dense style of transformers' plans is implemented here with torch's
DTensor and `parallelize_module` on the tp sub-mesh of p3d's own mesh (transformers' own TP entry
point builds a mesh of its own, see NOTES.md). Each keeps the model's single-device math exactly:

    colwise                         weight split over output features; output stays split (local)
    colwise_gather_output           the same, output gathered (replicated)
    rowwise                         weight split over input features, input split; output all-reduced
    rowwise_split_input             the same, but the input arrives replicated and each rank takes its part
    packed_colwise[:k]              a fused weight of k equal parts ([gate|up], [q|k|v]; k=2 as in
                                    transformers): each rank ends up with its slice of every part
    packed_rowwise[:k]              the reverse: its input holds each rank's slice of every part
    embedding_rowwise               vocabulary-parallel embedding (partial lookups, all-reduced)
    embedding_colwise               embedding split over the hidden dim, output gathered
    replicated_with_grad_allreduce  weights replicated; their gradients summed over tp (q/k norms over
                                    the local heads)
    local_params                    the module's forward runs on its own tp-sharded parameters as local
                                    tensors (attention sinks: one per head)
    replicate                       nothing sharded
    all_reduce                      the module's output is a partial sum: all-reduced over tp
    moe_tp_experts                  a fused experts module split by whole experts over tp (expert.py);
                                    the plan's entries for its own weights are subsumed
    mla_kv_a_proj                   DeepSeek's replicated kv_a_proj_with_mqa: its rotary part feeds every
                                    (split) head directly, so that part's gradient is summed over tp

A plan key that names a parameter (`...self_attn.sinks: colwise`) shards that parameter alone.
Linear weights are [out, in]; transformers' Conv1D (GPT-2) keeps [in, out]; both are handled.

Packed weights are stored in contiguous row blocks like any colwise weight (so every shard is a
box, which checkpoints and per-rank loading need): the layer computes its block of the fused output,
which is then all-gathered and each rank keeps its slice of every part.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module
from transformers.pytorch_utils import Conv1D

from p3d.compat import traced_all_reduce
from p3d.errors import ConfigError
from p3d.parallel.expert import experts_problems, shard_experts

LINEAR_STYLES = ("colwise", "colwise_gather_output", "rowwise", "rowwise_split_input", "packed_colwise", "packed_rowwise")
EMBEDDING_STYLES = ("embedding_rowwise", "embedding_colwise")
MODULE_STYLES = ("replicated_with_grad_allreduce", "local_params", "replicate", "all_reduce")
EXPERTS_STYLE = "moe_tp_experts"
PARAMETER_STYLES = ("colwise", "rowwise", "replicate")
STYLES = LINEAR_STYLES + EMBEDDING_STYLES + MODULE_STYLES + (EXPERTS_STYLE, "mla_kv_a_proj")
ALIASES = {"colwise_rep": "colwise_gather_output", "rowwise_rep": "rowwise_split_input"}  # transformers' other names
# Styles of transformers' plans not supported here: LongCat-Flash's identity ("zero") experts.
UNSUPPORTED_STYLES = ("moe_identity_expert",)


@dataclass(frozen=True)
class Style:
    """A parsed plan value: `packed_colwise:3` is Style('packed_colwise', 3)."""

    name: str
    parts: int = 1

    @staticmethod
    def parse(value: str) -> "Style":
        name, _, parts = str(value).partition(":")
        name = ALIASES.get(name, name)
        if name.startswith("packed_"):
            return Style(name, int(parts) if parts.isdigit() and int(parts) > 0 else (2 if not parts else -1))
        return Style(name, 1 if not parts else -1)

    @property
    def valid(self) -> bool:
        return self.name in STYLES and self.parts > 0

    @property
    def splits_heads(self) -> bool:
        """Whether the module's output holds only this rank's heads / features (its parent must reshape locally)."""
        return self.name in ("colwise", "packed_colwise")


# ---- which modules styles apply to -------------------------------------------------------------
def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear or a transformers Conv1D; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # Conv1D keeps its weight as [in, out]
    return None


def _weight_dims(module: nn.Module) -> tuple[int, int]:
    """(output-feature dim, input-feature dim) of the weight."""
    return (1, 0) if isinstance(module, Conv1D) else (0, 1)


# ---- plans -------------------------------------------------------------------------------------
def resolve_plan(tp_plan, model_plan: dict[str, str]) -> dict[str, str]:
    """The plan to apply: the model's (`auto`, from the models seam) or the one in the model YAML."""
    if tp_plan == "auto":
        return _subsume_expert_weights(dict(model_plan))
    if isinstance(tp_plan, dict) or hasattr(tp_plan, "items"):
        return _subsume_expert_weights({str(pattern): str(style) for pattern, style in tp_plan.items()})
    raise ConfigError(f"model.tp_plan={tp_plan}: use auto or a map of module pattern to style ({', '.join(STYLES)})")


def _subsume_expert_weights(plan: dict[str, str]) -> dict[str, str]:
    """Drop entries for the weights of an experts module the plan splits by whole experts (transformers'
    plans split each expert's `gate_up_proj` / `down_proj` instead; p3d keeps every expert whole)."""
    experts = [pattern for pattern, value in plan.items() if Style.parse(value).name == EXPERTS_STYLE]
    return {pattern: value for pattern, value in plan.items() if not any(pattern.startswith(prefix + ".") for prefix in experts)}


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def match_plan(plan: dict[str, str], model: nn.Module, parameters: bool = False) -> dict[str, str]:
    """Expand patterns to concrete names: {module name: style} (or {parameter name: style})."""
    names = [name for name, _ in model.named_parameters()] if parameters else [name for name, _ in model.named_modules()]
    matched: dict[str, str] = {}
    for pattern, style in plan.items():
        regex = _pattern_regex(pattern)
        for name in names:
            if regex.fullmatch(name):
                matched[name] = style
    return matched


def plan_without_module(plan: dict[str, str], model: nn.Module, module: nn.Module) -> dict[str, str]:
    """`plan` less the patterns that match `module`'s name (another parallelism shards it)."""
    return plan_without_names(plan, [name for name, candidate in model.named_modules() if candidate is module])


def plan_without_names(plan: dict[str, str], names: list[str]) -> dict[str, str]:
    return {pattern: style for pattern, style in plan.items() if not any(_pattern_regex(pattern).fullmatch(name) for name in names)}


def check_plan(plan: dict[str, str], model: nn.Module, tp: int) -> list[str]:
    """Problems with applying `plan` at degree `tp` to `model`, one line each (empty if fine)."""
    if tp == 1:
        return []
    unsupported = [f"{pattern}: {value}" for pattern, value in plan.items() if Style.parse(value).name in UNSUPPORTED_STYLES]
    if unsupported:
        return [f"model.tp_plan: {unsupported[0]} (identity experts) is not supported under tensor parallelism; use parallel.tp=1"]
    problems = []
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    for pattern, value in plan.items():
        style = Style.parse(value)
        if not style.valid:
            problems.append(f"model.tp_plan: style '{value}' of '{pattern}' is not supported (supported: {', '.join(STYLES)}, packed_*:<parts>)")
            continue
        module_matches = match_plan({pattern: value}, model)
        parameter_matches = match_plan({pattern: value}, model, parameters=True)
        if not module_matches and not parameter_matches:
            problems.append(f"model.tp_plan: pattern '{pattern}' matches no module of {type(model).__name__}")
            continue
        for name in module_matches:
            problem = _module_problem(name, modules[name], style, tp)
            if problem:
                problems.append(problem)
                break
        for name in parameter_matches:
            problem = _parameter_problem(name, parameters[name], style, tp)
            if problem:
                problems.append(problem)
                break
    if any(Style.parse(value).name == "mla_kv_a_proj" for value in plan.values()) and not isinstance(_text_config_rope_dim(model), int):
        problems.append("model.tp_plan: mla_kv_a_proj needs model.config.qk_rope_head_dim (the rotary part of its output); use parallel.tp=1")
    problems.extend(_tied_embedding_problems(plan, model))
    problems.extend(_unplanned_weights_between_split_layers(plan, model))
    return problems


def _unplanned_weights_between_split_layers(plan: dict[str, str], model: nn.Module) -> list[str]:
    """A norm (or other weight) next to split projections that spans all their features would see only this
    rank's part (BitNet's attn_sub_norm over the whole attention output): refused, naming it."""
    matched = match_plan(plan, model)
    planned_params = set(match_plan(plan, model, parameters=True))
    split_widths: dict[str, set[int]] = {}
    for name, value in matched.items():
        features = linear_features(model.get_submodule(name))
        if Style.parse(value).splits_heads and features is not None:
            split_widths.setdefault(name.rpartition(".")[0], set()).add(features[1])
    for parent, widths in split_widths.items():
        for name, module in model.get_submodule(parent).named_modules():
            full = f"{parent}.{name}" if name else parent
            if full in matched or linear_features(module) is not None:
                continue
            for leaf, param in module.named_parameters(recurse=False):
                if param.dim() == 1 and param.shape[0] in widths and f"{full}.{leaf}" not in planned_params:
                    pattern = re.sub(r"\.\d+\.", ".*.", full)
                    return [
                        f"model.tp_plan: '{pattern}' ({type(module).__name__} over {param.shape[0]} features) spans the whole output of "
                        f"layers the plan splits, so under tp it would see only this rank's part; gather those layers (colwise_gather_output) or use parallel.tp=1"
                    ]
    return []


def _module_problem(name: str, module: nn.Module, style: Style, tp: int) -> str | None:
    if style.name in MODULE_STYLES:
        return None
    if style.name == EXPERTS_STYLE:
        problems = experts_problems(name, module, tp, f"parallel.tp={tp}")
        return problems[0] if problems else None
    if style.name in EMBEDDING_STYLES:
        if not isinstance(module, nn.Embedding):
            return f"model.tp_plan: '{name}' is a {type(module).__name__}; {style.name} applies to Embedding modules"
        size = module.weight.shape[0 if style.name == "embedding_rowwise" else 1]
    else:
        features = linear_features(module)
        if features is None:
            return f"model.tp_plan: '{name}' is a {type(module).__name__}; {style.name} applies to Linear (and Conv1D) modules"
        if style.name == "mla_kv_a_proj":
            return None  # replicated; its rotary width is checked in check_plan
        features_in, features_out = features
        size = features_out if "colwise" in style.name else features_in
        if size % style.parts:
            return f"model.tp_plan: '{name}' ({style.name}:{style.parts}) has {size} features, not {style.parts} equal parts"
        size //= style.parts
    if size % tp:
        return f"parallel.tp={tp}: '{name}' ({style.name}) splits a dimension of size {size}, which tp does not divide"
    return None


def _parameter_problem(name: str, parameter: nn.Parameter, style: Style, tp: int) -> str | None:
    if style.name not in PARAMETER_STYLES:
        return f"model.tp_plan: '{name}' is a parameter; styles for parameters are {', '.join(PARAMETER_STYLES)} (not {style.name})"
    dim = _parameter_shard_dim(name, parameter, style)
    if dim is not None and parameter.shape[dim] % tp:
        return f"parallel.tp={tp}: '{name}' ({style.name}) splits a dimension of size {parameter.shape[dim]}, which tp does not divide"
    return None


def _tied_embedding_problems(plan: dict[str, str], model: nn.Module) -> list[str]:
    config = model.config.get_text_config() if hasattr(model, "config") else None
    if not getattr(config, "tie_word_embeddings", False):
        return []
    names = {module: name for name, module in model.named_modules()}
    input_name = names.get(model.get_input_embeddings())
    output_name = names.get(model.get_output_embeddings())
    matched = match_plan(plan, model)
    in_style, out_style = matched.get(input_name), matched.get(output_name)
    sharded_alike = in_style == "embedding_rowwise" and out_style in ("colwise", "colwise_gather_output")
    if (in_style or out_style) and not sharded_alike:
        return [
            f"model.tp_plan: tied embeddings '{input_name}' and '{output_name}' must both be sharded over the vocabulary "
            f"(embedding_rowwise and colwise_gather_output) or both left out of the plan"
        ]
    return []


# ---- the styles --------------------------------------------------------------------------------
def _replace_parameter(module: nn.Module, leaf: str, mesh: DeviceMesh, placement) -> None:
    param = module._parameters[leaf]
    module.register_parameter(leaf, nn.Parameter(distribute_tensor(param, mesh, [placement], src_data_rank=None), requires_grad=param.requires_grad))


def _as_dtensor(tensor: torch.Tensor, mesh: DeviceMesh, placement) -> DTensor:
    return tensor if isinstance(tensor, DTensor) else DTensor.from_local(tensor, mesh, [placement], run_check=False)


class _Colwise(ParallelStyle):
    """Linear / Conv1D split over output features (embedding_colwise: an Embedding over its hidden dim)."""

    def __init__(self, gather_output: bool = False, parts: int = 1):
        self.gather_output = gather_output or parts > 1
        self.parts = parts

    def _partition(self, name, module, mesh):
        out_dim = 1 if isinstance(module, nn.Embedding) else _weight_dims(module)[0]
        for leaf in [leaf for leaf, _ in module.named_parameters(recurse=False)]:
            _replace_parameter(module, leaf, mesh, Shard(out_dim if leaf == "weight" else 0))

    @staticmethod
    def _input(module, inputs, mesh):
        return (_as_dtensor(inputs[0], mesh, Replicate()), *inputs[1:])

    def _output(self, module, output, mesh):
        if not self.gather_output:
            return _local(output)
        full = output.redistribute(placements=[Replicate()])
        if self.parts == 1:
            return _local(full)
        # This rank's slice of every part; the gathered copy gets a gradient only where this rank used it.
        pieces = full.to_local(grad_placements=[Partial()]).chunk(self.parts * mesh.size(), dim=-1)
        rank = mesh.get_local_rank()
        return torch.cat([pieces[part * mesh.size() + rank] for part in range(self.parts)], dim=-1)

    def _apply(self, module, device_mesh):
        return distribute_module(module, device_mesh, self._partition, self._input, partial(_Colwise._output, self))


class _Rowwise(ParallelStyle):
    """Linear / Conv1D split over input features (embedding_rowwise: an Embedding over the vocabulary)."""

    def __init__(self, input_layout: str = "sharded", output_placement=None, parts: int = 1):
        self.input_layout = input_layout  # sharded | replicated | packed
        self.output_placement = output_placement or Replicate()
        self.parts = parts

    def _partition(self, name, module, mesh):
        in_dim = 0 if isinstance(module, nn.Embedding) else _weight_dims(module)[1]
        for leaf in [leaf for leaf, _ in module.named_parameters(recurse=False)]:
            _replace_parameter(module, leaf, mesh, Shard(in_dim) if leaf == "weight" else Replicate())

    def _input(self, module, inputs, mesh):
        x = inputs[0]
        if isinstance(module, nn.Embedding):
            return (_as_dtensor(x, mesh, Replicate()), *inputs[1:])
        if self.input_layout == "packed":
            x = _unpack(x, mesh, self.parts)
        if self.input_layout in ("replicated", "packed"):
            x = _as_dtensor(x, mesh, Replicate()).redistribute(placements=[Shard(-1)])
        return (_as_dtensor(x, mesh, Shard(-1)), *inputs[1:])

    def _output(self, module, output, mesh):
        return _local(output.redistribute(placements=[self.output_placement]))

    def _apply(self, module, device_mesh):
        return distribute_module(module, device_mesh, self._partition, partial(_Rowwise._input, self), partial(_Rowwise._output, self))


def _local(output: DTensor) -> torch.Tensor:
    return own_tensor(output.to_local())


class _OwnTensor(torch.autograd.Function):
    """The same values as a tensor of its own instead of a view: no copy, gradients pass unchanged.

    `DTensor.to_local()` returns a view made by a custom autograd Function. A model may modify a
    module's output in place (Falcon's `mlp_output += attention_output`), which autograd refuses on
    such a view; and when the module is an FSDP2 unit (the embedding, the output head, and through
    the head the model's logits), FSDP2 registers its pre-backward hook (the parameters' all-gather)
    on that output, and an in-place op on a view would re-base it and drop the hook (FSDP2 warns
    "returned a view tensor ... wrong gradients"). On a tensor of its own an in-place op keeps the
    hook. The result shares storage and version counter with the view, so autograd still catches a
    modified saved tensor.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


own_tensor = _OwnTensor.apply


def _unpack(x: torch.Tensor, mesh: DeviceMesh, parts: int) -> DTensor:
    """Each rank's [slice of part 0 | slice of part 1 | ...] -> the whole input, parts in their order (replicated)."""
    tp = mesh.size()
    gathered = _as_dtensor(x, mesh, Shard(-1)).redistribute(placements=[Replicate()]).to_local()
    pieces = gathered.chunk(tp * parts, dim=-1)  # rank-major: rank 0's parts, then rank 1's, ...
    ordered = torch.cat([pieces[rank * parts + part] for part in range(parts) for rank in range(tp)], dim=-1)
    return DTensor.from_local(ordered, mesh, [Replicate()], run_check=False)


class SumGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (an input shared by the group's ranks).

    This and SumOverGroup sum in place with c10d in eager mode and with a traced collective inside a
    compiled block (train.compile), where an in-place c10d call would break the block's graph in two.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        if torch.compiler.is_compiling():
            return traced_all_reduce(grad, ctx.group), None
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SumOverGroup(torch.autograd.Function):
    """All-reduce forward (the partial sums of a row-parallel layer); identity backward."""

    @staticmethod
    def forward(ctx, tensor, group):
        if torch.compiler.is_compiling():
            return traced_all_reduce(tensor, group)
        summed = tensor.contiguous()
        if summed is tensor:
            ctx.mark_dirty(tensor)  # summed in place: the layer's fresh output, which no backward needs
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim (rank order); backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.rank, ctx.width = dist.get_rank(group), tensor.shape[-1]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width), None


class _SharedColumnInput:
    """The input of a column-parallel layer, with its gradient summed over tp, shared by the layers that read
    the same tensor (q, k and v; gate and up): their gradients add up first, then one all-reduce sums them
    over tp, where a SumGradient per layer would all-reduce each one. Remembers the last input only: a view
    of it, which the layers save for their backward anyway."""

    def __init__(self):
        self._input = lambda: None
        self._entered: torch.Tensor | None = None
        self._group = None

    def entering(self, tensor: torch.Tensor, group) -> torch.Tensor:
        if self._entered is not None and self._input() is tensor and self._group is group and torch.is_grad_enabled():
            return self._entered
        entered = SumGradient.apply(tensor, group)
        self._input, self._entered, self._group = weakref.ref(tensor), entered, group
        return entered


_shared_input = _SharedColumnInput()


class _LocalLinear(ParallelStyle):
    """colwise, colwise_gather_output and rowwise on plain tensors with explicit collectives (Megatron's scheme).

    The parameters are sharded DTensors exactly as with the DTensor styles (`_Colwise` / `_Rowwise`: the
    same shards, so FSDP2 and checkpoints see no difference), but the forward runs the module's own code on
    their local shards and plain activations, so no op of the block goes through DTensor's dispatch:
    column-parallel: identity forward / gradient all-reduced over tp on the input, output this rank's
    features (all-gathered for colwise_gather_output); row-parallel: input this rank's features, output
    all-reduced, then the bias (replicated) added once. Gradients reach the parameters as DTensors with the
    parameters' own placements (`to_local`'s backward). Only for layers running nn.Linear's own forward (other
    layers, e.g. transformers' Conv1D, take the DTensor styles), and not under sequence parallelism, whose
    norms hand the projections DTensors.
    """

    def __init__(self, rowwise: bool, gather_output: bool = False):
        self.rowwise = rowwise
        self.gather_output = gather_output

    def _apply(self, module, device_mesh):
        sharding = _Rowwise() if self.rowwise else _Colwise(gather_output=self.gather_output)
        if type(module).forward is not nn.Linear.forward:
            # A layer with code of its own (transformers' Conv1D shapes its output by its full width): DTensor's way.
            return sharding._apply(module, device_mesh)
        sharding._partition(None, module, device_mesh)
        group = device_mesh.get_group()
        originals: list[dict[str, torch.Tensor]] = []
        biases: list[torch.Tensor | None] = []

        def before(mod, args):
            params = dict(mod._parameters)
            originals.append(params)
            for leaf, param in params.items():
                if param is not None:
                    mod._parameters[leaf] = param.to_local()
            bias = mod._parameters.get("bias")
            if self.rowwise and bias is not None:
                biases.append(bias)  # added after the all-reduce, once
                mod._parameters["bias"] = None
            elif self.rowwise:
                biases.append(None)
            if self.rowwise:
                return args
            return (_shared_input.entering(args[0], group), *args[1:])

        def after(mod, args, output):
            mod._parameters.update(originals.pop())
            if self.rowwise:
                output = SumOverGroup.apply(output, group)
                bias = biases.pop()
                return output if bias is None else output + bias
            if self.gather_output:
                return _GatherLastDim.apply(output, group)
            return output

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
        return module


class _SwapParameters(ParallelStyle):
    """Runs the module's forward with each of its own parameters swapped for a function of it."""

    def swap(self, param: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, module, device_mesh):
        originals: list[dict[str, torch.Tensor]] = []

        def before(mod, args):
            params = dict(mod._parameters)
            originals.append(params)
            for leaf, param in params.items():
                if param is not None:
                    mod._parameters[leaf] = self.swap(param, device_mesh)

        def after(mod, args, output):
            mod._parameters.update(originals.pop())

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
        return module


class _ReplicatedWithGradAllReduce(_SwapParameters):
    def swap(self, param, mesh):
        return SumGradient.apply(param, mesh.get_group())


class _LocalParams(_SwapParameters):
    def swap(self, param, mesh):
        return param.to_local() if isinstance(param, DTensor) else param


class _AllReduceOutput(ParallelStyle):
    def _apply(self, module, device_mesh):
        def after(mod, args, output):
            if output is None:
                return None
            return _local(DTensor.from_local(output, device_mesh, [Partial()], run_check=False).redistribute(placements=[Replicate()]))

        module.register_forward_hook(after)
        return module


class _Replicate(ParallelStyle):
    def _apply(self, module, device_mesh):
        return module


class _ExpertsOverTP(ParallelStyle):
    def _apply(self, module, device_mesh):
        shard_experts(module, device_mesh, tokens_shared=True)
        return module


def _text_config_rope_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config.get_text_config(), "qk_rope_head_dim", None) if config is not None else None


class _MlaKvAProj(ParallelStyle):
    """Replicated weight; the last `qk_rope_head_dim` output features (the rotary key every head shares)
    go straight into the split attention, so their gradient is summed over tp. The rest passes through
    kv_b_proj, whose split input already sums its gradient."""

    def __init__(self, rope_dim: int):
        self.rope_dim = rope_dim

    def _apply(self, module, device_mesh):
        rope_dim = self.rope_dim
        group = device_mesh.get_group()

        def after(mod, args, output):
            passed, rope = output.split([output.shape[-1] - rope_dim, rope_dim], dim=-1)
            return torch.cat([passed, SumGradient.apply(rope, group)], dim=-1)

        module.register_forward_hook(after)
        return module


def make_style(value: str, sequence_parallel: bool = False, rope_dim: int | None = None) -> ParallelStyle:
    """The ParallelStyle for a plan value. Under sequence parallelism a rowwise layer reduce-scatters its
    output onto the tokens (the second-to-last dim) instead of all-reducing it (see sequence.py)."""
    style = Style.parse(value)
    name, parts = style.name, style.parts
    if not sequence_parallel and name in ("colwise", "colwise_gather_output", "rowwise"):
        return _LocalLinear(rowwise=name == "rowwise", gather_output=name == "colwise_gather_output")
    if name == "colwise":
        return _Colwise()
    if name in ("colwise_gather_output", "embedding_colwise"):
        return _Colwise(gather_output=True)
    if name == "packed_colwise":
        return _Colwise(parts=parts)
    if name == "rowwise":
        return _Rowwise(output_placement=Shard(-2) if sequence_parallel else Replicate())
    if name in ("rowwise_split_input", "embedding_rowwise"):
        return _Rowwise(input_layout="replicated")
    if name == "packed_rowwise":
        return _Rowwise(input_layout="packed", parts=parts)
    if name == "replicated_with_grad_allreduce":
        return _ReplicatedWithGradAllReduce()
    if name == "local_params":
        return _LocalParams()
    if name == "all_reduce":
        return _AllReduceOutput()
    if name == "replicate":
        return _Replicate()
    if name == EXPERTS_STYLE:
        return _ExpertsOverTP()
    if name == "mla_kv_a_proj":
        return _MlaKvAProj(rope_dim)
    raise ValueError(f"unknown tensor-parallel style {value!r}")


def _parameter_shard_dim(name: str, parameter: torch.Tensor, style: Style) -> int | None:
    """The dim a parameter-level plan entry splits (transformers' rule), or None to replicate it."""
    if style.name == "colwise":
        return 0 if parameter.dim() == 1 else parameter.dim() - 2
    if style.name == "rowwise" and not name.endswith("bias"):
        return parameter.dim() - 1
    return None


def apply_tensor_parallel(
    model: nn.Module,
    plan: dict[str, str],
    tp_mesh: DeviceMesh,
    sequence_parallel: bool = False,
    localised_attributes: Iterable[str] = (),
    localised_widths: Iterable[str] = (),
) -> None:
    """Shard the planned modules and parameters over `tp_mesh` (the model may still be on the meta device).

    In the modules whose projections the plan splits by heads, the head counts named in `localised_attributes`
    become tp-local, and so do the widths named in `localised_widths` that equal head count x `head_dim`
    (the first count of `localised_attributes` the module has)."""
    parameters = dict(model.named_parameters())
    for name, value in match_plan(plan, model, parameters=True).items():
        dim = _parameter_shard_dim(name, parameters[name], Style.parse(value))
        if dim is not None:
            owner, _, leaf = name.rpartition(".")
            _replace_parameter(model.get_submodule(owner), leaf, tp_mesh, Shard(dim))
    matched = match_plan(plan, model)
    rope_dim = _text_config_rope_dim(model)
    parallelize_module(model, tp_mesh, {name: make_style(value, sequence_parallel, rope_dim) for name, value in matched.items()})
    _localise_attributes(model, matched, tp_mesh.size(), tuple(localised_attributes), tuple(localised_widths))


def _localise_attributes(model: nn.Module, matched: dict[str, str], tp: int, counts: tuple[str, ...], widths: tuple[str, ...] = ()) -> None:
    """Divide the head counts (and the like) of modules whose projections now output only this rank's heads,
    and their widths that are those of all heads."""
    modules = dict(model.named_modules())
    parents = {_head_owner(modules, name, counts) for name, value in matched.items() if Style.parse(value).splits_heads}
    for name, module in model.named_modules():
        if name not in parents:
            continue
        heads_width = _heads_width(module, counts)  # before the counts change
        localised = list(counts) + [attribute for attribute in widths if heads_width is not None and _int(getattr(module, attribute, None)) == heads_width]
        for attribute in localised:
            value = _int(getattr(module, attribute, None))
            if value is not None:
                setattr(module, attribute, value // tp)


def _head_owner(modules: dict[str, nn.Module], name: str, counts: tuple[str, ...]) -> str:
    """The module that holds the head counts of projection `name`: its parent, or the parent's parent where the
    parent is a wrapper holding none (Moshi's `q_proj.linear` inside `q_proj`)."""
    parent = name.rpartition(".")[0]
    wrapper = modules.get(parent)
    is_wrapper = wrapper is not None and len(list(wrapper.children())) == 1 and not _has_any(wrapper, counts)
    above = parent.rpartition(".")[0]
    return above if is_wrapper and _has_any(modules.get(above), counts) else parent


def _has_any(module: nn.Module | None, attributes: tuple[str, ...]) -> bool:
    return module is not None and any(_int(getattr(module, attribute, None)) is not None for attribute in attributes)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _heads_width(module: nn.Module, counts: tuple[str, ...]) -> int | None:
    """head count x head_dim of an attention module (the first of `counts` it has), or None."""
    head_dim = _int(getattr(module, "head_dim", None))
    heads = next((value for value in (_int(getattr(module, count, None)) for count in counts) if value is not None), None)
    return heads * head_dim if head_dim is not None and heads is not None else None
