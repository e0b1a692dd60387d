"""Replicated data parallelism for a model with tensor-parallel (DTensor) weights: DDP's scheme.

DDP's reducer cannot hold DTensors, and FSDP2's `replicate`, which can, copies every gradient into a
reduce buffer and out again each step (at hidden 1024, tp2dp2 on CPU: about a tenth of a step's CPU
time, docs/results/profile.md). Here each gradient is a DTensor over a view of a flat fp32 bucket
(with its parameter's placements): the backward accumulates into the buckets in place, and each
bucket is all-reduced over the replicas as soon as its last gradient is ready, asynchronously (gloo's
thread, or NCCL's stream), and waited for when the backward ends. The buckets follow DDP's rule
(`compat.ddp_bucket_assignment`) over the parameters in reverse order, so `p3d plan` counts them as
DDP's. Like DDP's, the buckets are kept between steps (the gradients are zeroed, not freed).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from p3d.compat import ddp_bucket_assignment, when_backward_ends

_REDUCERS: "weakref.WeakKeyDictionary[nn.Module, BucketedReducer]" = weakref.WeakKeyDictionary()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def bucket_assignment(parameters: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `parameters` (in the order their gradients become ready) per bucket, by DDP's rule
    over their local parts."""
    return ddp_bucket_assignment([local_part(param) for param in parameters], bucket_bytes)


def ready_order(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters, about in the order the backward produces their gradients."""
    return [param for param in model.parameters() if param.requires_grad][::-1]


class BucketedReducer:
    """Installed on `model` by `BucketedReducer.install`; `sync(False)` defers the reduction (all but
    a step's last micro-batch: the buckets go on accumulating)."""

    def __init__(self, group, bucket_bytes: int):
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.reducing = True
        self.params: list[nn.Parameter] = []
        self.buckets: list[torch.Tensor] = []
        self.members: list[list[nn.Parameter]] = []
        self.bucket_of: dict[int, int] = {}
        self.pending: list[int] = []  # per bucket: gradients not yet ready this backward (0: its all-reduce is launched)
        self.handles: list = []
        self.finishing = False

    @classmethod
    def install(cls, model: nn.Module, group, bucket_bytes: int) -> "BucketedReducer":
        reducer = cls(group, bucket_bytes)
        # Built at the first forward: the parameters may still be replaced (materialised from meta) before it.
        model.register_forward_pre_hook(lambda module, args: reducer._before_forward(module))
        _REDUCERS[model] = reducer
        return reducer

    def sync(self, reduce: bool) -> None:
        self.reducing = reduce

    def _before_forward(self, model: nn.Module) -> None:
        if not self.params:
            self._build(model)
        if self.params[0].grad is None:  # the optimizer set the gradients to None: views of the zeroed buckets again
            self._attach_gradients()

    def _build(self, model: nn.Module) -> None:
        self.params = ready_order(model)
        for indices in bucket_assignment(self.params, self.bucket_bytes):
            members = [self.params[index] for index in indices]
            self.bucket_of.update({id(param): len(self.buckets) for param in members})
            numel = sum(local_part(param).numel() for param in members)
            self.buckets.append(torch.zeros(numel, dtype=torch.float32, device=local_part(members[0]).device))
            self.members.append(members)
        self._reset()
        for param in self.params:
            param.register_post_accumulate_grad_hook(self._gradient_ready)

    def _attach_gradients(self) -> None:
        for flat, members in zip(self.buckets, self.members):
            flat.zero_()
            offset = 0
            for param in members:
                local = local_part(param)
                view = flat[offset: offset + local.numel()].view_as(local)
                offset += local.numel()
                if isinstance(param, DTensor):
                    view = DTensor.from_local(view, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
                param.grad = view

    def _reset(self) -> None:
        self.pending = [len(members) for members in self.members]

    def _gradient_ready(self, param: nn.Parameter) -> None:
        if not self.reducing:
            return
        if not self.finishing:
            self.finishing = True
            when_backward_ends(self._finish)
        index = self.bucket_of[id(param)]
        self.pending[index] -= 1
        if self.pending[index] == 0:
            self._launch(index)

    def _launch(self, index: int) -> None:
        self.handles.append(dist.all_reduce(self.buckets[index], group=self.group, async_op=True))

    def _finish(self) -> None:
        """When the backward ends: buckets with a parameter the forward did not use are reduced now (in
        bucket order on every rank), then every reduction is waited for."""
        for index, waiting_for in enumerate(self.pending):
            if waiting_for > 0:
                self._launch(index)
        for handle in self.handles:
            handle.wait()
        self.handles = []
        self._reset()
        self.finishing = False


def bucketed_reducer(model: nn.Module) -> BucketedReducer | None:
    """The reducer `BucketedReducer.install` put on `model`, if any."""
    return _REDUCERS.get(model)
