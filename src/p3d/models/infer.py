"""A tensor-parallel plan inferred from a decoder's module structure, for models transformers ships none for.

In every decoder block p3d looks for the attention projections (by their usual names) and the MLP (by
shape: linears from the block's residual width, which the attention's output projection writes, up,
and one back down), and plans them the Megatron way:

- attention with separate query / key / value projections: those colwise (each rank its heads), the
  output projection rowwise. If the attention module holds anything else with weights (q/k norms,
  which may normalise over all heads), the projections are gathered instead (colwise_gather_output,
  rowwise_split_input): exact whatever the module does between them.
- a fused query-key-value projection: its layout (per head, per kv group, or q|k|v) is not visible
  from outside, so it is gathered (colwise_gather_output) and the output projection takes its slice
  (rowwise_split_input). Exact for any layout; the attention itself is not split.
- the MLP: the up (and gate) projections colwise, the down projection rowwise; gathered as above where
  the MLP module holds other weights (a norm over the intermediate features, BitNet).
- the output head: vocabulary-parallel (colwise_gather_output), and the input embedding too
  (embedding_rowwise), which a tied head requires.

A block with a linear layer that fits none of these is not recognised: no plan, and validation says
which module. The plan is shown by `p3d plan` and by validation under tp > 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from p3d.parallel.tensor import linear_features

QKV_NAMES = {
    "query": ("q_proj", "query", "q", "wq", "Wq", "q_lin", "query_proj", "project_q"),
    "key": ("k_proj", "key", "k", "wk", "Wk", "k_lin", "key_proj", "project_k"),
    "value": ("v_proj", "value", "v", "wv", "Wv", "v_lin", "value_proj", "project_v"),
}
WRAPPED_LINEAR = "linear"  # a projection module that holds its nn.Linear as `.linear` (Moshi's MoshiLinear)
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack", "qkv_linear")


@dataclass(frozen=True)
class InferredPlan:
    plan: dict[str, str]
    problem: str | None = None


class NotRecognised(Exception):
    pass


def infer_plan(model: nn.Module, blocks: list[nn.Module]) -> InferredPlan:
    """A plan for `model` from the structure of its decoder blocks, or the reason there is none."""
    names = {module: name for name, module in model.named_modules()}
    if not blocks:
        return InferredPlan({}, f"{type(model).__name__}: no decoder blocks found to infer a tensor-parallel plan from")
    plan: dict[str, str] = {}
    try:
        for block in blocks:
            pattern = _layer_pattern(names[block])
            for relative, style in _block_plan(block).items():
                key = f"{pattern}.{relative}"
                if plan.setdefault(key, style) != style:
                    raise NotRecognised(f"'{key}' would be both {plan[key]} and {style} in different blocks")
    except NotRecognised as reason:
        return InferredPlan({}, f"{type(model).__name__}: block structure not recognised ({reason})")
    plan.update(_embedding_plan(model, names))
    return InferredPlan(plan)


def _layer_pattern(block_name: str) -> str:
    return re.sub(r"\.\d+$", ".*", block_name)


def _block_plan(block: nn.Module) -> dict[str, str]:
    linears = {name: module for name, module in block.named_modules() if linear_features(module) is not None}
    plan: dict[str, str] = {}
    roots = []
    for group in _projection_groups(linears):  # self-attention, and cross-attention where a decoder has it
        root, attention_plan = _attention_plan(block, linears, group)
        roots.append(root)
        plan.update(attention_plan)
    # The block's residual width: what its (first) attention's output projection writes back.
    output = next(name for name, style in plan.items() if style in ("rowwise", "rowwise_split_input"))
    hidden = linear_features(linears[output])[1]
    rest = {name: module for name, module in linears.items() if not any(_inside(name, root) for root in roots)}
    return {**plan, **_gathered_if_mlp_has_other_weights(block, _mlp_plan(rest, hidden))}


def _projection_groups(linears: dict[str, nn.Module]) -> list[list[str]]:
    """The query/key/value projections of each attention module: separate ones grouped by their parent, or fused ones."""
    by_parent: dict[str, dict[str, str]] = {}
    for name in linears:
        for role, leaves in QKV_NAMES.items():
            if _leaf(name) in leaves:
                by_parent.setdefault(_unwrapped(name).rpartition(".")[0], {})[role] = name
    groups = [[found[role] for role in QKV_NAMES] for found in by_parent.values() if len(found) == len(QKV_NAMES)]
    groups += [[name] for name in linears if _leaf(name) in FUSED_QKV_NAMES]
    if not groups:
        raise NotRecognised("no query/key/value projections (q_proj, k_proj, v_proj or a fused query_key_value) in one block")
    return groups


@dataclass(frozen=True)
class SelfAttention:
    """A block's self-attention module and, where they are separate, its key and value projections."""

    module: nn.Module
    key: nn.Module | None
    value: nn.Module | None


def self_attention(block: nn.Module) -> SelfAttention | None:
    """The block's self-attention (the owner of its first query/key/value projections, separate or fused),
    or None when the block has none p3d recognises."""
    linears = {name: module for name, module in block.named_modules() if linear_features(module) is not None}
    try:
        group = _projection_groups(linears)[0]
    except NotRecognised:
        return None
    root = _unwrapped(group[0]).rpartition(".")[0]
    if len(group) == len(QKV_NAMES):
        return SelfAttention(block.get_submodule(root), linears[group[1]], linears[group[2]])
    return SelfAttention(block.get_submodule(root), None, None) if root else None


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _leaf(name: str) -> str:
    """The name that says what a linear layer is: its own, or its wrapper's (Moshi's `q_proj.linear`)."""
    return _unwrapped(name).rpartition(".")[2]


def _unwrapped(name: str) -> str:
    return name.removesuffix(f".{WRAPPED_LINEAR}")


def _attention_plan(block: nn.Module, linears: dict[str, nn.Module], projections: list[str]) -> tuple[str, dict[str, str]]:
    """(the attention module's name inside the block, its plan)."""
    root = projections[0].split(".")[0] if "." in projections[0] else ""
    if not root or any(not _inside(name, root) for name in projections):
        raise NotRecognised(f"the attention projections {', '.join(projections)} do not share one attention module")
    others = [name for name in linears if _inside(name, root) and name not in projections]
    if len(others) != 1:
        raise NotRecognised(f"attention module '{root}' has {len(others)} other linear layers ({', '.join(others) or 'none'}); expected one output projection")
    (output,) = others
    attention = block.get_submodule(root)
    gather = len(projections) == 1 or _has_other_weights(attention, {*projections, output}, root)
    inner = "colwise_gather_output" if gather else "colwise"
    outer = "rowwise_split_input" if gather else "rowwise"
    return root, {**{name: inner for name in projections}, output: outer}


def _has_other_weights(attention: nn.Module, planned: set[str], root: str) -> bool:
    for name, module in attention.named_modules():
        full = f"{root}.{name}" if name else root
        if full not in planned and any(True for _ in module.parameters(recurse=False)):
            return True
    return False


def _mlp_plan(linears: dict[str, nn.Module], hidden: int) -> dict[str, str]:
    """Up (and gate) projections from the hidden size, one down projection back to it."""
    if not linears:
        raise NotRecognised("no MLP linear layers outside the attention module")
    shapes = {name: linear_features(module) for name, module in linears.items()}
    downs = [name for name, (features_in, features_out) in shapes.items() if features_out == hidden and features_in != hidden]
    if len(downs) != 1:
        raise NotRecognised(f"MLP layers {', '.join(linears)}: expected one projection back to the hidden size {hidden}")
    (down,) = downs
    width = shapes[down][0]
    ups = [name for name in linears if name != down]
    fused = [name for name in ups if shapes[name] == (hidden, 2 * width)]
    plain = [name for name in ups if shapes[name] == (hidden, width)]
    if len(fused) + len(plain) != len(ups) or not ups or (fused and plain):
        raise NotRecognised(f"MLP layers {', '.join(ups)}: expected projections from {hidden} to {width} (or fused to {2 * width})")
    if fused:
        return {**{name: "colwise_gather_output" for name in fused}, down: "rowwise_split_input"}
    return {**{name: "colwise" for name in plain}, down: "rowwise"}


def _gathered_if_mlp_has_other_weights(block: nn.Module, mlp: dict[str, str]) -> dict[str, str]:
    """An MLP module that holds weights besides its projections (BitNet's norm over the intermediate features)
    sees the whole intermediate width: its up projections gathered, the down projection taking its slice."""
    root = _common_parent(list(mlp))
    if not root or not _has_other_weights(block.get_submodule(root), set(mlp), root):
        return mlp
    return {name: "rowwise_split_input" if style.startswith("rowwise") else "colwise_gather_output" for name, style in mlp.items()}


def _common_parent(names: list[str]) -> str:
    parents = {name.rpartition(".")[0] for name in names}
    return parents.pop() if len(parents) == 1 else ""


def _embedding_plan(model: nn.Module, names: dict[nn.Module, str]) -> dict[str, str]:
    plan = {}
    output = model.get_output_embeddings()
    if output is not None and linear_features(output) is not None:
        plan[names[output]] = "colwise_gather_output"
        embedding = model.get_input_embeddings()
        # tied to the head (which requires it), or over the same vocabulary; Moshi's has one more row: replicated
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        if isinstance(embedding, nn.Embedding) and (tied or embedding.num_embeddings == linear_features(output)[1]):
            plan[names[embedding]] = "embedding_rowwise"
    return plan
