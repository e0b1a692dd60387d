"""Learning-rate schedules and optimizers, in one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from p3d.config.compose import compose, to_object
from p3d.config.schema import DType, MuonLRAdjust, OptimConfig, OptimizerName, Schedule
from p3d.config.validate import validate
from p3d.distributed.mesh import Meshes
from p3d.optim import LRSchedule, apply_hyperparameters, build_optimizer, build_scheduler, lr_schedule, optimizer_problems, schedule_problems
from p3d.parallel.parallelize import build_parallel_model
from p3d.sharded_optimizers import ShardedAdafactor, ShardedMuon
from tests.unit.test_bf16_state import one_process_group  # noqa: F401 (a fixture)

SCHEDULES = [kind.value for kind in Schedule]


def multipliers(schedule: LRSchedule) -> list[float]:
    return [schedule(step) for step in range(schedule.total_steps)]


def test_each_schedule_has_its_shape():
    warmup = [0.25, 0.5, 0.75, 1.0]
    cosine = multipliers(LRSchedule(Schedule.cosine, 4, 14, 0.1))
    assert cosine[:4] == warmup
    assert cosine[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway through the decay
    assert all(a > b for a, b in zip(cosine[4:], cosine[5:]))
    linear = multipliers(LRSchedule(Schedule.linear, 4, 14, 0.1))
    assert linear[:4] == warmup and linear[9] == pytest.approx(0.55) and linear[13] == pytest.approx(0.1 + 0.9 * 0.1)
    constant = multipliers(LRSchedule(Schedule.constant, 4, 14))
    assert constant == warmup + [1.0] * 10
    wsd = multipliers(LRSchedule(Schedule.wsd, 4, 14, 0.0, decay_steps=4))
    assert wsd == warmup + [1.0] * 6 + [1.0, 0.75, 0.5, 0.25]  # stable, then the last 4 steps decay to 0 at step 14
    assert LRSchedule(Schedule.wsd, 4, 14, 0.0, decay_steps=4)(14) == 0.0


def test_config_nulls_take_their_defaults():
    assert lr_schedule(OptimConfig(), 10) == LRSchedule(Schedule.cosine, 2, 10, 0.1, 0)
    assert lr_schedule(OptimConfig(schedule=Schedule.wsd), 100) == LRSchedule(Schedule.wsd, 2, 100, 0.1, 20)
    assert lr_schedule(OptimConfig(schedule=Schedule.wsd, decay_ratio=0.5, min_lr_ratio=0.0), 10).decay_steps == 5


@pytest.mark.parametrize("kind", SCHEDULES)
def test_a_schedule_rebuilt_at_any_step_continues_exactly(kind):
    """Resume rebuilds the scheduler from the step: from every step on, the same learning rates as
    the uninterrupted schedule, to the last bit."""
    cfg = OptimConfig(schedule=Schedule(kind), warmup_steps=3, decay_ratio=0.4 if kind == "wsd" else None)
    total = 12

    def learning_rates(start_step: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler = build_scheduler(optimizer, cfg, total, start_step)
        rates = []
        for _ in range(start_step, total):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    uninterrupted = learning_rates(0)
    assert len(set(uninterrupted)) > (1 if kind == "constant" else 5)
    for start in range(1, total):
        assert learning_rates(start) == uninterrupted[start:], start


def test_schedule_keys_that_do_not_apply_are_refused():
    assert schedule_problems(OptimConfig(schedule=Schedule.constant), 10) == []
    (line,) = schedule_problems(OptimConfig(schedule=Schedule.constant, min_lr_ratio=0.0), 10)
    assert line.startswith("optim.min_lr_ratio=0.0: optim.schedule=constant does not decay")
    (line,) = schedule_problems(OptimConfig(decay_ratio=0.3), 10)
    assert line.startswith("optim.decay_ratio=0.3 applies to optim.schedule=wsd only, not cosine")
    (line,) = schedule_problems(OptimConfig(schedule=Schedule.wsd, warmup_steps=8, decay_ratio=0.5), 10)
    assert line.startswith("optim.warmup_steps=8: with optim.schedule=wsd the warmup and the decay (5 of train.steps=10) overlap")


# --- optimizers -----------------------------------------------------------------------------------


def random_grads(params: list[torch.Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


def copies(params: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(param.detach().clone()) for param in params]


def test_sharded_muon_on_whole_tensors_is_torch_muon_for_matrices_and_adamw_for_the_rest():
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 16), (24, 8))]
    others = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((16,), (10, 8))]
    reference_matrices, reference_others = copies(matrices), copies(others)
    ours = ShardedMuon(
        [{"params": matrices}], [{"params": others, "betas": (0.9, 0.95), "eps": 1e-8}],
        lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn="match_rms_adamw",
    )
    muon = torch.optim.Muon(reference_matrices, lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(reference_others, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(3):
        for group in (matrices + others, reference_matrices + reference_others):
            random_grads(group, seed=step)
        for optimizer in (ours, muon, adamw):
            optimizer.step()
    for param, reference in zip(matrices + others, reference_matrices + reference_others):
        assert torch.equal(param, reference)
    assert set(ours.state[matrices[0]]) == {"momentum_buffer"} and set(ours.state[others[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_sharded_adafactor_on_whole_tensors_is_torch_adafactor(one_process_group):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 16), (24, 8), (16,))]
    references = copies(params)
    ours = ShardedAdafactor(params, lr=0.01, weight_decay=0.1)
    adafactor = torch.optim.Adafactor(references, lr=0.01, weight_decay=0.1, foreach=False)
    for step in range(3):
        random_grads(params, seed=step)
        random_grads(references, seed=step)
        ours.step()
        adafactor.step()
    for param, reference in zip(params, references):
        torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-7)
        assert ours.state[param].keys() == adafactor.state[reference].keys()
        for key, value in ours.state[param].items():
            torch.testing.assert_close(value, adafactor.state[reference][key], rtol=1e-6, atol=1e-9)


def tiny_model(overrides: list[str]):
    config = to_object(compose(overrides))
    setup = validate(config, world_size=1)
    model = build_parallel_model(config, setup.hf_config, setup.tp_plan, Meshes(setup.dims, "cpu"), torch.device("cpu"))
    return config, model


def test_muon_steps_the_hidden_matrices_and_adamw_the_embeddings_head_and_norms(one_process_group):
    config, model = tiny_model(["optim.name=muon"])
    optimizer = build_optimizer(model, config.optim)
    names = {param: name for name, param in model.named_parameters()}
    by_muon = {names[param] for group in optimizer.param_groups if group["muon"] for param in group["params"]}
    by_adamw = {names[param] for group in optimizer.param_groups if not group["muon"] for param in group["params"]}
    assert by_muon and all(".layers." in name and name.endswith("proj.weight") for name in by_muon)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= by_adamw
    assert by_muon | by_adamw == set(names.values()) and not by_muon & by_adamw
    assert {group["adjust_lr_fn"] for group in optimizer.param_groups if group["muon"]} == {"match_rms_adamw"}


@pytest.mark.parametrize(("name", "lr"), [("adamw", 1e-2), ("adam", 1e-2), ("sgd", 0.5), ("adafactor", 1e-2), ("muon", 1e-2)])
def test_every_optimizer_lowers_the_loss_of_a_batch(name, lr, one_process_group):
    config, model = tiny_model([f"optim.name={name}", f"optim.lr={lr}"])
    optimizer = build_optimizer(model, config.optim)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_optimizer_keys_that_do_not_apply_are_refused():
    assert optimizer_problems(OptimConfig(name=OptimizerName.muon, momentum=0.9, beta1=0.8), DType.fp32) == []
    (line,) = optimizer_problems(OptimConfig(momentum=0.9), DType.fp32)
    assert line == "optim.momentum=0.9 does not apply to optim.name=adamw (it takes optim.beta1, optim.beta2, optim.eps); remove optim.momentum, or use optim.name=sgd or muon"
    (line,) = optimizer_problems(OptimConfig(name=OptimizerName.adafactor, adjust_lr_fn=MuonLRAdjust.original), DType.fp32)
    assert line.startswith("optim.adjust_lr_fn=original does not apply to optim.name=adafactor (it takes optim.beta2_decay)")
    (line,) = optimizer_problems(OptimConfig(name=OptimizerName.sgd, nesterov=True), DType.fp32)
    assert line.startswith("optim.nesterov=true needs momentum")
    (line,) = optimizer_problems(OptimConfig(name=OptimizerName.muon), DType.bf16)
    assert line.startswith("train.master_dtype=bf16 steps bf16 weights with p3d's own AdamW (BF16AdamW); optim.name=muon has no bf16 version")
    (line,) = optimizer_problems(OptimConfig(name=OptimizerName.adafactor, in_backward=True), DType.fp32)
    assert line.startswith("optim.in_backward=true steps each weight alone during backward")


def test_checkpoint_hyperparameters_are_replaced_by_the_config_s(one_process_group):
    config, model = tiny_model(["optim.name=sgd", "optim.momentum=0.9"])
    optimizer = build_optimizer(model, config.optim)
    for group in optimizer.param_groups:
        group.update(momentum=0.5, nesterov=True, weight_decay=0.3)  # as a checkpoint of another config loads them
    apply_hyperparameters(optimizer, config.optim)
    assert {(group["momentum"], group["nesterov"]) for group in optimizer.param_groups} == {(0.9, False)}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.1}
