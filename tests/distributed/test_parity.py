"""Loss parity: the same config on any layout gives one process's per-step losses (fp32, 1e-4)."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, assert_ok, layout_overrides

TOLERANCE = 1e-4
MODELS = ["tiny_llama", "tiny_opt"]
# (tp, dp, cp) layouts and the micro-batch size used there.
LAYOUTS = {
    "dp2": (1, 2, 1),
    "tp2": (2, 1, 1),
    "cp2": (1, 1, 2),
    "tp2dp2cp2": (2, 2, 2),
    "dp2cp4": (1, 2, 4),
    "tp2cp4": (2, 1, 4),
}

_reference: dict[str, list[dict]] = {}


def reference_records(model: str, p3d_runner) -> list[dict]:
    """One process, micro-batch = global batch (no accumulation)."""
    if model not in _reference:
        result = p3d_runner([f"model={model}", *FAST, "train.micro_batch_size=4"])
        assert_ok(result)
        assert len(result.losses) == 6
        _reference[model] = result.records
    return _reference[model]


def reference_losses(model: str, p3d_runner) -> list[float]:
    return [record["loss"] for record in reference_records(model, p3d_runner)]


def assert_parity(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference)
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    assert worst < TOLERANCE, f"max |loss - reference| = {worst:.2e}\n{losses}\n{reference}"


def assert_grad_norm_parity(records: list[dict], reference: list[dict]) -> None:
    """The global gradient norm (over differently sharded grads) matches too, within 0.1%."""
    pairs = [(r["grad_norm"], s["grad_norm"]) for r, s in zip(records, reference)]
    assert all(abs(a - b) <= 1e-3 * b for a, b in pairs), pairs


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(model, layout, p3d_runner):
    tp, dp, cp = LAYOUTS[layout]
    micro = 2 if dp == 2 else 4  # dp2: 2 sequences per rank in one micro-batch
    result = p3d_runner([f"model={model}", *FAST, *layout_overrides(tp, dp, cp), f"train.micro_batch_size={micro}"], nproc=tp * dp * cp)
    assert_ok(result)
    assert_parity(result.losses, reference_losses(model, p3d_runner))
    assert_grad_norm_parity(result.records, reference_records(model, p3d_runner))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_gradient_accumulation_matches_one_process(model, p3d_runner):
    """tp2 x dp2 with micro-batch 1: two accumulation steps per optimizer step."""
    result = p3d_runner([f"model={model}", *FAST, *layout_overrides(2, 2, 1), "train.micro_batch_size=1"], nproc=4)
    assert_ok(result)
    assert_parity(result.losses, reference_losses(model, p3d_runner))


@pytest.mark.slow
def test_contiguous_cp_layout_matches_one_process(p3d_runner):
    result = p3d_runner(["model=tiny_llama", *FAST, *layout_overrides(1, 1, 4), "train.micro_batch_size=4", "parallel.cp_layout=contiguous"], nproc=4)
    assert_ok(result)
    assert_parity(result.losses, reference_losses("tiny_llama", p3d_runner))


def test_parity_check_detects_a_different_run(p3d_runner):
    """The parity bar is not vacuous: another seed gives losses outside the tolerance."""
    reference = reference_losses("tiny_llama", p3d_runner)
    other = p3d_runner(["model=tiny_llama", *FAST, "train.micro_batch_size=4", "train.seed=1"])
    assert_ok(other)
    with pytest.raises(AssertionError):
        assert_parity(other.losses, reference)
