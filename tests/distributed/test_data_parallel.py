"""Data-parallel modes (parallel.dp_replicate x parallel.dp_shard): what each reduces per step, and
checkpoints that resume across the modes. Their loss parity is in test_parity.py (DP_MODES)."""

from __future__ import annotations

import pytest

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.model import build_meta_model
from p3d.parallel.fsdp import REDUCE_BYTES, REPLICATE_BUCKET_BYTES, replicate_buckets
from p3d.plan import make_plan
from tests.conftest import FAST, assert_ok, hooks_env, run_p3d
from tests.distributed.test_checkpoint import assert_same_losses
from tests.hooks import read_reports

# A Llama whose 4 blocks hold 12.75 MiB of fp32 gradients each: two 25 MiB buckets of two blocks.
WIDER = ["model=tiny_llama", "model.config.hidden_size=512", "model.config.intermediate_size=1664", "model.config.num_hidden_layers=4"]


def parameter_count(model_overrides: list[str]) -> tuple[int, list[int]]:
    """All parameters of the model, and each decoder block's."""
    model = build_meta_model(validate(to_object(compose(model_overrides)), 1).hf_config)
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.model.layers]
    return sum(p.numel() for p in model.parameters()), blocks


def reductions(p3d_runner, tmp_path, overrides: list[str], ranks: int = 2) -> list[dict]:
    """Rank 0's gradient collectives per step: {"all_reduce": [sizes], "reduce_scatter": [sizes]}."""
    report = tmp_path / f"report{len(list(tmp_path.glob('report*')))}"
    result = p3d_runner(overrides, nproc=ranks, env=hooks_env("probe_gradient_reductions", report=report))
    assert_ok(result)
    return read_reports(report, ranks)[0]["gradient_reductions"]


def test_replicated_gradients_are_one_all_reduce_per_step_not_one_collective_per_block(p3d_runner, tmp_path):
    """Two micro-batches per step: replicated, gradients are all-reduced once per step (grad_sync=auto),
    in one bucket for a small model; grad_sync=micro_batch reduces after each. (FSDP reduce-scatters
    every unit after every micro-batch: the next test.)"""
    base = ["model=tiny_llama", *FAST, "train.micro_batch_size=1", "train.steps=2"]
    total, _ = parameter_count(["model=tiny_llama"])
    replicated = reductions(p3d_runner, tmp_path, [*base, "parallel.dp_replicate=2"])
    assert replicated == [{"all_reduce": [total], "reduce_scatter": [], "all_gather": []}] * 2
    every_micro_batch = reductions(p3d_runner, tmp_path, [*base, "parallel.dp_replicate=2", "parallel.grad_sync=micro_batch"])
    assert every_micro_batch == [{"all_reduce": [total, total], "reduce_scatter": [], "all_gather": []}] * 2


def test_fsdp_options_cut_all_gathers_and_reduce_scatters(p3d_runner, tmp_path):
    """Two micro-batches per step at dp2, 5 FSDP units (two blocks, the untied embedding and head, the
    root with the final norm). Each forward gathers all 5; each backward gathers the two blocks
    again and the input embedding (3), unless they were kept from the forward. Each unit's
    gradients are reduce-scattered after every micro-batch, or once per step with grad_sync=step.
    No all-reduce of gradients."""
    base = ["model=tiny_llama", *FAST, "train.micro_batch_size=1", "train.steps=1", "parallel.dp=2"]
    counts = {}
    for name, options in {"default": [], "kept": ["parallel.reshard_after_forward=false"], "per step": ["parallel.grad_sync=step"]}.items():
        (step,) = reductions(p3d_runner, tmp_path, [*base, *options])
        counts[name] = (len(step["all_gather"]), len(step["reduce_scatter"]), len(step["all_reduce"]))
    assert counts == {"default": (2 * (5 + 3), 2 * 5, 0), "kept": (2 * 5, 2 * 5, 0), "per step": (2 * (5 + 3), 5, 0)}


def test_a_larger_replicated_model_is_reduced_in_the_ddp_buckets_the_plan_counts(p3d_runner, tmp_path):
    """fp32 replicated is DDP's reducer: one all-reduce per bucket of about 25 MiB, as `p3d plan` counts them."""
    overrides = [*WIDER, *FAST, "train.micro_batch_size=2", "train.steps=3", "parallel.dp_replicate=2"]
    total, _ = parameter_count(WIDER)
    config = to_object(compose(overrides))
    planned = make_plan(config, validate(config, 2)).trace.ddp_buckets
    assert len(planned) > 2 and sum(planned) == total
    for step in reductions(p3d_runner, tmp_path, overrides):
        # the boundaries follow the order the gradients became ready, which the plan takes as the parameters' reversed
        assert (len(step["all_reduce"]), sum(step["all_reduce"]), step["reduce_scatter"], step["all_gather"]) == (len(planned), total, [], [])


def test_a_larger_replicated_model_computing_in_bf16_is_reduced_in_buckets_of_blocks(p3d_runner, tmp_path):
    """With a compute cast the replicated mode is FSDP2's replicate: blocks grouped into 25 MiB units."""
    overrides = [*WIDER, *FAST, "train.micro_batch_size=2", "train.steps=1", "parallel.dp_replicate=2", "train.dtype=bf16"]
    total, blocks = parameter_count(WIDER)
    buckets = replicate_buckets([block * REDUCE_BYTES for block in blocks])
    assert buckets == [[2, 3], [0, 1]] and 2 * blocks[0] * REDUCE_BYTES >= REPLICATE_BUCKET_BYTES
    bucket_sizes = [sum(blocks[index] for index in bucket) for bucket in buckets]
    (step,) = reductions(p3d_runner, tmp_path, overrides)
    assert step == {"all_reduce": [*bucket_sizes, total - sum(bucket_sizes)], "reduce_scatter": [], "all_gather": []}  # backward order, the root last


# --- resume across the modes ----------------------------------------------------------------

RESUME = ["model=tiny_llama", "train.steps=8", "train.global_batch_size=8", "train.micro_batch_size=2", "data.seq_len=32", "checkpoint.every=4"]
MODES = {  # name: (ranks, overrides)
    "fsdp-dp2": (2, ["parallel.dp=2"]),
    "replicated-dp2": (2, ["parallel.dp_replicate=2"]),
    "hsdp-dp4": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "train.micro_batch_size=1"]),
    # the embedding and head sharded over the vocabulary across every rank (parallel/vocab.py)
    "vocab-parallel-dp2": (2, ["parallel.dp=2", "parallel.vocab_parallel=true"]),
    "vocab-parallel-tp2dp2": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.vocab_parallel=true"]),
    # TP weights replicated in fp32: p3d's bucketed reducer (parallel/reducer.py)
    "replicated-tp2dp2": (4, ["parallel.tp=2", "parallel.dp_replicate=2"]),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Uninterrupted 8-step runs under FSDP, replicated and vocabulary-parallel, each saving at step 4."""
    runs = {}
    for mode in ("fsdp-dp2", "replicated-dp2", "vocab-parallel-dp2"):
        ranks, overrides = MODES[mode]
        runs[mode] = run_p3d(tmp_path_factory.mktemp(mode) / "run", [*RESUME, *overrides], nproc=ranks)
        assert_ok(runs[mode])
    return runs


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [("fsdp-dp2", "replicated-dp2"), ("replicated-dp2", "fsdp-dp2"), ("replicated-dp2", "hsdp-dp4"), ("fsdp-dp2", "vocab-parallel-tp2dp2"), ("vocab-parallel-dp2", "replicated-dp2"),
     ("fsdp-dp2", "replicated-tp2dp2")],
)
def test_a_checkpoint_resumes_under_another_data_parallel_mode_with_the_uninterrupted_losses(saved, resumed, uninterrupted, tmp_path):
    checkpoint = uninterrupted[saved].run_dir / "checkpoints" / "step_00000004"
    ranks, overrides = MODES[resumed]
    run = run_p3d(tmp_path / "run", [*RESUME, *overrides, f"checkpoint.load_from={checkpoint}"], nproc=ranks)
    assert_ok(run)
    assert f"resumed from {checkpoint} (step 4, 32 samples consumed)" in run.stdout
    assert_same_losses(run.records, uninterrupted[saved].records[4:])
    assert_same_losses(uninterrupted["replicated-dp2"].records, uninterrupted["fsdp-dp2"].records)  # the modes agree uninterrupted too
    assert_same_losses(uninterrupted["vocab-parallel-dp2"].records, uninterrupted["fsdp-dp2"].records)
