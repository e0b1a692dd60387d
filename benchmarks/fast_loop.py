"""A hand-written 3D-parallel training loop written for speed: the fast baseline p3d is held against.

No p3d code and no DTensor. The Llama of benchmarks/plain_loop.py (same shape, same initial weights:
they are taken from the same transformers model built with the same seed), the same data, loss
normalisation (sum of token losses / global token count), gradient clipping (1.0) and fused AdamW,
but every parallel dimension is written out by hand on plain tensors:

- data parallel (dp x cp ranks): the model is replicated; every gradient lives in a flat bucket
  and each bucket is all-reduced once per step, launched from the backward pass as soon as its last
  gradient is accumulated (the DDP scheme), waited for after backward;
- tensor parallel (Megatron-style): fused q|k|v and gate|up column-parallel linears, o_proj and
  down_proj row-parallel with one all-reduce each in forward; an identity-forward / all-reduce-backward
  op in front of each column-parallel input; the output head is column-parallel over the vocabulary
  with its logits all-gathered (a small vocabulary: gathering costs less than a vocab-parallel loss);
- context parallel: each cp rank holds two balanced chunks of the sequence; K and V are all-gathered
  over cp before attention (backward: all-reduce, keep own slice), with a causal mask on global
  positions.

Run under torchrun; prints one JSON line: median tokens/s of the timed steps and every step's loss.

    torchrun --nproc_per_node=4 benchmarks/fast_loop.py --tp 2 --dp 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from plain_loop import argument_parser, corpus_windows, model_config, print_result  # the same flags, data, model and result line as the plain loop
from torch import nn

BUCKET_ELEMENTS = 25 * 2**20 // 4  # 25 MiB of fp32 gradients per all-reduce, as DDP's default bucket


# ---- collectives with their backward ----------------------------------------------------------
class CopyToGroup(torch.autograd.Function):
    """Identity forward (the input is replicated over the group); backward sums the gradient over it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward (partial sums of a row-parallel linear); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)  # summed in place: the linear's fresh output, which its backward does not need
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width), None


class GatherSequence(torch.autograd.Function):
    """All-gather K or V [b, heads, s, d] along the sequence over cp; backward sums and keeps own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), x.shape[2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(2, ctx.rank * ctx.length, ctx.length), None


# ---- the model ---------------------------------------------------------------------------------
class Parallel:
    """The process groups and this rank's place in them."""

    def __init__(self, tp: int, dp: int, cp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        assert world == tp * dp * cp, f"world size {world} != tp*dp*cp"
        self.tp, self.dp, self.cp = tp, dp, cp
        # rank = (dp_index * cp + cp_index) * tp + tp_index, as a (dp, cp, tp) mesh
        self.tp_rank, self.cp_rank, self.dp_rank = rank % tp, rank // tp % cp, rank // (tp * cp)
        self.tp_group = self.cp_group = self.dp_cp_group = None
        for base in range(0, world, tp):  # every process must create every group, in the same order
            group = dist.new_group(list(range(base, base + tp)))
            if rank // tp == base // tp:
                self.tp_group = group
        for dp_index in range(dp):
            for tp_index in range(tp):
                group = dist.new_group([(dp_index * cp + c) * tp + tp_index for c in range(cp)])
                if (self.dp_rank, self.tp_rank) == (dp_index, tp_index):
                    self.cp_group = group
        for tp_index in range(tp):
            group = dist.new_group([r for r in range(world) if r % tp == tp_index])
            if self.tp_rank == tp_index:
                self.dp_cp_group = group


class Block(nn.Module):
    def __init__(self, hf_layer, config, par: Parallel):
        super().__init__()
        self.par = par
        tp, r = par.tp, par.tp_rank
        self.heads, self.kv_heads = config.num_attention_heads // tp, config.num_key_value_heads // tp
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        attn, mlp = hf_layer.self_attn, hf_layer.mlp

        def rows(weight):
            return weight.detach().chunk(tp, dim=0)[r]

        self.attn_norm = nn.Parameter(hf_layer.input_layernorm.weight.detach().clone())
        self.qkv = nn.Parameter(torch.cat([rows(attn.q_proj.weight), rows(attn.k_proj.weight), rows(attn.v_proj.weight)]).contiguous())
        self.o = nn.Parameter(attn.o_proj.weight.detach().chunk(tp, dim=1)[r].contiguous())
        self.mlp_norm = nn.Parameter(hf_layer.post_attention_layernorm.weight.detach().clone())
        self.gate_up = nn.Parameter(torch.cat([rows(mlp.gate_proj.weight), rows(mlp.up_proj.weight)]).contiguous())
        self.down = nn.Parameter(mlp.down_proj.weight.detach().chunk(tp, dim=1)[r].contiguous())

    def _into_tp(self, x):
        return CopyToGroup.apply(x, self.par.tp_group) if self.par.tp > 1 else x

    def _out_of_tp(self, x):
        return ReduceFromGroup.apply(x, self.par.tp_group) if self.par.tp > 1 else x

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        h = self._into_tp(F.rms_norm(x, (x.shape[-1],), self.attn_norm, self.eps))
        q, k, v = F.linear(h, self.qkv).split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = rotate(q.view(b, s, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.par.cp > 1:
            k, v = GatherSequence.apply(k, self.par.cp_group), GatherSequence.apply(v, self.par.cp_group)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self._out_of_tp(F.linear(attended.transpose(1, 2).reshape(b, s, -1), self.o))
        h = self._into_tp(F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps))
        gate, up = F.linear(h, self.gate_up).chunk(2, dim=-1)
        return x + self._out_of_tp(F.linear(F.silu(gate) * up, self.down))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Llama(nn.Module):
    def __init__(self, hf_model, par: Parallel):
        super().__init__()
        config = hf_model.config
        self.par = par
        self.embed = nn.Parameter(hf_model.model.embed_tokens.weight.detach().clone())
        self.blocks = nn.ModuleList(Block(layer, config, par) for layer in hf_model.model.layers)
        self.norm = nn.Parameter(hf_model.model.norm.weight.detach().clone())
        self.head = nn.Parameter(hf_model.lm_head.weight.detach().chunk(par.tp, dim=0)[par.tp_rank].contiguous())
        self.eps = config.rms_norm_eps
        head_dim = config.hidden_size // config.num_attention_heads
        self.register_buffer("inv_freq", hf_model.model.rotary_emb.inv_freq.detach().clone(), persistent=False)
        self.head_dim = head_dim

    def forward(self, input_ids, positions, mask):
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = F.embedding(input_ids, self.embed)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        h = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        if self.par.tp > 1:
            return GatherLastDim.apply(F.linear(CopyToGroup.apply(h, self.par.tp_group), self.head), self.par.tp_group)
        return F.linear(h, self.head)


# ---- replicated data parallelism: bucketed gradient all-reduce ----------------------------------
class GradientBuckets:
    """Gradients as views of flat buckets (backward accumulates into them in place); a bucket is
    all-reduced asynchronously as soon as backward has produced all of its gradients."""

    def __init__(self, params: list[nn.Parameter], group, bucket_elements: int = BUCKET_ELEMENTS):
        self.group = group
        self.buckets: list[torch.Tensor] = []
        self.pending: list[int] = []
        self.sizes: list[int] = []
        self.handles: list = []
        self.bucket_of: dict[int, int] = {}
        current: list[nn.Parameter] = []
        for param in reversed(params):  # roughly the order backward produces them
            current.append(param)
            if sum(p.numel() for p in current) >= bucket_elements:
                self._add(current)
                current = []
        if current:
            self._add(current)
        for param in params:
            param.register_post_accumulate_grad_hook(self._ready)

    def _add(self, params: list[nn.Parameter]) -> None:
        flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
        offset = 0
        for param in params:
            param.grad = flat[offset: offset + param.numel()].view_as(param)
            self.bucket_of[id(param)] = len(self.buckets)
            offset += param.numel()
        self.buckets.append(flat)
        self.sizes.append(len(params))
        self.pending.append(len(params))

    def _ready(self, param: nn.Parameter) -> None:
        index = self.bucket_of[id(param)]
        self.pending[index] -= 1
        if self.pending[index] == 0 and self.group is not None:
            self.handles.append(dist.all_reduce(self.buckets[index], group=self.group, async_op=True))

    def wait(self) -> None:
        for handle in self.handles:
            handle.wait()
        self.handles = []
        self.pending = list(self.sizes)

    def zero(self) -> None:
        for flat in self.buckets:
            flat.zero_()


def balanced_positions(rank: int, cp: int, seq_len: int) -> torch.Tensor:
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk), torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])


def build_model(args, par: Parallel) -> Llama:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the plain loop's initial weights
    hf_model = AutoModelForCausalLM.from_config(model_config(args))
    return Llama(hf_model, par)


def profiler():
    from profile_step import profiler  # benchmarks/, the script's own folder

    return profiler()


def summarize(prof, wall_s: float) -> dict:
    from profile_step import summarize

    return summarize(prof, wall_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser()
    parser.add_argument("--profile-step", type=int, default=0, help="profile this step (1-based) with torch.profiler (benchmarks/profile_step.py)")
    parser.add_argument("--profile-out", default="", help="where rank 0 writes the profiled step's summary (JSON)")
    return parser.parse_args(argv)


class FastLoop:
    """The model, optimizer and data of the loop, built in an initialised process group; `step(n)` trains step n."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.par = par = Parallel(args.tp, args.dp, args.cp)
        self.model = model = build_model(args, par)
        self.params = params = list(model.parameters())
        self.replicas = args.dp * args.cp
        self.buckets = GradientBuckets(params, par.dp_cp_group if self.replicas > 1 else None)
        # Norms of tp-split weights are summed over tp; replicated weights' gradients are equal on every tp rank.
        self.split = [model.head] + [p for block in model.blocks for p in (block.qkv, block.o, block.gate_up, block.down)]
        split_ids = {id(p) for p in self.split}
        self.replicated = [p for p in params if id(p) not in split_ids]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, fused=True)

        self.windows = corpus_windows(args.seq_len)
        self.per_rank = args.global_batch // args.dp
        self.local = balanced_positions(par.cp_rank, args.cp, args.seq_len) if args.cp > 1 else torch.arange(args.seq_len)
        self.mask = None
        if args.cp > 1:
            everyone = torch.cat([balanced_positions(r, args.cp, args.seq_len) for r in range(args.cp)])
            self.mask = self.local[:, None] >= everyone[None, :]
        self.global_tokens = float(args.global_batch * args.seq_len)  # every label is a real token in this data

    def step(self, step: int) -> torch.Tensor:
        """Train step `step` (its global batch); returns the step's loss summed over the dp x cp ranks."""
        args, par, local, params = self.args, self.par, self.local, self.params
        batch = self.windows[(step * args.global_batch + par.dp_rank * self.per_rank + torch.arange(self.per_rank)) % len(self.windows)]
        inputs, labels = batch[:, :-1][:, local], batch[:, 1:][:, local]
        logits = self.model(inputs, local, self.mask)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / self.global_tokens
        reported = loss.detach().clone()
        loss_handle = dist.all_reduce(reported, group=par.dp_cp_group, async_op=True) if self.replicas > 1 else None
        loss.backward()
        self.buckets.wait()
        grads = [p.grad for p in params]
        split_square = torch.stack(torch._foreach_norm([p.grad for p in self.split])).square().sum()
        if args.tp > 1:
            dist.all_reduce(split_square, group=par.tp_group)
        norm = (split_square + torch.stack(torch._foreach_norm([p.grad for p in self.replicated])).square().sum()).sqrt()
        torch._foreach_mul_(grads, torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        self.optimizer.step()
        self.buckets.zero()
        if loss_handle is not None:
            loss_handle.wait()
        return reported


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    loop = FastLoop(args)
    timings, losses = [], []
    for step in range(args.steps):
        profiling = step + 1 == args.profile_step
        if profiling:
            prof = profiler()
            prof.__enter__()
        started = time.perf_counter()
        losses.append(loop.step(step))
        timings.append(time.perf_counter() - started)
        if profiling:
            prof.__exit__(None, None, None)
            if dist.get_rank() == 0:
                Path(args.profile_out).write_text(json.dumps(summarize(prof, timings[-1])))
    print_result(args, timings, losses)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
