"""AdamW, warmup + cosine learning rate, and gradient-norm clipping that understands DTensors."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from p3d.config.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Fused AdamW (no full-size temporaries); biases and norm weights (1-D) get no weight decay.

    A fused step handles one kind of tensor per group, so parameters are also grouped by their
    DTensor mesh (under TP without FSDP, norms stay plain tensors beside TP-sharded DTensors).
    """
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for param in model.parameters():
        if param.requires_grad:
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            groups[(param.ndim >= 2, mesh)].append(param)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0} for (decays, _), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine decay to min_lr_ratio at the last step."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


def _norm_group_key(grad: torch.Tensor):
    if isinstance(grad, DTensor):
        return (grad.device_mesh, tuple(grad.placements))
    return None


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (clipped to max_norm if > 0); returns the norm before clipping.

    Gradients live on different meshes (tp x dp_cp for TP-sharded weights, dp_cp alone for the
    rest), which torch's clip_grad_norm_ cannot stack: take each group's norm, combine squares.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        groups[_norm_group_key(grad)].append(grad)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0)
    if max_norm > 0:
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient.to(grad.device))
    return total
