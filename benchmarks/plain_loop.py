"""A minimal hand-written 3D-parallel training loop: the baseline p3d is compared against.

No p3d code: transformers' model, torch's parallelize_module / fully_shard / DeviceMesh, a small
all-gather context-parallel attention, the same loss normalisation, clipping and fused AdamW.
The same sharding as p3d's: TP on the blocks and the output head (gathered logits), FSDP units
for each block, each untied embedding and the root.
Run under torchrun; prints one JSON line with the median tokens/s of the timed steps and every step's loss.

    torchrun --nproc_per_node=8 benchmarks/plain_loop.py --tp 2 --dp 2 --cp 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface

CP = {}


class Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(2, dist.get_rank(ctx.group) * ctx.n, ctx.n), None


def cp_attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
    k, v = Gather.apply(k, CP["group"]), Gather.apply(v, CP["group"])
    causal = CP["q_pos"][:, None] >= CP["k_pos"][None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous(), None


def model_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=264, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)


def corpus_windows(seq_len: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    data = b"".join(topics[k].encode() + b"\x00" for k in sorted(topics))
    stream = torch.tensor(list(data), dtype=torch.long)
    count = len(stream) // (seq_len + 1)
    return stream[: count * (seq_len + 1)].view(count, seq_len + 1)


def print_result(args, timings: list[float], losses: list[torch.Tensor]) -> None:
    """Rank 0's one JSON line: median tokens/s of the steps after the warm-up, and every step's loss."""
    if dist.get_rank() == 0:
        timed = timings[args.warmup:]
        print(json.dumps({"tokens_per_s": args.global_batch * args.seq_len / statistics.median(timed), "steps": len(timed),
                          "losses": [loss.item() for loss in losses]}))


def argument_parser() -> argparse.ArgumentParser:
    """The loops' flags: layout, steps, sizes (the fast loop adds its profiling flags)."""
    parser = argparse.ArgumentParser()
    for name, default in (("tp", 1), ("dp", 1), ("cp", 1), ("steps", 20), ("warmup", 3), ("seq_len", 256), ("global_batch", 8), ("hidden", 256), ("layers", 4)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return argument_parser().parse_args(argv)


class PlainLoop:
    """The model, optimizer and data of the loop, built in an initialised process group; `step(n)` trains step n."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        mesh = init_device_mesh("cpu", (args.dp, args.cp, args.tp), mesh_dim_names=("dp", "cp", "tp"))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config(args), attn_implementation="sdpa")
        if args.tp > 1:
            plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(), "self_attn.v_proj": ColwiseParallel(),
                    "self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
            for layer in model.model.layers:
                parallelize_module(layer, mesh["tp"], plan)
            parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
        if args.cp > 1:
            AttentionInterface.register("plain_cp", cp_attention)
            AttentionMaskInterface.register("plain_cp", lambda *a, **k: None)
            model.set_attn_implementation("plain_cp")
        dp_cp = mesh["dp", "cp"]._flatten("dp_cp")
        if args.dp * args.cp > 1:
            for layer in model.model.layers:
                fully_shard(layer, mesh=dp_cp).set_force_sum_reduction_for_comms(True)
            fully_shard(model.model.embed_tokens, mesh=dp_cp)  # untied embeddings as units of their own
            fully_shard(model.lm_head, mesh=dp_cp, reshard_after_forward=False)
            fully_shard(model, mesh=dp_cp)
            for module in model.modules():
                if hasattr(module, "set_gradient_divide_factor"):
                    module.set_gradient_divide_factor(1.0)
                    module.set_force_sum_reduction_for_comms(True)
        groups = {}
        for p in model.parameters():
            groups.setdefault((p.ndim >= 2, p.device_mesh if isinstance(p, DTensor) else None), []).append(p)
        self.optimizer = torch.optim.AdamW([{"params": ps, "weight_decay": 0.1 if decay else 0.0} for (decay, _), ps in groups.items()], lr=1e-3, fused=True)
        self.model, self.mesh, self.dp_cp = model, mesh, dp_cp

        self.windows = corpus_windows(args.seq_len)
        self.per_rank = args.global_batch // args.dp
        self.dp_rank, cp_rank = mesh["dp"].get_local_rank(), mesh["cp"].get_local_rank()
        chunk = args.seq_len // (2 * args.cp)
        self.local = torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk), torch.arange((2 * args.cp - 1 - cp_rank) * chunk, (2 * args.cp - cp_rank) * chunk)]) if args.cp > 1 else torch.arange(args.seq_len)
        CP.update(group=mesh["cp"].get_group(), q_pos=self.local, k_pos=torch.cat([torch.cat([torch.arange(r * chunk, (r + 1) * chunk), torch.arange((2 * args.cp - 1 - r) * chunk, (2 * args.cp - r) * chunk)]) for r in range(args.cp)]) if args.cp > 1 else self.local)

    def step(self, step: int) -> torch.Tensor:
        """Train step `step` (its global batch); returns the step's loss summed over the dp x cp ranks, as p3d reports it."""
        args, model, per_rank, local = self.args, self.model, self.per_rank, self.local
        batch = self.windows[(step * args.global_batch + self.dp_rank * per_rank + torch.arange(per_rank)) % len(self.windows)]
        inputs, labels = batch[:, :-1][:, local], batch[:, 1:][:, local]
        tokens = torch.tensor(float(per_rank * args.seq_len))
        dist.all_reduce(tokens, group=self.mesh["dp"].get_group())
        logits = model(input_ids=inputs, position_ids=local.expand(per_rank, -1), use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / tokens
        loss.backward()
        squares = torch.zeros(())
        for p in model.parameters():
            g = p.grad
            copies = dist.get_world_size() // g.device_mesh.size() if isinstance(g, DTensor) else dist.get_world_size()
            if isinstance(g, DTensor):
                copies *= int(torch.tensor([g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate()] or [1]).prod())
                g = g.to_local()
            squares += g.float().pow(2).sum() / copies
        dist.all_reduce(squares)
        coefficient = torch.clamp(1.0 / (squares.sqrt() + 1e-6), max=1.0)
        for p in model.parameters():
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coefficient)
        reported = loss.detach()
        dist.all_reduce(reported, group=self.dp_cp.get_group())  # the step's loss, as p3d reports it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return reported


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    loop = PlainLoop(args)
    timings, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        losses.append(loop.step(step))
        timings.append(time.perf_counter() - started)
    print_result(args, timings, losses)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
