"""Learning-rate schedules and optimizers, in one process."""

from __future__ import annotations

import math

import pytest
import torch

from p3d.config.schema import OptimConfig, Schedule
from p3d.optim import LRSchedule, build_scheduler, lr_schedule, schedule_problems

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
