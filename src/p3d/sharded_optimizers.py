"""Muon and Adafactor, torch.optim's algorithms, exact on sharded (DTensor: TP, FSDP2) parameters.

Both act on whole matrices, which no rank holds under TP or FSDP2:
- Muon orthogonalizes each matrix's update (Newton-Schulz), which needs the whole matrix: every
  rank gathers the update (one all-gather per matrix), orthogonalizes it and keeps its own part.
  The momentum stays sharded. Every rank repeats the same Newton-Schulz work.
- Adafactor needs only sums over rows, columns and whole tensors (its factored second moment, the
  RMS of the weight and of the update): each rank sums its part and one all-reduce per step
  completes all of them, twice per step (before and after the update's RMS). The factored state
  (a row and a column vector per matrix) is small and kept whole on every rank.
A plain tensor (one process, or a weight every rank holds whole) takes the same code with
nothing to gather. Given the same gradients, the updates equal torch's own optimizers on the
whole model (tests/unit/test_optim.py); the state keeps torch's names and shapes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw

from p3d.compat import local_box, muon_adjusted_lr, newton_schulz_orthogonalize


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (itself, for a plain tensor); in-place changes reach the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def replica_count(tensor: torch.Tensor) -> int:
    """How many ranks hold each element of this rank's part: the ranks of the mesh dims where the
    DTensor is replicated, times the ranks outside its mesh (every rank, for a plain tensor)."""
    world = dist.get_world_size()
    if not isinstance(tensor, DTensor):
        return world
    copies = world // tensor.device_mesh.size()
    for dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            copies *= tensor.device_mesh.size(dim)
    return copies


def whole(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor whose local part (laid out as `like`) is `part`: an all-gather for a DTensor."""
    if not isinstance(like, DTensor):
        return part
    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()).full_tensor()


def replicated_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` as state of the parameter `like`: a DTensor replicated over its mesh (saved once by DCP,
    loaded whole into any layout), or the plain tensor."""
    if not isinstance(like, DTensor):
        return full
    return DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for the 2-D weights of the hidden layers, AdamW for every other parameter
    (embeddings, output head, norms, biases), as Muon's authors recommend.

    `matrix_groups` hold the Muon weights, `other_groups` the AdamW ones (each group names its `betas`
    and `eps`). With `adjust_lr_fn="match_rms_adamw"` Muon's updates have AdamW's RMS, so both parts
    share optim.lr and optim.weight_decay.
    """

    def __init__(self, matrix_groups: list[dict], other_groups: list[dict], **muon_settings):
        super().__init__([{**group, "muon": True} for group in matrix_groups], **muon_settings)
        for group in other_groups:
            self.add_param_group({**group, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if group["muon"]:
                for param in params:
                    self._muon_update(param, group)
            elif params:
                self._adamw_update(params, group)
        return loss

    def _muon_update(self, param: torch.Tensor, group: dict) -> None:
        """torch.optim.Muon's update of one matrix, with the Newton-Schulz step on the whole update."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        momentum, lr = group["momentum"], group["lr"]
        grad, buffer = local(param.grad), local(state["momentum_buffer"])
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        orthogonal = newton_schulz_orthogonalize(whole(update, param), group["ns_coefficients"], group["ns_steps"], group["eps"])
        weight = local(param)
        weight.mul_(1 - lr * group["weight_decay"])
        weight.add_(orthogonal[local_box(param)], alpha=-muon_adjusted_lr(lr, group["adjust_lr_fn"], param.shape))

    def _adamw_update(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's AdamW (its functional form) on each rank's parts: the update is elementwise."""
        moments, squares, steps = [], [], []
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            moments.append(local(state["exp_avg"]))
            squares.append(local(state["exp_avg_sq"]))
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            [local(param) for param in params], [local(param.grad) for param in params], moments, squares, [], steps,
            foreach=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )


class ShardedAdafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor with every sum over a row, a column or a whole tensor completed across ranks.

    Per step: (1) each rank sums its part of every matrix's squared gradient per row and per column,
    and its part of every weight's squared norm; one all-reduce completes them all. (2) Each rank
    updates the factored second moment (whole on every rank) and computes its part of the update;
    a second all-reduce completes the updates' squared norms. (3) Each rank applies its part.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(param, group) for group in self.param_groups for param in group["params"] if param.grad is not None]
        if not work:
            return loss
        for param, group in work:
            self._init_state(param)
        sums = self._all_reduce([self._partial_sums(param) for param, _ in work])
        updates = [self._local_update(param, group, param_sums) for (param, group), param_sums in zip(work, sums)]
        update_sums = self._all_reduce([[update.square().sum().reshape(1) / replica_count(param)] for (param, _), update in zip(work, updates)])
        for (param, group), param_sums, update, (update_square,) in zip(work, sums, updates, update_sums):
            self._apply(param, group, param_sums[0], update, update_square)
        return loss

    def _init_state(self, param: torch.Tensor) -> None:
        state = self.state[param]
        if state:
            return
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if param.ndim > 1:
            zeros = local(param.grad).new_zeros
            state["row_var"] = replicated_like(zeros((*param.shape[:-1], 1)), param)
            state["col_var"] = replicated_like(zeros((*param.shape[:-2], 1, param.shape[-1])), param)
        else:
            state["variance"] = torch.zeros_like(param.grad)

    @staticmethod
    def _partial_sums(param: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of: the weight's squared norm, and for a matrix the squared gradient summed
        over each full row and each full column (placed at the rows and columns this rank holds)."""
        copies = replica_count(param)
        sums = [local(param).square().sum().reshape(1) / copies]
        if param.ndim > 1:
            grad, box = local(param.grad), local_box(param)
            rows = grad.new_zeros(param.shape[:-1])
            rows[box[:-1]] = torch.linalg.vector_norm(grad, dim=-1).square() / copies
            columns = grad.new_zeros((*param.shape[:-2], param.shape[-1]))
            columns[(*box[:-2], box[-1])] = torch.linalg.vector_norm(grad, dim=-2).square() / copies
            sums += [rows, columns]
        return sums

    @staticmethod
    def _all_reduce(parts: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Sum every tensor over all ranks with one all-reduce; the same nesting back."""
        flat = torch.cat([tensor.reshape(-1) for tensors in parts for tensor in tensors])
        dist.all_reduce(flat)
        out, offset = [], 0
        for tensors in parts:
            out.append([])
            for tensor in tensors:
                out[-1].append(flat[offset : offset + tensor.numel()].view(tensor.shape))
                offset += tensor.numel()
        return out

    def _local_update(self, param: torch.Tensor, group: dict, sums: list[torch.Tensor]) -> torch.Tensor:
        """This rank's part of the update before its RMS clipping (the second moment advanced one step)."""
        state = self.state[param]
        state["step"] += 1
        one_minus_beta2 = state["step"].item() ** group["beta2_decay"]
        eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(param.dtype).eps
        grad = local(param.grad)
        if param.ndim > 1:
            row_var, col_var = local(state["row_var"]), local(state["col_var"])
            row_var.lerp_(sums[1].unsqueeze(-1).div_(param.shape[-1]), one_minus_beta2)
            col_var.lerp_(sums[2].unsqueeze(-2).div_(param.shape[-2]), one_minus_beta2)
            box = local_box(param)
            estimate = row_var[(*box[:-2], box[-2], slice(None))] @ col_var[(*box[:-2], slice(None), box[-1])]
            estimate.div_(row_var.mean(dim=-2, keepdim=True)[box[:-2]].clamp_(min=eps1))
        else:
            variance = local(state["variance"])
            variance.lerp_(grad * grad, one_minus_beta2)
            estimate = variance.clone()
        return estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)

    def _apply(self, param: torch.Tensor, group: dict, weight_square: torch.Tensor, update: torch.Tensor, update_square: torch.Tensor) -> None:
        step = self.state[param]["step"].item()
        lr = group["lr"]
        relative_step = min(lr, 1 / step**0.5)
        alpha = max(group["eps"][1], weight_square.sqrt().item() / param.numel() ** 0.5) * relative_step
        weight = local(param)
        if group["weight_decay"] != 0:
            weight.mul_(1 - lr * group["weight_decay"])
        clip = max(1.0, update_square.sqrt().item() / (param.numel() ** 0.5 * group["d"]))
        weight.add_(update, alpha=-alpha / clip)
