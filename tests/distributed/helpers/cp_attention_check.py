"""Run under torchrun: p3d's CP attention (ring and allgather) equals one-process SDPA, values and grads.

    torchrun --nproc_per_node=N tests/distributed/helpers/cp_attention_check.py
Checks every tile size x layout x impl x (plain causal, packed documents) with grouped-query heads; prints
"ok <cases>" on rank 0 or raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from p3d.config.schema import CPImpl, CPLayout
from p3d.parallel import cp_attention
from p3d.parallel.cp_attention import AllGatherAttention, AttentionTimer, CPComm, RingAttention, TilePlan
from p3d.parallel.sharding import SequenceSharding

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 4, 2, 32, 8


def inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    v = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    grad = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    # two rows with different document boundaries (one document per row would be plain causal)
    documents = torch.stack([torch.arange(SEQ) // 5, (torch.arange(SEQ) >= 13).long() + (torch.arange(SEQ) >= 14).long()])
    return q, k, v, grad, documents


def reference(q, k, v, grad, documents, scale):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    index = torch.arange(SEQ)
    mask = index[:, None] >= index[None, :]
    if documents is not None:
        mask = mask & (documents[:, :, None] == documents[:, None, :])
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def check(impl: CPImpl, layout: CPLayout, with_documents: bool, seed: int) -> None:
    comm = CPComm(dist.group.WORLD)
    sharding = SequenceSharding(comm.size, layout)
    q, k, v, grad, documents = inputs(seed)
    documents = documents if with_documents else None
    scale = 0.3
    expected = reference(q, k, v, grad, documents, scale)
    index = sharding.token_indices(comm.rank, SEQ)
    local = [t[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    plan = TilePlan(sharding, comm.rank, SEQ, documents, torch.device("cpu"))
    schedule = RingAttention if impl is CPImpl.ring else AllGatherAttention
    out = schedule.apply(*local, plan, comm, scale, AttentionTimer(False, torch.device("cpu")))
    out.backward(grad[:, :, index])
    got = [out.detach(), *(t.grad for t in local)]
    for name, value, full in zip(("out", "dq", "dk", "dv"), got, expected):
        error = (value - full[:, :, index]).abs().max().item()
        assert error < 1e-5, f"{impl.value} {layout.value} documents={with_documents}: {name} differs by {error:.2e}"


def main() -> None:
    dist.init_process_group("gloo")
    cases = 0
    for fused in (True, False):  # the fused CPU kernel, and the plain tile math that other devices use
        cp_attention.FUSED_ON_CPU = fused
        for tile_tokens in (512, 3):  # whole chunks as tiles; chunks cut into uneven 3-token pieces
            cp_attention.TILE_TOKENS = tile_tokens
            for impl in (CPImpl.ring, CPImpl.allgather):
                for layout in CPLayout:
                    for with_documents in (False, True):
                        check(impl, layout, with_documents, seed=cases)
                        cases += 1
    if dist.get_rank() == 0:
        print(f"ok {cases}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
