"""Run under torchrun: p3d's CP attention (ring and allgather) equals one-process SDPA, values and grads.

    torchrun --nproc_per_node=N tests/distributed/helpers/cp_attention_check.py
Checks every tile size x layout x impl x (plain causal, packed documents) x (no options, a sliding window,
softcapped scores, attention sinks, all three) with grouped-query heads, and value head dims narrower and wider
than the query/key's (multi-head latent attention) with all options, against a plain eager reference
of the same semantics as transformers' (window: q - k < window; softcap of the scaled scores; a sink is
one more logit per head without a value); prints "ok <cases>" on rank 0 or raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from p3d.config.schema import CPImpl, CPLayout
from p3d.distributed.env import shutdown
from p3d.parallel import cp_attention
from p3d.parallel.cp_attention import AllGatherAttention, AttentionOptions, AttentionTimer, CPComm, RingAttention, TilePlan, attention
from p3d.parallel.sharding import SequenceSharding

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 4, 2, 32, 8


def inputs(seed: int, value_dim: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=generator, dtype=torch.float64)
    v = torch.randn(BATCH, KV_HEADS, SEQ, value_dim, generator=generator, dtype=torch.float64)
    grad = torch.randn(BATCH, HEADS, SEQ, value_dim, generator=generator, dtype=torch.float64)
    # two rows with different document boundaries (one document per row would be plain causal)
    documents = torch.stack([torch.arange(SEQ) // 5, (torch.arange(SEQ) >= 13).long() + (torch.arange(SEQ) >= 14).long()])
    return q, k, v, grad, documents


OPTIONS = {
    "plain": (AttentionOptions(), False),
    "window": (AttentionOptions(window=7), False),
    "softcap": (AttentionOptions(softcap=2.0), False),
    "sinks": (AttentionOptions(), True),
    "all": (AttentionOptions(window=5, softcap=1.5), True),
}


def sink_logits(seed: int) -> torch.Tensor:
    return torch.randn(HEADS, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)


def reference(q, k, v, grad, documents, scale, options: AttentionOptions, sinks):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    sinks = sinks.clone().requires_grad_() if sinks is not None else None
    index = torch.arange(SEQ)
    mask = index[:, None] >= index[None, :]
    if options.window is not None:
        mask = mask & (index[:, None] - index[None, :] < options.window)
    mask = mask[None, None]
    if documents is not None:
        mask = mask & (documents[:, :, None] == documents[:, None, :])[:, None]
    groups = HEADS // KV_HEADS
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    if options.softcap is not None:
        scores = options.softcap * torch.tanh(scores / options.softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.reshape(1, HEADS, 1, 1).expand(BATCH, HEADS, SEQ, 1)], dim=-1)
    probs = scores.softmax(-1)[..., :SEQ]
    out = probs @ v.repeat_interleave(groups, 1)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad, sinks.grad if sinks is not None else None


def check(impl: CPImpl, layout: CPLayout, with_documents: bool, option: str, seed: int, value_dim: int = DIM) -> None:
    comm = CPComm(dist.group.WORLD)
    sharding = SequenceSharding(comm.size, layout)
    q, k, v, grad, documents = inputs(seed, value_dim)
    documents = documents if with_documents else None
    options, with_sinks = OPTIONS[option]
    sinks = sink_logits(seed) if with_sinks else None
    scale = 0.3
    expected = reference(q, k, v, grad, documents, scale, options, sinks)
    index = sharding.token_indices(comm.rank, SEQ)
    local = [t[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.clone().requires_grad_() if sinks is not None else None
    plan = TilePlan(sharding, comm.rank, SEQ, documents, torch.device("cpu"))
    schedule = RingAttention if impl is CPImpl.ring else AllGatherAttention
    out = attention(schedule, *local, local_sinks, plan, comm, scale, options, AttentionTimer(False, torch.device("cpu")))
    out.backward(grad[:, :, index])
    got = [out.detach(), *(t.grad for t in local)]
    what = f"{impl.value} {layout.value} documents={with_documents} {option} value_dim={value_dim}"
    for name, value, full in zip(("out", "dq", "dk", "dv"), got, expected):
        error = (value - full[:, :, index]).abs().max().item()
        assert error < 1e-5, f"{what}: {name} differs by {error:.2e}"
    if sinks is not None:  # each rank's share of the sink gradient (its queries); summed over ranks it is the whole
        total = local_sinks.grad.clone()
        dist.all_reduce(total)
        error = (total - expected[4]).abs().max().item()
        assert error < 1e-5, f"{what}: sink gradient differs by {error:.2e}"


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
                        for option in OPTIONS:
                            check(impl, layout, with_documents, option, seed=cases)
                            cases += 1
                for value_dim in (DIM - 3, DIM + 4):  # multi-head latent attention: V narrower / wider than Q, K
                    check(impl, CPLayout.balanced, True, "all", seed=cases, value_dim=value_dim)
                    cases += 1
    if dist.get_rank() == 0:
        print(f"ok {cases}")
    shutdown()  # joins gloo's threads while the interpreter is whole (see its docstring)


if __name__ == "__main__":
    main()
