"""Mixture-of-experts models: each layout gives one process's losses and gradient norms (fp32, 1e-4).

Tiny Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V2 (multi-head latent attention, shared experts, the
first layer dense) through `model=tiny model.arch=...`: experts split over tp (moe_tp_experts, with
FSDP and context parallelism in the same run).
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_ok, layout_overrides
from tests.distributed.test_parity import assert_matches

STEPS = ["train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=32", "checkpoint=none"]
MOE_ARCHITECTURES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v2"]

_references: dict[str, list[dict]] = {}


def reference_records(p3d_runner, arch: str) -> list[dict]:
    if arch not in _references:
        result = p3d_runner(["model=tiny", f"model.arch={arch}", *STEPS])
        assert_ok(result)
        assert len(result.records) == 3
        _references[arch] = result.records
    return _references[arch]


# tp2cp2 (4 ranks: TP, FSDP over cp, CP attention) for two of them, tp2 for the others.
TP_LAYOUTS = {"mixtral": (2, 1, 2), "deepseek_v2": (2, 1, 2), "qwen3_moe": (2, 1, 1), "olmoe": (2, 1, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_experts_split_over_tensor_parallel_ranks_match_one_process(arch, p3d_runner):
    tp, dp, cp = TP_LAYOUTS[arch]
    result = p3d_runner(["model=tiny", f"model.arch={arch}", *STEPS, *layout_overrides(tp, dp, cp)], nproc=tp * dp * cp)
    assert_ok(result)
    assert_matches(result.records, reference_records(p3d_runner, arch))
