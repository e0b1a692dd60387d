"""Mixture-of-experts models: each layout gives one process's losses and gradient norms (fp32, 1e-4).

Tiny Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V2 (multi-head latent attention, shared experts, the
first layer dense) through `model=tiny model.arch=...`: experts split over tp (moe_tp_experts, with
FSDP and context parallelism in the same run) and over ep ranks borrowed from dp x cp (parallel.ep).
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from tests.conftest import assert_ok, layout_overrides, run_command
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


# Expert parallelism: (tp, dp, cp, ep), micro-batch; each architecture once, each layout once.
EP_CASES = {
    "mixtral-ep2": ("mixtral", (1, 2, 1, 2), 2),
    "olmoe-ep2": ("olmoe", (1, 2, 1, 2), 2),
    "deepseek_v2-dp4ep2": ("deepseek_v2", (1, 4, 1, 2), 1),
    "qwen3_moe-ep2cp2": ("qwen3_moe", (1, 1, 2, 2), 4),
}


def ep_overrides(arch: str, layout: tuple[int, int, int, int], micro: int) -> list[str]:
    tp, dp, cp, ep = layout
    return ["model=tiny", f"model.arch={arch}", *STEPS, *layout_overrides(tp, dp, cp), f"parallel.ep={ep}", f"train.micro_batch_size={micro}"]


def run_matching_one_process(p3d_runner, arch: str, layout: tuple[int, int, int, int], micro: int):
    """Run `arch` at `layout`; its losses, gradient norms and tokens per expert must be one process's."""
    tp, dp, cp, _ = layout
    result = p3d_runner(ep_overrides(arch, layout, micro), nproc=tp * dp * cp)
    assert_ok(result)
    reference = reference_records(p3d_runner, arch)
    assert_matches(result.records, reference)
    load = ("expert_tokens_min", "expert_tokens_max", "expert_imbalance")
    assert [[r[key] for key in load] for r in result.records] == [[r[key] for key in load] for r in reference]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EP_CASES))
def test_experts_split_over_expert_parallel_ranks_match_one_process(case, p3d_runner):
    """Tokens go to the ranks holding their experts by all-to-all and come back: the losses, gradient norms and
    tokens per expert are one process's; each rank stores half of the expert weights."""
    arch, layout, micro = EP_CASES[case]
    tp, dp, cp, ep = layout
    result = run_matching_one_process(p3d_runner, arch, layout, micro)
    line = next(line for line in result.stdout.splitlines() if "mixture of experts" in line)
    assert "4 experts, 2 per rank (split over ep=2)" in line
    if dp * cp == ep:  # no FSDP over replicas: each rank stores exactly its two experts
        stored, whole = (float(size) for size in re.findall(r"([0-9.]+) MiB", line))
        assert stored == pytest.approx(whole / 2, abs=0.01)


# The acceptance matrix: every architecture at every layout (16 runs, ~10 minutes on 2 cores). CI runs the
# subset above (each architecture and each layout at least once); P3D_MOE_MATRIX=1 runs all of it.
MATRIX_LAYOUTS = {"tp2": ((2, 1, 1, 1), 4), "ep2": ((1, 2, 1, 2), 2), "dp4ep2": ((1, 4, 1, 2), 1), "ep2cp2": ((1, 1, 2, 2), 4)}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("P3D_MOE_MATRIX") != "1", reason="the whole MoE matrix runs with P3D_MOE_MATRIX=1")
@pytest.mark.parametrize("layout_name", list(MATRIX_LAYOUTS))
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_every_moe_architecture_at_every_layout_matches_one_process(arch, layout_name, p3d_runner):
    layout, micro = MATRIX_LAYOUTS[layout_name]
    run_matching_one_process(p3d_runner, arch, layout, micro)


@pytest.mark.slow
def test_an_ep2_checkpoint_resumes_exactly_at_ep1_and_tp2_and_exports_in_the_model_s_own_layout(p3d_runner, tmp_path):
    """DCP reshards the experts (whole experts per ep rank, FSDP shards of them) onto one process and onto tp2;
    the export has transformers' fused 3-D expert weights and gives the trained logits."""
    from transformers import AutoModelForCausalLM

    from tests.distributed.test_checkpoint import batch_at, mean_loss

    four_steps = ["model=tiny", "model.arch=mixtral", "train.steps=4", "train.global_batch_size=4", "data.seq_len=32"]
    uninterrupted = p3d_runner([*four_steps, "train.micro_batch_size=4", "checkpoint=none"])
    assert_ok(uninterrupted)
    saved = p3d_runner([*four_steps, "train.steps=2", "train.micro_batch_size=2", "parallel.ep=2", "checkpoint.every=2"], nproc=2)
    assert_ok(saved)
    checkpoint = saved.run_dir / "checkpoints" / "step_00000002"
    for layout, nproc in ((["parallel.tp=1"], 1), (["parallel.tp=2"], 2)):
        resumed = p3d_runner([*four_steps, "train.micro_batch_size=4", *layout, "checkpoint=none", f"checkpoint.load_from={checkpoint}"], nproc=nproc)
        assert_ok(resumed)
        assert f"resumed from {checkpoint} (step 2," in resumed.stdout
        assert_matches(resumed.records, uninterrupted.records[2:])

    out_dir = tmp_path / "exported"
    done = run_command([sys.executable, "-m", "p3d.cli", "export", str(checkpoint), str(out_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    exported, loading = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
    assert tuple(exported.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 256, 64)  # [experts, 2*intermediate, hidden]
    inputs, labels = batch_at([*four_steps, "train.micro_batch_size=4"], consumed=2 * 4)
    with torch.no_grad():
        loss = mean_loss(exported.eval()(input_ids=inputs).logits, labels)
    assert abs(loss - uninterrupted.records[2]["loss"]) < 1e-4  # step 3 starts from these weights


def test_tokens_per_expert_are_counted_once_when_blocks_are_recomputed(p3d_runner):
    """Activation checkpointing runs each block's forward again in backward: the router's choice is not counted twice."""
    one_step = ["model=tiny", "model.arch=mixtral", "train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2", "data.seq_len=32", "checkpoint=none"]
    load = ("expert_tokens_min", "expert_tokens_max", "expert_imbalance")
    plain = p3d_runner(one_step)
    recomputed = p3d_runner([*one_step, "train.activation_checkpointing=full"])
    assert_ok(plain)
    assert_ok(recomputed)
    assert [recomputed.records[0][key] for key in load] == [plain.records[0][key] for key in load]
    assert plain.records[0]["expert_imbalance"] >= 1.0
