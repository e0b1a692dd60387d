"""Parallelism applied from outside the (single-device) model, in one fixed order.

    build on meta -> tensor parallel -> context-parallel attention -> FSDP2 -> materialise shards

TP comes first because FSDP2 shards the TP-local weights (2-D DTensors over dp_cp x tp); the
weights are allocated only after both, so no rank ever holds more than its share.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from p3d.config.schema import P3DConfig
from p3d.distributed.mesh import Meshes
from p3d.model import build_meta_model, materialize, tie_weights_if_configured
from p3d.parallel.context import enable_context_parallel
from p3d.parallel.fsdp import apply_fsdp
from p3d.parallel.tensor import apply_tensor_parallel


def build_parallel_model(config: P3DConfig, hf_config, tp_plan: dict[str, str], meshes: Meshes, device: torch.device) -> PreTrainedModel:
    dims = meshes.dims
    model = build_meta_model(hf_config)
    if dims.tp > 1:
        apply_tensor_parallel(model, tp_plan, meshes.tp)
        tie_weights_if_configured(model)
    if dims.cp > 1:
        enable_context_parallel(model)
    if dims.dp_cp > 1:
        apply_fsdp(model, meshes.dp_cp)
    materialize(model, config.model, hf_config, config.train.seed, device)
    model.train()
    return model
