"""Run under torchrun (2 ranks): every tensor-parallel style of parallel/tensor.py equals the unsharded module.

    torchrun --nproc_per_node=2 tests/distributed/helpers/tp_styles_check.py
For each case a small module (Linear or GPT-2's Conv1D layers, embeddings, per-head norms, sinks) is
built twice from the same seed; one copy is sharded with the case's plan (attention modules reshaping with
their heads' width `embed_dim` included). Outputs, input gradients and
every parameter's full gradient must agree (float64, 1e-10). Also latent attention (mla_kv_a_proj) and
transformers' Mixtral MoE block with its experts split over tp (moe_tp_experts). Prints "ok <cases>" on rank 0 or raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from p3d.distributed.env import shutdown
from p3d.parallel.tensor import apply_tensor_parallel

HIDDEN, HEADS, HEAD_DIM, VOCAB = 8, 4, 3, 10


def linear(features_in: int, features_out: int, conv1d: bool) -> nn.Module:
    return Conv1D(features_out, features_in) if conv1d else nn.Linear(features_in, features_out)


class Mlp(nn.Module):
    """up -> gelu -> down; up may be fused [gate | up] (gated) and read packed."""

    def __init__(self, conv1d: bool = False, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.up = linear(HIDDEN, 12 * (2 if gated else 1), conv1d)
        self.down = linear(12, HIDDEN, conv1d)

    def forward(self, x):
        hidden = self.up(x)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = up * torch.sigmoid(gate)
        return self.down(torch.nn.functional.gelu(hidden))


class Attention(nn.Module):
    """[q|k|v] in one projection (or separate ones), per-head q/k norms, sinks: the shapes of real attention."""

    def __init__(self, fused: bool = False, conv1d: bool = False, norms: bool = False, sinks: bool = False, embed_dim: int | None = None):
        super().__init__()
        self.fused, self.num_heads, self.head_dim = fused, HEADS, HEAD_DIM
        # XGLM/MVP reshape their output with `embed_dim` (the heads' width); other widths must stay whole
        self.embed_dim = embed_dim
        self.reshapes_with_embed_dim = embed_dim == HEADS * HEAD_DIM
        if fused:
            self.qkv = linear(HIDDEN, 3 * HEADS * HEAD_DIM, conv1d)
        else:
            self.q, self.k, self.v = (linear(HIDDEN, HEADS * HEAD_DIM, conv1d) for _ in range(3))
        self.q_norm = nn.RMSNorm(HEAD_DIM, elementwise_affine=True) if norms else None
        self.k_norm = nn.RMSNorm(HEAD_DIM, elementwise_affine=True) if norms else None
        self.sinks = nn.Parameter(torch.randn(HEADS, dtype=torch.float64)) if sinks else None
        self.out = linear(HEADS * HEAD_DIM, HIDDEN, conv1d)

    def forward(self, x):
        batch, length, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.view(batch, length, self.num_heads, HEAD_DIM) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / HEAD_DIM**0.5
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        if self.sinks is not None:
            scores = torch.cat([scores, self.sinks.view(1, -1, 1, 1).expand(batch, -1, length, 1)], dim=-1)
        probs = scores.softmax(-1)[..., :length]
        heads = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        if self.reshapes_with_embed_dim:
            return self.out(heads.reshape(batch, length, self.embed_dim))
        out = self.out(heads.reshape(batch, length, -1))
        return out / self.embed_dim if self.embed_dim is not None else out


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


CASES = {
    "colwise-rowwise": (lambda: Mlp(), {"up": "colwise", "down": "rowwise"}),
    "colwise-rowwise-conv1d": (lambda: Mlp(conv1d=True), {"up": "colwise", "down": "rowwise"}),
    "gather-split": (lambda: Mlp(), {"up": "colwise_gather_output", "down": "rowwise_split_input"}),
    "gather-split-conv1d": (lambda: Mlp(conv1d=True), {"up": "colwise_gather_output", "down": "rowwise_split_input"}),
    "packed-gate-up": (lambda: Mlp(gated=True), {"up": "packed_colwise", "down": "rowwise"}),
    "packed-both": (lambda: Mlp(gated=True), {"up": "packed_colwise:2", "down": "rowwise"}),
    "attention-heads": (lambda: Attention(), {"q": "colwise", "k": "colwise", "v": "colwise", "out": "rowwise"}),
    "attention-packed-qkv-conv1d": (lambda: Attention(fused=True, conv1d=True), {"qkv": "packed_colwise:3", "out": "rowwise"}),
    "attention-qk-norms": (
        lambda: Attention(norms=True),
        {"q": "colwise", "k": "colwise", "v": "colwise", "q_norm": "replicated_with_grad_allreduce", "k_norm": "replicated_with_grad_allreduce", "out": "rowwise"},
    ),
    "attention-sinks": (lambda: Attention(sinks=True), {"q": "colwise", "k": "colwise", "v": "colwise", "out": "rowwise", "sinks": "colwise", "": "local_params"}),
    "attention-heads-width": (lambda: Attention(embed_dim=HEADS * HEAD_DIM), {"q": "colwise", "k": "colwise", "v": "colwise", "out": "rowwise"}),
    "attention-other-width": (lambda: Attention(embed_dim=HIDDEN), {"q": "colwise", "k": "colwise", "v": "colwise", "out": "rowwise"}),
    "vocab-parallel": (lambda: Embeddings(), {"embed": "embedding_rowwise", "head": "colwise_gather_output"}),
    "embedding-colwise": (lambda: Embeddings(), {"embed": "embedding_colwise", "head": "replicate"}),
}


class PackedUser(nn.Module):
    """packed_colwise:3 feeding packed_rowwise:3 directly (the input of the second is packed)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(HIDDEN, 12)
        self.second = nn.Linear(12, HIDDEN)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


CASES["packed-colwise-rowwise"] = (lambda: PackedUser(), {"first": "packed_colwise:3", "second": "packed_rowwise:3"})

ROPE = 2  # rotary features of the latent key that every head shares


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention in miniature: kv_a gives [latent | rotary key]; kv_b expands the
    latent per head; the rotary key is shared by all heads (the reason for mla_kv_a_proj)."""

    def __init__(self):
        super().__init__()
        self.num_heads = HEADS
        self.q = nn.Linear(HIDDEN, HEADS * (HEAD_DIM + ROPE))
        self.kv_a = nn.Linear(HIDDEN, 4 + ROPE)
        self.kv_b = nn.Linear(4, HEADS * 2 * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.num_heads, HEAD_DIM + ROPE)
        latent, rope = self.kv_a(x).split([4, ROPE], dim=-1)
        k, v = self.kv_b(torch.tanh(latent)).view(batch, length, self.num_heads, 2 * HEAD_DIM).chunk(2, dim=-1)
        k = torch.cat([k, rope.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], dim=-1)
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        return self.out(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, -1))


def mixture_of_experts() -> nn.Module:
    """transformers' own Mixtral MoE block (router, fused 3-D experts), 4 experts, top 2."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=6, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    return block


CASES["latent-attention"] = (
    lambda: LatentAttention(),
    {"q": "colwise", "kv_a": "mla_kv_a_proj", "kv_b": "colwise", "out": "rowwise"},
)
CASES["experts-over-tp"] = (mixture_of_experts, {"experts": "moe_tp_experts"})


class _TextConfig:
    qk_rope_head_dim = ROPE

    def get_text_config(self):
        return self


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run(name: str, mesh) -> None:
    make, plan = CASES[name]
    torch.manual_seed(0)
    reference = nn.Sequential(make()).double()
    sharded = nn.Sequential(make()).double()
    sharded.load_state_dict(reference.state_dict())
    sharded.config = _TextConfig()  # what mla_kv_a_proj reads from a model's config
    apply_tensor_parallel(sharded, {f"0.{key}" if key else "0": style for key, style in plan.items()}, mesh, localised_attributes=("num_heads",), localised_widths=("embed_dim",))
    generator = torch.Generator().manual_seed(1)
    if isinstance(reference[0], Embeddings):
        inputs = torch.randint(0, VOCAB, (2, 5), generator=generator)
        args_reference, args_sharded = inputs, inputs
    else:
        inputs = torch.randn(2, 5, HIDDEN, generator=generator, dtype=torch.float64)
        args_reference, args_sharded = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    weights = torch.randn(2, 5, reference(args_reference).shape[-1], generator=generator, dtype=torch.float64)
    out_reference = reference(args_reference)
    out_sharded = sharded(args_sharded)
    (out_reference * weights).sum().backward()
    (out_sharded * weights).sum().backward()
    errors = {"output": (full(out_sharded) - out_reference).abs().max().item()}
    if args_reference.dtype.is_floating_point:
        errors["input grad"] = (args_sharded.grad - args_reference.grad).abs().max().item()
    sharded_params = dict(sharded.named_parameters())
    assert set(sharded_params) == {name for name, _ in reference.named_parameters()}
    for param_name, param in reference.named_parameters():
        errors[f"{param_name} grad"] = (full(sharded_params[param_name].grad) - param.grad).abs().max().item()
        errors[param_name] = (full(sharded_params[param_name]) - param).abs().max().item()
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-10, f"{name}: {worst} differs by {errors[worst]:.2e}"


class Partial(nn.Module):
    """Returns each rank's own part of a sum (as a module whose inner layers leave their output partial)."""

    def forward(self, x):
        return x * (dist.get_rank() + 1)


def check_all_reduce(mesh) -> None:
    """all_reduce: the forward sums the ranks' parts; each part gets the whole gradient."""
    module = nn.Sequential(Partial())
    apply_tensor_parallel(module, {"0": "all_reduce"}, mesh)
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    out = module(x)
    tp = dist.get_world_size()
    assert torch.equal(out, torch.full_like(x, tp * (tp + 1) / 2)), out
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, dist.get_rank() + 1)), x.grad


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for name in CASES:
        run(name, mesh)
    check_all_reduce(mesh)
    if dist.get_rank() == 0:
        print(f"ok {len(CASES) + 1}")
    shutdown(mesh)  # joins gloo's threads while the interpreter is whole (see its docstring)


if __name__ == "__main__":
    main()
