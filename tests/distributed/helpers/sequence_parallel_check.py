"""Run under torchrun (tp ranks only): sequence parallelism really shards the norms' tokens, and changes nothing else.

    torchrun --nproc_per_node=2 tests/distributed/helpers/sequence_parallel_check.py key=value ...
Builds the model twice the way p3d.train does (parallel.tp=world, sequence_parallel off and on),
records how many tokens (rows of the batch) each norm sees on this rank, and compares logits and input-embedding
gradients. Prints "ok <json>" on rank 0 or raises.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.distributed.env import init_distributed, shutdown, world_size_from_env
from p3d.distributed.mesh import Meshes
from p3d.models import decoder_blocks
from p3d.parallel.parallelize import build_parallel_model

BATCH, SEQ = 2, 16


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def run(overrides: list[str], sequence_parallel: bool) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    config = to_object(compose([*overrides, f"parallel.tp={world_size_from_env()}", f"parallel.sequence_parallel={str(sequence_parallel).lower()}"]))
    setup = validate(config, world_size_from_env())
    env = init_distributed(config.dist) if not dist.is_initialized() else None
    meshes = Meshes(setup.dims, "cpu")
    model = build_parallel_model(config, setup.hf_config, setup.tp_plan, meshes, torch.device("cpu"))
    tokens: dict[str, int] = {}
    block_modules = {id(module) for block in decoder_blocks(model) for module in block.modules()}
    norms = {id(module) for module in model.modules() if type(module).__name__.endswith(("LayerNorm", "RMSNorm"))}
    for name, module in model.named_modules():
        if id(module) in norms:
            where = "block" if id(module) in block_modules else "outside"
            module.register_forward_pre_hook(lambda m, args, key=f"{where}:{name}": tokens.__setitem__(key, local(args[0]).shape[:-1].numel()))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 200, (BATCH, SEQ), generator=generator)
    logits = model(input_ids=input_ids, position_ids=torch.arange(SEQ).expand(BATCH, SEQ), use_cache=False).logits
    logits.float().square().mean().backward()
    embedding_grad = local(model.get_input_embeddings().weight.grad).clone()
    del env
    return tokens, local(logits).detach(), embedding_grad


def main(overrides: list[str]) -> None:
    plain_tokens, plain_logits, plain_grad = run(overrides, sequence_parallel=False)
    sp_tokens, sp_logits, sp_grad = run(overrides, sequence_parallel=True)
    tp = dist.get_world_size()
    assert all(count == BATCH * SEQ for count in plain_tokens.values()), plain_tokens
    block_counts = {key: count for key, count in sp_tokens.items() if key.startswith("block:")}
    assert block_counts and all(count == BATCH * SEQ // tp for count in block_counts.values()), sp_tokens
    assert all(count == BATCH * SEQ for key, count in sp_tokens.items() if key.startswith("outside:")), sp_tokens
    logits_error = (sp_logits - plain_logits).abs().max().item()
    grad_error = (sp_grad - plain_grad).abs().max().item()
    assert logits_error < 1e-5 and grad_error < 1e-6, (logits_error, grad_error)
    if dist.get_rank() == 0:
        print("ok " + json.dumps({"sequence_parallel_tokens": sp_tokens, "logits_error": logits_error, "grad_error": grad_error}))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
