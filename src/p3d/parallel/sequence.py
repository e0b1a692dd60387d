"""Sequence parallelism for TP: between TP regions, each tp rank holds 1/tp of the tokens.

Under plain TP every tp rank holds the whole residual stream and runs every norm on all
tokens. With `parallel.sequence_parallel=true` (Megatron-style, as in torchtitan):

- the first decoder block's input is split along the sequence over tp (a local slice), and the
  last block's output is gathered again, so the embeddings, the model's own position handling
  (Llama's rotary tables, OPT's learned positions) and the final norm and head see the whole
  (cp-local) sequence exactly as without SP;
- inside the blocks, residual adds and norms run on this rank's tokens only; each norm's
  output is all-gathered (a Replicate DTensor) right before the column-parallel projections
  that consume it, and the row-parallel projections reduce-scatter their output back onto the
  tokens (instead of all-reducing it). Same communication volume as TP, 1/tp of the norm and
  residual activations.

The token dim is taken as the second-to-last dim, so a block that flattens [batch, seq, hidden]
to [batch*seq, hidden] before its MLP (OPT) stays exact: the gather and the reduce-scatter
pair up on the same rows. Exactness rests on the block's shape (pre-norm, residual stream
only touched by norms and the planned linears), so SP is offered only for model types whose
parity has been tested (the models seam says which, and finds the norms).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module
from transformers import PretrainedConfig

from p3d.models import architecture, decoder_blocks
from p3d.parallel.tensor import linear_features, match_plan, own_tensor

TOKEN_DIM = -2
_BLOCK_STYLES = ("colwise", "rowwise")


class _SequenceShardedNorm(SequenceParallel):
    """A norm over this rank's tokens whose output is gathered for the column-parallel layers after it."""

    def __init__(self):
        super().__init__(sequence_dim=TOKEN_DIM)

    @staticmethod
    def _prepare_output_fn(use_local_output, module, outputs, device_mesh):
        return outputs.redistribute(device_mesh, [Replicate()])


def sequence_parallel_problems(hf_config: PretrainedConfig, meta_model: nn.Module, plan: dict[str, str], tp: int, local_seq_len: int) -> list[str]:
    """Why SP cannot run exactly for this model / plan / layout (empty if it can)."""
    if tp == 1:
        return ["parallel.sequence_parallel=true needs parallel.tp > 1 (it shards activations over the tp ranks)"]
    problems = architecture(hf_config).sequence_parallel_problems(hf_config)
    if local_seq_len % tp:
        problems.append(
            f"data.seq_len: the {local_seq_len} tokens per cp rank are not divisible by parallel.tp={tp} "
            f"(parallel.sequence_parallel=true splits them over tp); use a multiple of cp*tp"
        )
    problems += _unplanned_block_linears(meta_model, plan)
    return problems


def _unplanned_block_linears(model: nn.Module, plan: dict[str, str]) -> list[str]:
    matched = match_plan(plan, model)
    names = {module: name for name, module in model.named_modules()}
    missing = [
        names[module]
        for block in decoder_blocks(model)
        for module in block.modules()
        if linear_features(module) is not None and matched.get(names[module]) not in _BLOCK_STYLES
    ]
    if not missing:
        return []
    return [
        f"parallel.sequence_parallel=true needs every Linear inside a decoder block to be colwise or rowwise "
        f"in model.tp_plan; not: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
    ]


def _shard_block_input(mesh: DeviceMesh):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        local = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        if args:
            return (local, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": local}

    return hook


def _gather_block_output(mesh: DeviceMesh):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        full = own_tensor(DTensor.from_local(hidden, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local())
        return (full, *output[1:]) if isinstance(output, tuple) else full

    return hook


def apply_sequence_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard the residual stream between the first block's input and the last block's output.

    Expects TP already applied with row-parallel outputs sharded on the token dim
    (`apply_tensor_parallel(..., sequence_parallel=True)`).
    """
    blocks = decoder_blocks(model)
    arch = architecture(model.config)
    blocks[0].register_forward_pre_hook(_shard_block_input(tp_mesh), with_kwargs=True)
    blocks[-1].register_forward_hook(_gather_block_output(tp_mesh))
    for block in blocks:
        parallelize_module(block, tp_mesh, {name: _SequenceShardedNorm() for name in arch.norms(block)})
