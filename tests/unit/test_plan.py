"""`p3d plan`: validation, rank map and a memory estimate, without a process group."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.model import build_meta_model
from p3d.plan import estimate_memory, local_parameter_numel


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plan(*args):
    return subprocess.run([sys.executable, "-m", "p3d.cli", "plan", *args], capture_output=True, text=True)


def test_plan_runs_in_seconds_and_prints_every_section():
    started = children_cpu_s()
    done = plan("parallel=tp2dp2cp2", "model=opt1.3b", "--world-size", "8")
    assert done.returncode == 0, done.stderr
    assert children_cpu_s() - started < 30  # CPU time: wall time also counts whatever else runs on the machine
    for section in ("# resolved config", "# validation: OK", "# ranks", "# memory per rank", "# collectives per step"):
        assert section in done.stdout
    assert "   7   1   1   1" in done.stdout  # rank 7 is dp=1 cp=1 tp=1


def test_invalid_plan_exits_2_with_the_validation_message():
    done = plan("parallel=tp2dp2cp2", "model=opt1.3b", "--world-size", "6")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("p3d: error: parallel.dp*parallel.cp*parallel.tp")
    assert "Traceback" not in done.stderr


def test_world_size_is_required():
    done = plan("parallel=tp2dp2cp2")
    assert done.returncode == 2 and "--world-size" in done.stderr


def setup_for(overrides, world):
    config = to_object(compose(overrides))
    return config, validate(config, world)


def test_local_parameters_divide_by_tp_and_fsdp():
    config, setup = setup_for(["model=opt1.3b"], 1)
    model = build_meta_model(setup.hf_config)
    whole = local_parameter_numel(model, setup.tp_plan, 1, 1)
    assert whole == sum(p.numel() for p in model.parameters())
    _, sharded = setup_for(["model=opt1.3b", "parallel=tp2dp2cp2"], 8)
    local = local_parameter_numel(model, sharded.tp_plan, 2, 4)
    assert whole / 8 < local < whole / 7  # non-TP weights (norms, positions) are split only 4 ways


@pytest.mark.parametrize("key, effect", [
    ("optim.in_backward=true", "gradients"),
    ("train.activation_checkpointing=full", "activations"),
])
def test_memory_options_lower_their_term(key, effect):
    base = ["model=opt1.3b", "parallel=tp2dp2cp2", "train.global_batch_size=4", "optim.grad_clip=0"]
    config, setup = setup_for(base, 8)
    changed_config, changed_setup = setup_for([*base, key], 8)
    before, after = estimate_memory(config, setup), estimate_memory(changed_config, changed_setup)
    assert getattr(after, effect) < getattr(before, effect) / 2
    assert after.total < before.total


def test_plan_counts_expert_memory_per_rank_and_the_all_to_all():
    """At dp4: ep1 gathers all 4 experts of a layer to compute, ep2 half of them (stored: a quarter either way)."""
    from p3d.plan import collectives_per_step, experts_line

    lines, collectives = {}, {}
    for ep in (1, 2):
        setup = validate(to_object(compose(["model=tiny", "model.arch=mixtral", f"parallel.ep={ep}", "train.micro_batch_size=1"])), 4)
        model = build_meta_model(setup.hf_config)
        lines[ep] = experts_line(model, setup.dims, 4, 4)
        collectives[ep] = {c.group: c for c in collectives_per_step(to_object(compose(["train.micro_batch_size=1"])), setup, model)}
    assert lines[1] == "# experts: 2 layers of 4, 4 per rank; expert weights per rank: 0.2 MB stored, 0.8 MB gathered to compute (of 0.8 MB)"
    assert lines[2] == "# experts: 2 layers of 4, 2 per rank; expert weights per rank: 0.2 MB stored, 0.4 MB gathered to compute (of 0.8 MB)"
    assert "ep" not in collectives[1]
    assert collectives[2]["ep"].per_step == 2 * 2 * 5  # 2 micro-batches x 2 MoE layers x (2 forward, 2 backward, counts)
    assert collectives[2]["efsdp"].per_step > 0


def test_optimizer_state_follows_the_optimizer():
    """AdamW and Adam: two moments per weight; Muon: one for its matrices; SGD: one with momentum, none
    without; Adafactor: a row and a column factor per matrix (whole) and one moment per vector."""
    base = ["model=opt1.3b", "parallel=tp2dp2cp2"]
    states = {}
    for optimizer in ("adamw", "adam", "muon", "sgd", "adafactor"):
        config, setup = setup_for([*base, f"optim.name={optimizer}"], 8)
        estimate = estimate_memory(config, setup)
        states[optimizer] = estimate.optimizer / estimate.weights
    config, setup = setup_for([*base, "optim.name=sgd", "optim.momentum=0.9"], 8)
    estimate = estimate_memory(config, setup)
    assert states["adamw"] == states["adam"] == pytest.approx(2.0, rel=1e-3)
    assert estimate.optimizer / estimate.weights == pytest.approx(1.0, rel=1e-3) and states["sgd"] == 0
    assert 1.0 < states["muon"] < 1.3  # OPT-1.3B's embeddings (about 1/13 of the weights) take AdamW's two
    assert 0 < states["adafactor"] < 0.05


def test_replicated_ranks_hold_the_whole_model_state_and_all_reduce_it_in_buckets():
    """dp_replicate=2: weights, gradients and optimizer state of one process on each rank (FSDP at dp2:
    half); one gradient all-reduce per bucket of blocks and the root, once per step with accumulation."""
    from p3d.plan import collectives_per_step

    one = estimate_memory(*setup_for(["model=opt1.3b"], 1))
    sharded = estimate_memory(*setup_for(["model=opt1.3b", "parallel.dp=2"], 2))
    config, setup = setup_for(["model=opt1.3b", "parallel.dp_replicate=2"], 2)
    replicated = estimate_memory(config, setup)
    for term in ("weights", "gradients", "optimizer"):
        assert getattr(replicated, term) == pytest.approx(getattr(one, term))
        assert getattr(sharded, term) == pytest.approx(getattr(one, term) / 2, rel=1e-3)
    assert replicated.step_transients > replicated.weights  # FSDP2's unsharded copy of every weight
    collectives = collectives_per_step(config, setup)
    (reduce,) = [c for c in collectives if "gradient all-reduce" in c.name]
    assert (reduce.group, reduce.per_step) == ("dp_cp", 25)  # 24 buckets of one 201 MB block, and the root
    assert not any("FSDP" in c.name for c in collectives)


def test_hsdp_shards_over_dp_shard_and_all_reduces_over_the_replicas():
    from p3d.plan import collectives_per_step

    config, setup = setup_for(["model=opt1.3b", "parallel.dp_replicate=2", "parallel.dp_shard=2"], 4)
    one = estimate_memory(*setup_for(["model=opt1.3b"], 1))
    assert estimate_memory(config, setup).weights == pytest.approx(one.weights / 2, rel=1e-3)
    groups = {c.group for c in collectives_per_step(config, setup)}
    assert {"dp_shard_cp", "dp_replicate"} <= groups


@pytest.mark.parametrize("key", ["parallel.reshard_after_forward=false", "parallel.grad_sync=step"])
def test_fsdp_options_that_cost_memory_raise_the_transients(key):
    base = ["model=opt1.3b", "parallel.dp=4", "train.micro_batch_size=1"]  # two micro-batches per step
    before, after = estimate_memory(*setup_for(base, 4)), estimate_memory(*setup_for([*base, key], 4))
    assert after.step_transients > before.step_transients + after.weights  # about the whole unsharded model more


def test_replicate_buckets_group_blocks_in_backward_order():
    from p3d.parallel.fsdp import replicate_buckets

    assert replicate_buckets([10, 10], bucket_bytes=25) == []  # all in the root unit: one all-reduce
    assert replicate_buckets([10] * 5, bucket_bytes=25) == [[2, 3, 4]]  # blocks 0, 1 stay with the root
    assert replicate_buckets([30, 1, 30], bucket_bytes=25) == [[2], [0, 1]]
