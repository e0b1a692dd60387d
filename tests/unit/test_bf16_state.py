"""Pure-bf16 training (train.master_dtype=bf16): stochastic rounding, updates that do not stall,
and bf16 weights, gradients and optimizer moments in a real (one-rank FSDP2) model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.distributed.mesh import Meshes
from p3d.errors import ConfigError
from p3d.optim import BF16AdamW, build_optimizer, random_bits16, stochastic_round_to_bf16
from p3d.parallel.parallelize import build_parallel_model


def test_stochastic_rounding_is_unbiased_and_keeps_bf16_values():
    exact = torch.tensor([1.0, -3.5, 0.0078125, 1e-30]).bfloat16().float()  # values bf16 holds exactly
    assert torch.equal(stochastic_round_to_bf16(exact, random_bits16(torch.arange(4), key=7)).float(), exact)
    value = 1.0 + 0.3 * 2**-7  # 30% of the way from 1 to the next bf16 value, 1 + 2**-7
    elements = 1 << 16
    rounded = stochastic_round_to_bf16(torch.full((elements,), value), random_bits16(torch.arange(elements), key=11)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.mean().item() - value) < 2**-7 * 0.01  # the mean of 65536 roundings is the value
    negative = stochastic_round_to_bf16(torch.full((elements,), -value), random_bits16(torch.arange(elements), key=11)).float()
    assert torch.equal(negative, -rounded)  # rounding is symmetric in the sign


def test_random_bits_depend_on_index_and_key_only_and_look_uniform():
    index = torch.arange(1 << 16) + 12345
    bits = random_bits16(index, key=3)
    assert torch.equal(bits, random_bits16(index.clone(), key=3))
    assert not torch.equal(bits, random_bits16(index, key=4))
    assert (bits[1:] != bits[:-1]).float().mean() > 0.99  # neighbours do not share bits
    counts = torch.bincount(bits >> 12, minlength=16).float()  # 16 bins of 4096 expected values
    assert ((counts - 4096).abs() < 300).all(), counts
    assert bits.min() >= 0 and bits.max() < 1 << 16


def test_updates_far_below_bf16_resolution_are_kept_on_average():
    """lr 1e-4 on weights of 1.0 (bf16 spacing 2**-7 = 7.8e-3): rounding to nearest drops every update,
    stochastic rounding keeps their sum in expectation."""
    steps, lr = 200, 1e-4
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    ours = BF16AdamW([weight], {weight: "w"}, seed=0, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    rounded_to_nearest = torch.optim.AdamW([plain], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        for param, optimizer in ((weight, ours), (plain, rounded_to_nearest)):
            param.grad = torch.ones_like(param)  # Adam's step is then lr per step, downwards
            optimizer.step()
    assert torch.equal(plain, torch.ones_like(plain))  # the stall that bf16 state would have
    moved = 1.0 - weight.float().mean().item()
    assert abs(moved - steps * lr) < 0.05 * steps * lr, moved
    assert weight.dtype == torch.bfloat16 and ours.state[weight]["exp_avg"].dtype == torch.bfloat16


@pytest.fixture
def one_process_group():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_bf16_master_dtype_makes_weights_gradients_and_moments_bf16(model, one_process_group):
    def one_step(master_dtype: str):
        config = to_object(compose([f"model={model}", "train.dtype=bf16", f"train.master_dtype={master_dtype}"]))
        setup = validate(config, world_size=1)
        parallel_model = build_parallel_model(config, setup.hf_config, setup.tp_plan, Meshes(setup.dims, "cpu"), torch.device("cpu"))
        optimizer = build_optimizer(parallel_model, config.optim, config.train.seed)
        ids = torch.randint(0, setup.hf_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        logits = parallel_model(input_ids=ids[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads = {p.grad.dtype for p in parallel_model.parameters()}
        optimizer.step()
        moments = {state[key].dtype for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")}
        buffers = {b.dtype for b in parallel_model.buffers() if b.is_floating_point()}
        return {p.dtype for p in parallel_model.parameters()}, grads, moments, buffers, optimizer

    params, grads, moments, buffers, optimizer = one_step("bf16")
    assert params == grads == moments == {torch.bfloat16}
    assert isinstance(optimizer, BF16AdamW)
    assert buffers <= {torch.float32}  # rotary frequencies stay fp32
    params, grads, moments, _, optimizer = one_step("fp32")
    assert params == grads == moments == {torch.float32}
    assert type(optimizer) is torch.optim.AdamW


def test_bf16_master_dtype_needs_bf16_compute():
    config = to_object(compose(["train.master_dtype=bf16"]))
    with pytest.raises(ConfigError, match=r"train.master_dtype=bf16 .* set train.dtype=bf16"):
        validate(config, world_size=1)


def test_the_opt13b_pure_bf16_recipe_validates_for_eight_ranks():
    from p3d.config.schema import DType

    config = to_object(compose(["+recipe=opt1.3b_bf16_3d"]))
    assert (config.model.name, config.train.dtype, config.train.master_dtype) == ("opt1.3b", DType.bf16, DType.bf16)
    dims = validate(config, world_size=8).dims
    assert (dims.tp, dims.dp, dims.cp) == (2, 2, 2)
