"""Parallelism applied from outside the (single-device) model, in one fixed order.

    meta build -> tensor (and sequence) parallel -> vocabulary-parallel embeddings -> expert parallel
               -> context-parallel attention
               -> activation checkpointing -> torch.compile -> FSDP2 (sharded, HSDP or replicated)
               -> materialise shards

TP comes first because FSDP2 shards the TP-local weights (2-D DTensors over dp_cp x tp);
activation checkpointing and compile wrap each block's forward inside FSDP2's hooks; the
weights are allocated only after all of it, so no rank ever holds more than its share.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from p3d.config.schema import DType, P3DConfig
from p3d.distributed.mesh import Meshes
from p3d.model import build_meta_model, materialize, retie_weights
from p3d.models import architecture, experts_modules
from p3d.parallel.activation import apply_activation_checkpointing, compile_blocks
from p3d.parallel.expert import shard_experts
from p3d.parallel.context import OWN_ATTENTION_ROUTES, enable_context_parallel, uses_p3d_attention
from p3d.parallel.fsdp import apply_fsdp, syncs_every_micro_batch
from p3d.parallel.sequence import apply_sequence_parallel
from p3d.parallel.tensor import apply_tensor_parallel, plan_without_module
from p3d.parallel.vocab import shard_embeddings_over_vocabulary

TORCH_DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16}


def build_parallel_model(config: P3DConfig, hf_config, tp_plan: dict[str, str], meshes: Meshes, device: torch.device) -> PreTrainedModel:
    model = build_meta_model(hf_config, TORCH_DTYPES[config.train.master_dtype])  # weights, gradients and optimizer state take this dtype
    shard_for_compute(model, config, hf_config, tp_plan, meshes)
    wrap_for_training(model, config, meshes)
    materialize(model, config.model, hf_config, config.train.seed, device)
    model.train()
    return model


def shard_for_compute(model: PreTrainedModel, config: P3DConfig, hf_config, tp_plan: dict[str, str], meshes: Meshes) -> None:
    """Tensor (and sequence) parallelism, then p3d's attention where context parallelism (or packing) needs it.

    After this the model computes as it will in training (on the meta device too: `p3d plan` runs its
    forward there to measure the activations)."""
    dims = meshes.dims
    vocab_parallel = shards_vocabulary(config, dims)
    if dims.tp > 1:
        sequence_parallel = config.parallel.sequence_parallel
        arch = architecture(hf_config)
        if vocab_parallel:  # the embeddings are sharded over every rank below, tp's included
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                tp_plan = plan_without_module(tp_plan, model, module)
        apply_tensor_parallel(model, tp_plan, meshes.tp, sequence_parallel, arch.localised_attributes, arch.localised_widths)
        if sequence_parallel:
            apply_sequence_parallel(model, meshes.tp)
        retie_weights(model)
    if vocab_parallel:
        shard_embeddings_over_vocabulary(model, meshes.vocab, meshes.dp_cp, meshes.tp, TORCH_DTYPES[config.train.dtype])
    if dims.ep > 1:
        for _, experts in experts_modules(model):
            shard_experts(experts, meshes.ep, tokens_shared=False)
    if uses_p3d_attention(dims.cp, config.data.packing):
        enable_p3d_attention(model, hf_config)


def shards_vocabulary(config: P3DConfig, dims) -> bool:
    """Whether the embeddings are vocabulary-parallel: asked for, and more than one rank to shard them over."""
    return config.parallel.vocab_parallel and dims.world_size > 1


def enable_p3d_attention(model: PreTrainedModel, hf_config) -> None:
    arch = architecture(hf_config)
    route = arch.attention_route(hf_config)
    attentions = arch.self_attentions(model) if route.name in OWN_ATTENTION_ROUTES else ()
    enable_context_parallel(model, route, arch.decoder_blocks(model), attentions)


def wrap_for_training(model: PreTrainedModel, config: P3DConfig, meshes: Meshes) -> list[int]:
    """Activation checkpointing, compile and FSDP2 around the blocks; returns the checkpointed blocks' indices."""
    checkpointed = apply_activation_checkpointing(model, config.train.activation_checkpointing, config.train.ac_every)
    if config.train.compile:
        compile_blocks(model)
    # FSDP2 also carries the mixed-precision policy, so a one-process bf16 run uses it too.
    compute_dtype = TORCH_DTYPES[config.train.dtype]
    dims = meshes.dims
    if dims.dp_cp > 1 or compute_dtype != torch.float32:
        apply_fsdp(
            model,
            meshes.data_parallel,
            compute_dtype,
            meshes.efsdp if dims.ep > 1 else None,
            replicate=dims.replicated,
            reshard_after_forward=config.parallel.reshard_after_forward,
            backward_prefetch=config.parallel.backward_prefetch,
            reduce_every_micro_batch=syncs_every_micro_batch(config.parallel.grad_sync, dims),
            updates_in_backward=config.optim.in_backward,
        )
    return checkpointed
