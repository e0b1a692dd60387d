"""Tensor parallelism from a Hugging Face style plan ({module pattern: style}).

The plan's patterns are module names of the causal-LM model with `*` for one name segment
(a layer index), exactly like transformers' `model._tp_plan`. `model.tp_plan=auto` takes that
plan; a model YAML may carry its own (OPT ships none). Styles become torch's
`ColwiseParallel` / `RowwiseParallel` on the tp sub-mesh of p3d's own mesh.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from p3d.errors import ConfigError

STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
}

# Under sequence parallelism a row-parallel layer reduce-scatters its output onto the tokens
# (the second-to-last dim) instead of all-reducing it (see sequence.py).
SEQUENCE_PARALLEL_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "rowwise": lambda: RowwiseParallel(output_layouts=Shard(-2)),
}

# Which weight dimension a style splits (Linear weights are [out, in], Embedding [vocab, dim]).
_SPLIT_DIM = {"colwise": 0, "colwise_gather_output": 0, "rowwise": 1, "rowwise_split_input": 1, "embedding_rowwise": 0}

# Attention modules that keep the head count as an attribute and reshape with it (OPT's
# `view(bsz, -1, self.num_heads, head_dim)`) must see the local head count under TP, or the
# reshape silently mixes sequence and heads.
_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_heads", "n_head")


def resolve_plan(tp_plan: Any, model: nn.Module) -> dict[str, str]:
    """The plan to apply: the model's own (`auto`) or the one from the model YAML."""
    if tp_plan == "auto":
        return dict(getattr(model, "_tp_plan", None) or {})
    if isinstance(tp_plan, dict) or hasattr(tp_plan, "items"):
        return {str(pattern): str(style) for pattern, style in tp_plan.items()}
    raise ConfigError(f"model.tp_plan={tp_plan}: use auto or a map of module pattern to style ({', '.join(STYLES)})")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def match_plan(plan: dict[str, str], model: nn.Module) -> dict[str, str]:
    """Expand patterns to concrete module names: {module name: style}."""
    names = [name for name, _ in model.named_modules()]
    matched: dict[str, str] = {}
    for pattern, style in plan.items():
        regex = _pattern_regex(pattern)
        for name in names:
            if regex.fullmatch(name):
                matched[name] = style
    return matched


def check_plan(plan: dict[str, str], model: nn.Module, tp: int) -> list[str]:
    """Problems with applying `plan` at degree `tp` to `model`, one line each (empty if fine)."""
    if tp == 1:
        return []
    model_type = type(model).__name__
    if not plan:
        return [f"model.tp_plan: {model_type} has no tensor-parallel plan in transformers; give one in the model YAML (module pattern: style)"]
    problems = []
    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        if style not in STYLES:
            problems.append(f"model.tp_plan: style '{style}' of '{pattern}' is not supported (supported: {', '.join(STYLES)})")
            continue
        matches = match_plan({pattern: style}, model)
        if not matches:
            problems.append(f"model.tp_plan: pattern '{pattern}' matches no module of {model_type}")
            continue
        for name in matches:
            problem = _divisibility_problem(name, modules[name], style, tp)
            if problem:
                problems.append(problem)
                break
    problems.extend(_tied_embedding_problems(plan, model))
    return problems


def _divisibility_problem(name: str, module: nn.Module, style: str, tp: int) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(module, (nn.Linear, nn.Embedding)) or weight is None:
        return f"model.tp_plan: '{name}' is a {type(module).__name__}; styles apply to Linear and Embedding modules"
    size = weight.shape[_SPLIT_DIM[style]]
    if size % tp:
        return f"parallel.tp={tp}: '{name}' ({style}) splits a dimension of size {size}, which tp does not divide"
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


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard the planned modules over `tp_mesh` (the model may still be on the meta device)."""
    matched = match_plan(plan, model)
    styles = {**STYLES, **SEQUENCE_PARALLEL_STYLES} if sequence_parallel else STYLES
    parallelize_module(model, tp_mesh, {name: styles[style]() for name, style in matched.items()})
    for name in matched:
        model.get_submodule(name).register_forward_hook(_output_of_its_own)
    _localise_head_counts(model, matched, tp_mesh.size())


class _OwnTensor(torch.autograd.Function):
    """The same values as a tensor of its own instead of a view: no copy, gradients pass unchanged.

    The TP styles hand out `DTensor.to_local()`, which autograd makes a view of the DTensor's local
    tensor. When such a module is an FSDP2 unit (the embedding, the output head, and through the head
    the model's logits), FSDP2 registers its pre-backward hook (the parameters' all-gather) on that
    output, and an in-place op on a view would re-base it and drop the hook; FSDP2 warns "returned a
    view tensor ... wrong gradients". On a tensor of its own an in-place op keeps the hook (its node
    stays in the graph), so the hazard, not just the warning, is gone. The result shares storage and
    version counter with the view, so autograd still catches a modified saved tensor.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


own_tensor = _OwnTensor.apply


def _output_of_its_own(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and not isinstance(output, DTensor):
        return own_tensor(output)
    return output


def _localise_head_counts(model: nn.Module, matched: dict[str, str], tp: int) -> None:
    parents = {name.rpartition(".")[0] for name, style in matched.items() if style == "colwise"}
    for name, module in model.named_modules():
        if name not in parents:
            continue
        for attribute in _HEAD_COUNT_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, attribute, value // tp)
