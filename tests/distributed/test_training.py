"""What people who train expect: schedules that resume exactly, optimizers that are exact on sharded
parameters, a validation pass, sampling from a checkpoint (real processes on gloo)."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, assert_ok
from tests.distributed.test_checkpoint import SAME_LAYOUT, assert_same_losses

# --- schedules ----------------------------------------------------------------------------------

WSD = [*FAST, "train.steps=8", "optim.schedule=wsd", "optim.decay_ratio=0.5", "optim.min_lr_ratio=0", "checkpoint=default", "checkpoint.every=5"]


@pytest.mark.slow
def test_wsd_resumed_in_its_decay_continues_with_the_uninterrupted_learning_rates_and_losses(p3d_runner):
    """Warmup 2, stable 2, decay over the last 4 steps; resumed at step 5, inside the decay. (Every schedule
    rebuilt at every step is checked in tests/unit/test_optim.py.)"""
    full = p3d_runner(WSD)
    assert_ok(full)
    rates = [record["lr"] for record in full.records]
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    resumed = p3d_runner([*WSD, f"checkpoint.load_from={full.run_dir / 'checkpoints' / 'step_00000005'}"])
    assert_ok(resumed)
    assert_same_losses(resumed.records, full.records[5:], **SAME_LAYOUT)
