"""The optimizer (optim.name: torch's AdamW, Adam or SGD, p3d's sharded Muon or Adafactor, and AdamW with
bf16 state), its hyperparameters, learning-rate schedules (warmup, then cosine, linear, constant or WSD),
and gradient-norm clipping that understands DTensors."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from p3d.compat import local_box, scale_in_place, sum_of_squares
from p3d.config.schema import DType, OptimConfig, Schedule
from p3d.sharded_optimizers import ShardedAdafactor, ShardedMuon, replica_count


# Keys that apply to some optimizers only (null: the default below); any other optimizer refuses them.
APPLIES_TO = {
    "beta1": ("adamw", "adam", "muon"),
    "beta2": ("adamw", "adam", "muon"),
    "eps": ("adamw", "adam", "muon"),
    "momentum": ("sgd", "muon"),
    "nesterov": ("sgd", "muon"),
    "beta2_decay": ("adafactor",),
    "adjust_lr_fn": ("muon",),
}
DEFAULTS = {
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "momentum": {"sgd": 0.0, "muon": 0.95},
    "nesterov": {"sgd": False, "muon": True},
    "beta2_decay": -0.8,
    "adjust_lr_fn": "match_rms_adamw",
}


def setting(cfg: OptimConfig, key: str):
    """An optimizer-specific key's value for optim.name (its default when null)."""
    value = getattr(cfg, key)
    if value is None:
        value = DEFAULTS[key]
        value = value[cfg.name.value] if isinstance(value, dict) else value
    return value.value if isinstance(value, Enum) else value


def group_settings(cfg: OptimConfig, muon_matrices: bool = False) -> dict:
    """Hyperparameters of one parameter group under torch's names (lr and weight decay aside). Muon's
    groups of non-matrix parameters are AdamW's."""
    name = cfg.name.value
    if name in ("adamw", "adam") or (name == "muon" and not muon_matrices):
        return {"betas": (setting(cfg, "beta1"), setting(cfg, "beta2")), "eps": setting(cfg, "eps")}
    if name == "sgd":
        return {"momentum": setting(cfg, "momentum"), "nesterov": setting(cfg, "nesterov")}
    if name == "adafactor":
        return {"beta2_decay": setting(cfg, "beta2_decay")}
    return {"momentum": setting(cfg, "momentum"), "nesterov": setting(cfg, "nesterov"), "adjust_lr_fn": setting(cfg, "adjust_lr_fn")}


def optimizer_problems(cfg: OptimConfig, master_dtype: DType) -> list[str]:
    """Keys set for an optimizer that does not take them, and combinations p3d does not support."""
    name = cfg.name.value
    problems = []
    for key, optimizers in APPLIES_TO.items():
        value = getattr(cfg, key)
        if value is not None and name not in optimizers:
            shown = value.value if isinstance(value, Enum) else value
            takes = [other for other, users in APPLIES_TO.items() if name in users]
            takes_text = f"it takes {', '.join(f'optim.{other}' for other in takes)}" if takes else "it takes none of the optimizer-specific keys"
            problems.append(f"optim.{key}={shown} does not apply to optim.name={name} ({takes_text}); remove optim.{key}, or use optim.name={' or '.join(optimizers)}")
    if name == "sgd" and setting(cfg, "nesterov") and not setting(cfg, "momentum"):
        problems.append("optim.nesterov=true needs momentum: set optim.momentum (e.g. 0.9) with optim.name=sgd, or optim.nesterov=false")
    if master_dtype is DType.bf16 and name != "adamw":
        problems.append(f"train.master_dtype=bf16 steps bf16 weights with p3d's own AdamW (BF16AdamW); optim.name={name} has no bf16 version: use optim.name=adamw or train.master_dtype=fp32")
    if cfg.in_backward and name in ("muon", "adafactor"):
        problems.append(f"optim.in_backward=true steps each weight alone during backward, and optim.name={name} works across whole matrices at once: use optim.name=adamw, adam or sgd, or optim.in_backward=false")
    return problems


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon steps: 2-D parameters of the hidden layers, not embeddings or the output head."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embeddings.add(id(head.weight))
    return [param for param in model.parameters() if param.requires_grad and param.ndim == 2 and id(param) not in embeddings]


def build_optimizer(model: nn.Module, cfg: OptimConfig, seed: int = 0) -> torch.optim.Optimizer:
    """optim.name's optimizer; parameters with fewer than 2 dims (biases, norms) get no weight decay.

    adamw with fp32 weights, adam and sgd: torch's fused implementations (no full-size temporaries).
    A fused step handles one kind of tensor per group, so parameters are also grouped by their
    DTensor mesh (under TP without FSDP, norms stay plain tensors beside TP-sharded DTensors).
    adamw with bf16 weights: `BF16AdamW`, whose stochastic rounding draws its random bits from
    `seed` and the parameter names. adafactor and muon: p3d's versions of torch's that are exact on
    sharded parameters (p3d.sharded_optimizers).
    """
    name = cfg.name.value
    matrices = {id(param) for param in muon_matrices(model)} if name == "muon" else set()
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for param in model.parameters():
        if param.requires_grad:
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            groups[(id(param) in matrices, param.ndim >= 2, mesh)].append(param)
    param_groups = [
        {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, **group_settings(cfg, muon_part)}
        for (muon_part, decays, _), params in groups.items()
    ]
    if name == "muon":
        matrix_groups = [group for group in param_groups if id(group["params"][0]) in matrices]
        other_groups = [group for group in param_groups if id(group["params"][0]) not in matrices]
        settings = group_settings(cfg, muon_matrices=True)
        return ShardedMuon(matrix_groups, other_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **settings)
    if name == "adafactor":
        return ShardedAdafactor(param_groups, lr=cfg.lr, **group_settings(cfg))
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, **group_settings(cfg), fused=True)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, **group_settings(cfg), fused=True)
    if any(param.dtype == torch.bfloat16 for group in param_groups for param in group["params"]):
        names = {param: name for name, param in model.named_parameters()}
        return BF16AdamW(param_groups, names, seed, lr=cfg.lr, **group_settings(cfg))
    return torch.optim.AdamW(param_groups, lr=cfg.lr, **group_settings(cfg), fused=True)


@dataclass(frozen=True)
class StateSize:
    """What the optimizer keeps for one parameter, in the weights' dtype: `per_shard` tensors the shape of
    this rank's shard (moments), and `whole` elements every rank holds in full (Adafactor's factors)."""

    per_shard: int
    whole: int = 0


def optimizer_state_sizes(model: nn.Module, cfg: OptimConfig) -> dict[str, StateSize]:
    """The state `build_optimizer`'s optimizer keeps per parameter (by name; its scalar step counts aside):
    AdamW (torch's or BF16AdamW) and Adam two moments; SGD its momentum, if any; Muon a momentum for its
    matrices and AdamW's two moments for the rest; Adafactor a row and a column factor of each matrix,
    replicated (ShardedAdafactor), and a second moment for each vector."""
    name = cfg.name.value
    matrices = {id(param) for param in muon_matrices(model)} if name == "muon" else set()
    sizes = {}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name == "adafactor":
            sizes[param_name] = StateSize(0, param.numel() // param.shape[-1] + param.numel() // param.shape[-2]) if param.ndim > 1 else StateSize(1)
        elif name == "sgd":
            sizes[param_name] = StateSize(1 if setting(cfg, "momentum") else 0)
        else:
            sizes[param_name] = StateSize(1 if id(param) in matrices else 2)
    return sizes


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


DEFAULT_MIN_LR_RATIO = 0.1  # optim.min_lr_ratio=null
DEFAULT_DECAY_RATIO = 0.2  # optim.decay_ratio=null with schedule=wsd


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate multiplier of each step, a pure function of the step (0-based: `schedule(s)`
    scales the (s+1)-th optimizer step).

    A linear warmup (1/W, 2/W, ..., 1 over W = warmup_steps), then by `kind`:
    cosine and linear decay from 1 to min_lr_ratio, reached at total_steps; constant stays at 1;
    wsd (warmup-stable-decay) stays at 1 until the last `decay_steps` steps and decays linearly
    from there to min_lr_ratio at total_steps.
    """

    kind: Schedule
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO
    decay_steps: int = 0  # wsd only

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind is Schedule.constant:
            return 1.0
        decay_start = self.total_steps - self.decay_steps if self.kind is Schedule.wsd else self.warmup_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(self.total_steps - decay_start, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind is Schedule.cosine else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def lr_schedule(cfg: OptimConfig, total_steps: int) -> LRSchedule:
    """The schedule the config describes (nulls replaced by their defaults)."""
    min_lr_ratio = DEFAULT_MIN_LR_RATIO if cfg.min_lr_ratio is None else cfg.min_lr_ratio
    return LRSchedule(cfg.schedule, cfg.warmup_steps, total_steps, min_lr_ratio, wsd_decay_steps(cfg, total_steps))


def wsd_decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.schedule is not Schedule.wsd:
        return 0
    ratio = DEFAULT_DECAY_RATIO if cfg.decay_ratio is None else cfg.decay_ratio
    return max(1, round(ratio * total_steps))


def schedule_problems(cfg: OptimConfig, total_steps: int) -> list[str]:
    """Schedule keys that do not apply to optim.schedule, and a WSD decay that would overlap the warmup."""
    kind = cfg.schedule.value
    problems = []
    if cfg.min_lr_ratio is not None and cfg.schedule is Schedule.constant:
        problems.append(f"optim.min_lr_ratio={cfg.min_lr_ratio}: optim.schedule=constant does not decay; remove optim.min_lr_ratio or choose cosine, linear or wsd")
    if cfg.decay_ratio is not None and cfg.schedule is not Schedule.wsd:
        problems.append(f"optim.decay_ratio={cfg.decay_ratio} applies to optim.schedule=wsd only, not {kind}; remove optim.decay_ratio or set optim.schedule=wsd")
    decay_steps = wsd_decay_steps(cfg, total_steps)
    if cfg.schedule is Schedule.wsd and cfg.warmup_steps + decay_steps > total_steps:
        problems.append(
            f"optim.warmup_steps={cfg.warmup_steps}: with optim.schedule=wsd the warmup and the decay ({decay_steps} of "
            f"train.steps={total_steps}) overlap; lower optim.warmup_steps or optim.decay_ratio, or raise train.steps"
        )
    return problems


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule positioned at `start_step` (0 for a fresh run, the checkpoint's step on resume).

    The schedule is a pure function of the config and the step, so a resumed run rebuilds it
    rather than loading it: changes of optim.* or train.steps then take effect.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total_steps), last_epoch=start_step - 1)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set the config's hyperparameters on every group (a checkpoint's loaded ones are replaced),
    and the optimizer's own implementation flags (a checkpoint of a bf16-state run says fused=False)."""
    for group in optimizer.param_groups:
        for flag in ("fused", "foreach"):
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]
        decays = all(param.ndim >= 2 for param in group["params"])
        group.update(group_settings(cfg, muon_matrices=group.get("muon", False)))
        group["weight_decay"] = cfg.weight_decay if decays else 0.0


def squared_norm_share(grad: torch.Tensor) -> torch.Tensor:
    """This rank's share of ||grad||^2: summed over all ranks, the shares give the full squared norm.

    A rank's local shard is divided by how many ranks hold the same values: the mesh dims where
    the DTensor is replicated, and the ranks outside its mesh (e.g. the tp ranks for a weight
    sharded over dp_cp only). A plain tensor (no FSDP) is the same on every rank.
    """
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    return torch.linalg.vector_norm(local, dtype=torch.float32) ** 2 / replica_count(grad)  # no full-size temporary


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """One all-reduce of this rank's share of the squared norm; the local parts that the same number of
    ranks hold are summed together, by a multi-tensor kernel per device and dtype."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        groups[replica_count(grad), local.device, local.dtype].append(local)
    total = torch.zeros((), device=grads[0].device if grads else "cpu")
    for (copies, _, _), locals_ in groups.items():
        total += sum_of_squares(locals_).to(total.device) / copies
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
        locals_: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for grad in grads:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            locals_[local.device].append(local)
        for device, tensors in locals_.items():
            scale_in_place(tensors, coefficient.to(device))
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
