"""AdamW (fp32 or bf16 state), warmup + cosine learning rate, and gradient-norm clipping that understands DTensors."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from p3d.compat import local_box
from p3d.config.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D) get no weight decay.

    fp32 weights: torch's fused AdamW (no full-size temporaries). A fused step handles one kind of
    tensor per group, so parameters are also grouped by their DTensor mesh (under TP without FSDP,
    norms stay plain tensors beside TP-sharded DTensors). bf16 weights: `BF16AdamW`, whose
    stochastic rounding draws its random bits from `seed` and the parameter names.
    """
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for param in model.parameters():
        if param.requires_grad:
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            groups[(param.ndim >= 2, mesh)].append(param)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0} for (decays, _), params in groups.items()
    ]
    betas = (cfg.beta1, cfg.beta2)
    if any(param.dtype == torch.bfloat16 for group in param_groups for param in group["params"]):
        names = {param: name for name, param in model.named_parameters()}
        return BF16AdamW(param_groups, names, seed, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)


# Tensors of a parameter's shape and dtype that AdamW (torch's and BF16AdamW) keeps per parameter:
# exp_avg and exp_avg_sq (its `step` is a scalar).
MOMENTS_PER_PARAMETER = 2

_CHUNK_ELEMENTS = 1 << 20  # the update works on at most this many elements at a time (bounded temporaries)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int32 values (Wellons' lowbias32: xorshift-multiply rounds).

    int32 arithmetic is several times faster than int64 here; products wrap modulo 2**32 (two's
    complement, as every PyTorch backend computes them), which is what the hash wants."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * -0x7B935975  # 0x846CA68B as a signed 32-bit value
    return x ^ (x >> 16)


def random_bits16(global_index: torch.Tensor, key: int) -> torch.Tensor:
    """16 pseudo-random bits per element (int32 in [0, 2**16)), a function of the element's global
    index (taken modulo 2**31) and an integer key only: the same element of a weight gets the same
    bits on every layout, however the weight is sharded."""
    index = (global_index & 0x7FFFFFFF).to(torch.int32)
    return _mix32(index ^ (key & 0x7FFFFFFF)) & 0xFFFF


def stochastic_round_to_bf16(values: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """Round fp32 `values` to bf16 up or down in magnitude, away from zero with probability (dropped low
    16 bits) / 2**16: adding `bits16` (uniform in [0, 2**16)) to the bit pattern carries into the kept
    bits exactly that often, then the low 16 bits are cut. The rounding is unbiased on average, so
    updates far below bf16's resolution still move the weight in expectation."""
    as_int = values.contiguous().view(torch.int32)
    return ((as_int + bits16) & -0x10000).view(torch.float32).to(torch.bfloat16)


def _global_flat_index(param: torch.Tensor, rows: slice) -> torch.Tensor:
    """Row-major index (int64) in the full (unsharded) tensor of each element in `rows` of this rank's shard."""
    box = local_box(param)
    strides = [1] * len(param.shape)
    for dim in range(len(param.shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * param.shape[dim + 1]
    device = param.device
    index = torch.zeros((), dtype=torch.int64, device=device)
    for dim, (span, stride) in enumerate(zip(box, strides)):
        start, stop = span.start, span.stop
        if dim == 0:
            start, stop = start + rows.start, start + rows.stop
        shape = [1] * len(box)
        shape[dim] = stop - start
        index = index + (torch.arange(start, stop, dtype=torch.int64, device=device) * stride).view(shape)
    return index


class BF16AdamW(torch.optim.AdamW):
    """AdamW for bf16 weights with bf16 moments: the math in fp32, the weights written back by
    stochastic rounding (plain rounding to nearest would drop every update smaller than half a bf16
    step, about 0.4% of the weight, so small learning rates would stall).

    The rounding's random bits are a hash of (train.seed, the parameter's name, the step, the
    element's index in the full tensor): a layout-independent function, so every layout rounds each
    element alike and a resumed run continues exactly, with no generator state to save. The moments
    are stored in bf16 rounded to nearest (as torchao's low-bit AdamW does). The state is torch
    AdamW's (step, exp_avg, exp_avg_sq) and so are the parameter groups (it is torch's AdamW with
    another step), so checkpoints load across fp32 and bf16 runs.
    """

    def __init__(self, params, names: dict[torch.Tensor, str], seed: int, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False, fused=False)
        self._name_keys = {param: f"{seed}:{name}" for param, name in names.items()}

    def _rounding_key(self, param: torch.Tensor, step: int) -> int:
        digest = hashlib.sha256(f"{self._name_keys[param]}:{step}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                self._update(param, state, group)
        return loss

    def _update(self, param: torch.Tensor, state: dict, group: dict) -> None:
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        step_size = lr / (1 - beta1**step)
        root_correction2 = math.sqrt(1 - beta2**step)
        key = self._rounding_key(param, step)
        local = [t.to_local() if isinstance(t, DTensor) else t for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        if local[0].numel() == 0:
            return
        rows = max(local[0].shape[0], 1) if local[0].ndim else 1
        per_row = max(local[0].numel() // rows, 1)
        chunk_rows = max(_CHUNK_ELEMENTS // per_row, 1)
        for start in range(0, rows, chunk_rows):
            span = slice(start, min(start + chunk_rows, rows))
            weight, grad, exp_avg, exp_avg_sq = (t[span] if t.ndim else t for t in local)
            grad32 = grad.float()
            exp_avg32 = exp_avg.float().lerp_(grad32, 1 - beta1)
            exp_avg_sq32 = exp_avg_sq.float().lerp_(grad32.square_(), 1 - beta2)
            exp_avg.copy_(exp_avg32)
            exp_avg_sq.copy_(exp_avg_sq32)
            denominator = exp_avg_sq32.sqrt_().div_(root_correction2).add_(eps)
            weight32 = weight.float().mul_(1 - lr * weight_decay).addcdiv_(exp_avg32, denominator, value=-step_size)
            if weight.dtype == torch.bfloat16:
                index = _global_flat_index(param, span) if weight.ndim else torch.zeros((), dtype=torch.int64, device=weight.device)
                weight.copy_(stochastic_round_to_bf16(weight32, random_bits16(index, key)))
            else:
                weight.copy_(weight32)


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
    """Set the config's AdamW hyperparameters on every group (a checkpoint's loaded ones are replaced),
    and the optimizer's own implementation flags (a checkpoint of a bf16-state run says fused=False)."""
    for group in optimizer.param_groups:
        for flag in ("fused", "foreach"):
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]
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
