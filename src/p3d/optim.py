"""AdamW, warmup + cosine learning rate, and gradient-norm clipping that understands DTensors."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule positioned at `start_step` (0 for a fresh run, the checkpoint's step on resume).

    The schedule is a pure function of the config and the step, so a resumed run rebuilds it
    rather than loading it: changes of optim.* or train.steps then take effect.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio), last_epoch=start_step - 1)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set the config's AdamW hyperparameters on every group (a checkpoint's loaded ones are replaced)."""
    for group in optimizer.param_groups:
        decays = all(param.ndim >= 2 for param in group["params"])
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.eps
        group["weight_decay"] = cfg.weight_decay if decays else 0.0


def squared_norm_share(grad: torch.Tensor) -> torch.Tensor:
    """This rank's share of ||grad||^2: summed over all ranks, the shares give the full squared norm.

    A rank's local shard is divided by how many ranks hold the same values: the mesh dims where
    the DTensor is replicated, and the ranks outside its mesh (e.g. the tp ranks for a weight
    sharded over dp_cp only). A plain tensor (no FSDP) is the same on every rank.
    """
    world = dist.get_world_size()
    if isinstance(grad, DTensor):
        copies = world // grad.device_mesh.size()
        for dim, placement in enumerate(grad.placements):
            if placement.is_replicate():
                copies *= grad.device_mesh.size(dim)
        local = grad.to_local()
    else:
        copies, local = world, grad
    return torch.linalg.vector_norm(local, dtype=torch.float32) ** 2 / copies  # no full-size temporary


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), device=grads[0].device if grads else "cpu")
    for grad in grads:
        total += squared_norm_share(grad).to(total.device)
    dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (clipped to max_norm if > 0); returns the norm before clipping.

    torch's clip_grad_norm_ cannot mix gradients on different meshes (tp x dp_cp for TP-sharded
    weights, dp_cp alone for the rest); one all-reduce of per-rank shares can.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = global_grad_norm(grads)
    if max_norm > 0:
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient.to(grad.device))
    return total


class OptimizerInBackward:
    """Step each parameter as soon as its gradient is ready, then free the gradient.

    Gradients never coexist for the whole model (torchtune's optimizer_in_bwd). The optimizer is
    the ordinary AdamW: when a parameter's hook runs, it is the only one holding a gradient, so
    `optimizer.step()` updates just it (checkpoints and LR schedule are unchanged). There is no
    global norm before the updates, hence no clipping and no gradient accumulation.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._squared_norm = torch.zeros(())
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._step)

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        self._squared_norm = self._squared_norm.to(param.grad.device) + squared_norm_share(param.grad)
        self.optimizer.step()
        param.grad = None

    def take_grad_norm(self) -> torch.Tensor:
        """The global norm of the gradients applied since the last call."""
        total = self._squared_norm.clone()
        dist.all_reduce(total)
        self._squared_norm = torch.zeros((), device=total.device)
        return total.sqrt()
