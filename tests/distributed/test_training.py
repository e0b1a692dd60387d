"""What people who train expect: schedules that resume exactly, optimizers that are exact on sharded
parameters, a validation pass, sampling from a checkpoint (real processes on gloo)."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, assert_ok, layout_overrides
from tests.distributed.test_checkpoint import SAME_LAYOUT, assert_same_losses
from tests.distributed.test_parity import assert_matches

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


# --- optimizers on sharded parameters -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adafactor"])
def test_whole_matrix_optimizers_at_tp2dp2_match_one_process_and_resume_on_it(optimizer, p3d_runner):
    """Muon gathers each update for its Newton-Schulz step, Adafactor sums rows, columns and norms across
    ranks: per-step losses and gradient norms as one process's. The tp2dp2 checkpoint (Adafactor's whole
    factored state, Muon's sharded momentum) resumes in one process on the uninterrupted losses."""
    overrides = [*FAST, f"optim.name={optimizer}", "checkpoint=default", "checkpoint.every=3"]
    reference = p3d_runner([*overrides, "train.micro_batch_size=4"])
    assert_ok(reference)
    sharded = p3d_runner([*overrides, *layout_overrides(2, 2, 1)], nproc=4)
    assert_ok(sharded)
    assert_matches(sharded.records, reference.records)
    resumed = p3d_runner([*overrides, "train.micro_batch_size=4", f"checkpoint.load_from={sharded.run_dir / 'checkpoints' / 'step_00000003'}"])
    assert_ok(resumed)
    assert_same_losses(resumed.records, reference.records[3:])
