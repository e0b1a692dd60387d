"""`p3d plan`: p3d's own sharding applied over a fake process group on the meta device, one step replayed."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from p3d import cli
from p3d import plan as plan_module
from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.plan import GB, data_parallel, make_plan

PLAN_SOURCE = Path(plan_module.__file__)
TINY = ["model=tiny_llama", "train.global_batch_size=8"]
OPT_4_LAYERS = ["model=opt1.3b", "model.config.num_hidden_layers=4"]  # the real widths, fewer blocks


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plan(*args):
    return subprocess.run([sys.executable, "-m", "p3d.cli", "plan", *args], capture_output=True, text=True)


def plan_here(capsys, *args) -> tuple[int, str, str]:
    """`p3d plan` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        cli.main(["plan", *args])
    except SystemExit as error:
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def planned(overrides, world, **options):
    config = to_object(compose(overrides))
    return make_plan(config, validate(config, world), **options)


@pytest.mark.parametrize("world, layout", [(8, ["parallel=tp2dp2cp2"]), (64, ["parallel.tp=8", "parallel.cp=2", "parallel.dp=4", "train.global_batch_size=16"])])
def test_opt_1_3b_plans_in_seconds_at_8_and_64_ranks(world, layout):
    started = children_cpu_s()
    done = plan("model=opt1.3b", *layout, "--world-size", str(world), "--json")
    assert done.returncode == 0, done.stderr
    assert children_cpu_s() - started < 30  # CPU time: wall time also counts whatever else runs on the machine
    result = json.loads(done.stdout)
    assert result["world_size"] == world and len(result["per_rank"]) >= 1
    assert {"per_rank_gb", "job_gb", "fits", "breakdown"} <= set(result)
    assert abs(sum(result["breakdown"].values()) - result["per_rank_gb"]) < 1e-3
    assert result["job_gb"] >= result["per_rank_gb"] * world * 0.99
    assert not dist.is_initialized()


def test_text_plan_has_a_compact_mesh_and_the_config_and_rank_map_only_on_request(capsys):
    code, out, err = plan_here(capsys, *TINY, "parallel=tp2dp2cp2", "--world-size", "8")
    assert code == 0, err
    assert "# resolved config" not in out and "rank  dp  cp  tp" not in out
    for section in ("# validation: OK", "# mesh", "# memory per rank", "whole job", "fits:", "# collectives per step"):
        assert section in out
    code, out, err = plan_here(capsys, *TINY, "parallel=tp2dp2cp2", "--world-size", "8", "--ranks")
    assert code == 0, err
    assert "   7   1   1   1" in out  # rank 7 is dp=1 cp=1 tp=1
    code, out, err = plan_here(capsys, *TINY, "parallel=tp2dp2cp2", "--world-size", "8", "--cfg", "job")  # Hydra's flag: the config, then exit
    assert code == 0, err
    assert "parallel:" in out and "# memory per rank" not in out


def test_invalid_plan_exits_2_with_the_validation_message(capsys):
    code, _, err = plan_here(capsys, "parallel=tp2dp2cp2", "model=opt1.3b", "--world-size", "6")
    assert code == 2
    assert err.strip().startswith("p3d: error: parallel.dp*parallel.cp*parallel.tp")


@pytest.mark.parametrize("args, message", [
    (["parallel=tp2dp2cp2"], "--world-size"),
    (["--world-size", "2", "--device", "tpu"], "--device tpu: use cpu or cuda"),
    (["--world-size", "2", "--device-memory-gb", "Z80"], "--device-memory-gb Z80: give a number of GB or a GPU name"),
    (["--world-size", "2", "--verbose"], "--verbose: not an option of p3d plan"),
])
def test_bad_plan_options_exit_2_in_one_line(capsys, args, message):
    code, _, err = plan_here(capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_shards_come_from_the_real_sharding():
    """Each rank's parameters: 1/8 of the TP-split weights, 1/4 of the others (norms, positions)."""
    whole = planned(OPT_4_LAYERS, 1)
    sharded = planned([*OPT_4_LAYERS, "parallel=tp2dp2cp2"], 8)
    total = whole.trace.parameters
    for rank in range(8):
        local = sum(sharded.trace.shard_numel[rank].values())
        assert total / 8 < local < total / 7, (rank, local)
    assert sum(sum(sharded.trace.shard_numel[rank].values()) for rank in range(8)) > total  # replicated over tp


def test_the_plan_follows_the_fsdp_units(monkeypatch):
    """With the embedding and head kept in the root unit (a change to parallel/fsdp.py alone), the plan's
    units and memory follow: nothing in plan.py knows which units FSDP makes."""
    before = planned([*TINY, "parallel.dp=2"], 2)
    monkeypatch.setattr("p3d.parallel.fsdp.embedding_units", lambda model: [])
    after = planned([*TINY, "parallel.dp=2"], 2)
    assert len(after.trace.units) == len(before.trace.units) - 2
    embedding_and_head = sum(unit.gathered_numel for unit in before.trace.units if unit.name in ("model.embed_tokens", "lm_head"))
    assert embedding_and_head > 0
    assert after.trace.root.gathered_numel == before.trace.root.gathered_numel + embedding_and_head


def test_the_plan_follows_a_tensor_parallel_style(monkeypatch):
    """With the output head left whole (a change to parallel/tensor.py alone), every rank holds it whole."""
    from p3d.parallel import tensor

    overrides = [*TINY, "parallel.tp=2", "parallel.dp=1"]
    before = planned(overrides, 2)
    assert before.setup.tp_plan["lm_head"] == "colwise_gather_output"
    original = tensor.make_style
    monkeypatch.setattr(tensor, "make_style", lambda value, sequence_parallel=False, rope_dim=None: tensor._Replicate() if value == "colwise_gather_output" else original(value, sequence_parallel, rope_dim))
    after = planned(overrides, 2)
    # tiny_llama's head is 264 x 64; under tp=2 each rank held half of it
    assert sum(after.trace.shard_numel[0].values()) - sum(before.trace.shard_numel[0].values()) == 264 * 64 // 2


def test_activations_follow_the_model_and_its_options():
    base = [*TINY, "parallel.dp=2", "data.seq_len=512", "train.micro_batch_size=4"]
    plain = planned(base, 2).trace
    checkpointed = planned([*base, "train.activation_checkpointing=full"], 2).trace
    longer = planned([*base, "data.seq_len=1024"], 2).trace
    blocks = [unit for unit in plain.units if ".layers." in unit.name]
    assert len(blocks) == 2 and all(unit.activation_bytes > 0 for unit in blocks)
    assert all(unit.checkpointed for unit in checkpointed.units if ".layers." in unit.name)
    assert 1.9 < sum(u.activation_bytes for u in longer.units) / sum(u.activation_bytes for u in plain.units) < 2.1
    assert plain.logits_bytes == 4 * 512 * 264 * 4  # fp32 logits of the micro-batch


def test_activation_checkpointing_lowers_the_activations():
    base = [*OPT_4_LAYERS, "parallel=tp2dp2cp2", "train.global_batch_size=4", "data.seq_len=2048"]
    before, after = planned(base, 8), planned([*base, "train.activation_checkpointing=full"], 8)
    assert after.breakdown()["activations"] < before.breakdown()["activations"] * 0.8
    assert after.largest.total < before.largest.total


def test_optimizer_in_backward_keeps_no_gradients():
    from p3d.plan import Sizes, replay_step

    trace = planned([*OPT_4_LAYERS, "parallel=tp2dp2cp2", "train.global_batch_size=4", "optim.grad_clip=0"], 8).trace
    kept = replay_step(trace, 0, Sizes(4, 4), in_backward=False)
    freed = replay_step(trace, 0, Sizes(4, 4), in_backward=True)
    assert kept.most["gradients"] == sum(trace.shard_numel[0].values()) * 4  # every sharded gradient, by the end
    assert freed.most["gradients"] == 0


def test_device_decides_the_per_process_terms_and_the_verdict():
    overrides = [*TINY, "parallel=tp2dp2cp2"]
    cpu = planned(overrides, 8, device="cpu", device_memory_gb=3)
    gpu = planned(overrides, 8, device="cuda", device_memory_gb=3)
    assert cpu.breakdown()["allocator retention"] > 0 and "allocator retention" not in gpu.breakdown()
    assert "CUDA context" in gpu.breakdown() and "process baseline" not in gpu.breakdown()
    assert cpu.fits is False and gpu.fits is True  # on CPU the 8 ranks share the 3 GB, on GPUs each has its own
    assert planned(overrides, 8, device="cuda", device_memory_gb=0.4).fits is False


def test_text_plan_says_the_allocator_term_is_an_estimate_only_where_it_counts_one():
    from p3d.plan import render

    estimate = "allocator retention is an estimate"
    overrides = [*TINY, "parallel=tp2dp2cp2"]
    assert estimate in render(planned(overrides, 8, device="cpu", device_memory_gb=24))
    returned = planned([*overrides, "dist.cpu_return_freed_memory=true"], 8, device="cpu", device_memory_gb=24)
    assert returned.breakdown()["allocator retention"] == 0 and estimate not in render(returned)
    assert estimate not in render(planned(overrides, 8, device="cuda", device_memory_gb=80))


def test_a_cpu_verdict_near_the_limit_names_the_key_that_drops_the_allocator_term():
    from p3d.plan import verdict

    overrides = [*TINY, "parallel=tp2dp2cp2"]
    default = planned(overrides, 8, device="cpu")
    live_gb = (default.job_bytes - sum(memory.allocator for memory in default.ranks)) / GB
    between = (live_gb + default.job_bytes / GB) / 2
    assert live_gb < between < default.job_bytes / GB
    tight = planned(overrides, 8, device="cpu", device_memory_gb=between)
    assert tight.fits is False and f"dist.cpu_return_freed_memory=true it needs {live_gb:.1f} GB and fits" in verdict(tight)
    assert planned([*overrides, "dist.cpu_return_freed_memory=true"], 8, device="cpu", device_memory_gb=between).fits is True
    assert "dist.cpu_return_freed_memory" not in verdict(planned(overrides, 8, device="cpu", device_memory_gb=live_gb * 0.9))
    close = planned(overrides, 8, device="cpu", device_memory_gb=default.job_bytes / GB * 1.02)
    assert close.fits is True and "tight for an estimate of glibc's retention" in verdict(close)
    assert "tight" not in verdict(planned(overrides, 8, device="cpu", device_memory_gb=default.job_bytes / GB * 2))


@pytest.mark.parametrize("machine, warned", [("above the job", "tight for an estimate"), ("below the job", "it needs"), ("twice the job", None)])
def test_p3d_train_warns_before_launch_when_memory_is_tight_on_cpu(monkeypatch, capsys, machine, warned):
    overrides = [*TINY, "parallel=tp2dp2cp2"]
    config = to_object(compose(overrides))
    setup = validate(config, 8)
    default = planned(overrides, 8, device="cpu")
    job_gb = default.job_bytes / GB
    live_gb = job_gb - sum(memory.allocator for memory in default.ranks) / GB
    memory_gb = {"above the job": job_gb * 1.01, "below the job": (live_gb + job_gb) / 2, "twice the job": job_gb * 2}[machine]
    monkeypatch.setattr(plan_module, "machine_memory_gb", lambda: memory_gb)
    cli._warn_if_it_will_not_fit(config, setup, ranks_here=8)
    err = capsys.readouterr().err
    if warned is None:
        assert err == ""
    else:
        assert err.startswith("p3d: warning: 8 ranks need about") and warned in err and "dist.cpu_return_freed_memory=true" in err


def test_a_gpu_name_gives_the_device_memory(capsys):
    code, out, err = plan_here(capsys, *TINY, "--world-size", "1", "--device", "cuda", "--device-memory-gb", "h100", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["device_memory_gb"] == 80 and result["fits"] is True


def test_plan_py_holds_no_sharding_rule():
    """plan.py asks the parallel code and reads its results; it names no style, placement or unit rule."""
    source = PLAN_SOURCE.read_text()
    for rule in ("tp_sharded_parameters", "embedding_units", "checkpointed_block_indices", "match_plan", "Style", "Shard(", "Replicate(", "tp_plan[",
                 "get_input_embeddings", "expert_numel", "muon_matrices", "MOMENTS", "active_expert_share"):
        assert rule not in source, rule
    assert not re.search(r"\b(dp_cp|dims\.tp|dims\.ep|dims\.efsdp)\s*[*/]", source), "no division of sizes by layout degrees"


def test_per_rank_gb_is_the_largest_rank_in_decimal_gigabytes():
    result = planned([*TINY, "parallel=tp2dp2cp2"], 8)
    as_json = result.as_json()
    assert as_json["per_rank_gb"] == round(max(memory.total for memory in result.ranks) / GB, 4)
    assert GB == 1e9


def test_private_torch_apis_stay_in_compat():
    """The fake process group, DTensor's shard rule and the dispatch mode the plan relies on are private
    PyTorch APIs: only compat.py may name them."""
    private = ("torch.testing._internal", "_python_dispatch", "tensor._utils", "._cdata", "_get_fsdp_state", "_compute_local_shape")
    for path in Path(plan_module.__file__).parent.rglob("*.py"):
        if path.name != "compat.py":
            source = path.read_text()
            assert not [name for name in private if name in source], path


def test_a_model_the_meta_device_cannot_run_is_one_line_exit_3(capsys):
    """XLNet's forward makes a tensor off the meta device and mixes it in: said, not guessed. (BART's, whose
    position embedding is handed one row of global positions without a check of their values, runs.)"""
    code, _, err = plan_here(capsys, "model=tiny", "model.arch=xlnet", "--world-size", "1")
    assert code == 3
    assert err.startswith("p3d: error: model.arch=xlnet: p3d plan cannot run this model's step on the meta device") and len(err.strip().splitlines()) == 1
    assert plan_here(capsys, "model=tiny", "model.arch=bart", "--world-size", "1")[0] == 0


def test_optimizer_state_follows_the_optimizer():
    """AdamW and Adam: two moments per weight; Muon: one for its matrices, two for the rest; SGD: one with
    momentum, none without; Adafactor: a row and a column factor per matrix (whole) and one moment per vector."""
    base = [*OPT_4_LAYERS, "parallel=tp2dp2cp2", "train.global_batch_size=4"]
    ratios = {}
    for name, extra in (("adamw", []), ("adam", []), ("muon", []), ("sgd", []), ("sgd_momentum", ["optim.momentum=0.9"]), ("adafactor", [])):
        memory = planned([*base, f"optim.name={name.split('_')[0]}", *extra], 8).breakdown()
        ratios[name] = memory["optimizer state"] / memory["weights"]
    assert ratios["adamw"] == ratios["adam"] == pytest.approx(2.0, rel=1e-3)
    assert ratios["sgd"] == 0 and ratios["sgd_momentum"] == pytest.approx(1.0, rel=1e-3)
    assert 1.0 < ratios["muon"] < 2.0  # OPT's embeddings and head take AdamW's two moments
    assert 0 < ratios["adafactor"] < 0.1


@pytest.mark.parametrize("name, extra", [("adamw", []), ("adam", []), ("muon", []), ("sgd", ["optim.momentum=0.9"]), ("adafactor", [])])
def test_optimizer_state_sizes_are_what_the_optimizer_keeps(name, extra):
    """optim.optimizer_state_sizes (what the plan counts) against the state of the optimizer p3d builds,
    after a step on a one-process model: a change to an optimizer without the sizes following fails here."""
    import torch

    from p3d import compat
    from p3d.model import build_meta_model
    from p3d.optim import build_optimizer, optimizer_state_sizes

    config = to_object(compose([*TINY, f"optim.name={name}", *extra]))
    setup = validate(config, 1)
    model = build_meta_model(setup.hf_config, torch.float32).to_empty(device="cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
        param.grad = torch.randn_like(param)
    optimizer = build_optimizer(model, config.optim)
    with compat.fake_process_group(1):  # Muon and Adafactor all-reduce over the (here one-rank) world
        optimizer.step()
    expected = optimizer_state_sizes(model, config.optim)
    for param_name, param in model.named_parameters():
        state = [value for value in optimizer.state[param].values() if isinstance(value, torch.Tensor) and value.numel() > 1]
        shaped = sum(1 for value in state if value.shape == param.shape)
        whole = sum(value.numel() for value in state if value.shape != param.shape)
        assert (shaped, whole) == (expected[param_name].per_shard, expected[param_name].whole), param_name


def test_the_plan_follows_the_expert_parallel_code():
    """Tiny Mixtral at dp4: with ep2 each rank gathers half of the experts (over efsdp) and exchanges tokens
    by all-to-all; the experts' stored share is a quarter either way. All of it read from expert.py's sharding."""
    results = {}
    for ep in (1, 2):
        result = planned(["model=tiny", "model.arch=mixtral", "parallel.dp=4", f"parallel.ep={ep}", "train.micro_batch_size=1", "train.global_batch_size=8"], 4)
        experts = [unit for unit in result.trace.units if unit.name.endswith(".experts")]
        results[ep] = result, experts
    dense, _ = results[1]
    expert_parallel, experts = results[2]
    assert len(experts) == 2 and {unit.group for unit in experts} == {"efsdp"}
    all_experts = sum(p.numel() for name, p in _meta_mixtral().named_parameters() if ".experts." in name)
    assert sum(unit.gathered_numel for unit in experts) == all_experts // 2  # this rank's half of the experts
    assert sum(expert_parallel.trace.shard_numel[0][unit.name] for unit in experts) == all_experts // 4
    assert sum(dense.trace.shard_numel[0].values()) == sum(expert_parallel.trace.shard_numel[0].values())
    collectives = {(c.group, c.name.split(" (")[0]): c for c in expert_parallel.trace.collectives}
    assert collectives[("ep", "EP all-to-all")].per_micro_batch == 2 * 5  # 2 MoE layers x (counts, 2 forward, 2 backward)
    assert not any(c.group == "ep" for c in dense.trace.collectives)


def _meta_mixtral():
    from p3d.model import build_meta_model

    config = to_object(compose(["model=tiny", "model.arch=mixtral"]))
    return build_meta_model(validate(config, 1).hf_config)


def test_the_logits_are_freed_before_backward():
    """The loss saves its log-probabilities, not the logits, and the step drops them (p3d.trainer): at most
    the log-probabilities and two fp32 gradients of the logits' size are live in the loss's backward."""
    import weakref

    import torch

    from p3d.plan import Sizes, replay_step
    from p3d.trainer import summed_token_loss

    logits = torch.randn(2, 8, 16, requires_grad=True) * 1.0
    alive = weakref.ref(logits)
    loss = summed_token_loss(logits, torch.zeros(2, 8, dtype=torch.long))
    del logits
    assert alive() is None  # nothing the loss keeps for backward holds the logits
    loss.backward()
    trace = planned([*TINY, "parallel.dp=2"], 2).trace
    timeline = replay_step(trace, 0, Sizes(4, 4), in_backward=False)
    assert timeline.most["logits and loss"] == trace.loss_bytes + 2 * trace.logits_fp32_bytes


def transients(plan) -> float:
    """What exists only during the step at the peak, beyond the stored state and the activations."""
    parts = plan.breakdown()
    return parts["gathered weights"] + parts["gathered gradients"] + parts["reduce buffers"]


def test_replicated_ranks_hold_the_whole_model_state_and_all_reduce_it_in_ddp_buckets():
    """dp_replicate=2 in fp32 is DDP's reducer: weights, gradients and optimizer state of one process on
    each rank (FSDP at dp2: half), no gathered copy of the weights, the gradients kept in DDP's flat buckets
    between steps, all-reduced once per step with accumulation, one all-reduce per bucket as torch assigns them."""
    from p3d.plan import Sizes, collectives, replay_step

    one = planned(OPT_4_LAYERS, 1)
    sharded = planned([*OPT_4_LAYERS, "parallel.dp=2"], 2)
    replicated = planned([*OPT_4_LAYERS, "parallel.dp_replicate=2"], 2)
    for part in ("weights", "optimizer state"):
        assert replicated.breakdown()[part] == pytest.approx(one.breakdown()[part])
        assert sharded.breakdown()[part] == pytest.approx(one.breakdown()[part] / 2, rel=1e-3)
    whole = one.trace.parameters * 4  # fp32
    timelines = {name: replay_step(result.trace, 0, Sizes(4, 4), in_backward=False) for name, result in (("sharded", sharded), ("replicated", replicated))}
    assert timelines["replicated"].most["gradients"] == whole + replicated.trace.tied_numel * 4  # and the tied head's second gradient, briefly
    assert timelines["sharded"].most["gradients"] == pytest.approx(whole / 2, rel=1e-3)
    assert timelines["replicated"].most["gathered weights"] == 0 and not replicated.trace.fsdp
    assert replicated.trace.micro_batches == 2 and not replicated.trace.reduces_every_micro_batch  # grad_sync=auto: nothing sharded
    (reduce,) = collectives(replicated.trace, replicated.config)
    buckets = replicated.trace.ddp_buckets
    assert sum(buckets) == one.trace.parameters and len(buckets) > 4  # closed at 25 MiB or more
    assert (reduce.group, reduce.per_step(2)) == ("dp_cp", (len(buckets), whole)) and reduce.name.startswith("all-reduce of gradients")
    assert "DDP: every rank holds the whole model" in data_parallel(replicated.trace)


def test_replicated_tensor_parallel_weights_are_reduced_in_ddp_style_buckets():
    """dp_replicate=2 with TP in fp32 is p3d's bucketed reducer (DDP's scheme for DTensors, parallel/reducer.py):
    each rank holds what tp2 alone holds, no FSDP2 unit and no gathered copy, its TP-local gradients in flat
    buckets by DDP's rule, each all-reduced once per step over the replicas."""
    from p3d.plan import collectives

    tensor_parallel = planned([*OPT_4_LAYERS, "parallel.tp=2"], 2)
    replicated = planned([*OPT_4_LAYERS, "parallel.tp=2", "parallel.dp_replicate=2"], 4)
    for part in ("weights", "optimizer state"):
        assert replicated.breakdown()[part] == pytest.approx(tensor_parallel.breakdown()[part])
    assert not replicated.trace.fsdp and replicated.breakdown()["gathered weights"] == 0
    buckets = replicated.trace.ddp_buckets
    assert len(buckets) > 4 and sum(buckets) * 4 == pytest.approx(tensor_parallel.breakdown()["weights"], rel=1e-3)
    reduce = next(c for c in collectives(replicated.trace, replicated.config) if c.name.startswith("all-reduce of gradients"))
    assert (reduce.group, reduce.per_step(replicated.trace.micro_batches)[0]) == ("dp_cp", len(buckets))
    assert "DDP: every rank holds the whole model" in data_parallel(replicated.trace)


def test_replicated_with_a_compute_cast_is_fsdp2_replicate():
    """bf16 compute over fp32 weights needs FSDP2's cast: FSDP2's replicate keeps its unsharded (bf16) copy
    of every weight from forward to backward and all-reduces each bucket of blocks, and the root, once."""
    from p3d.plan import collectives

    replicated = planned([*OPT_4_LAYERS, "parallel.dp_replicate=2", "train.dtype=bf16"], 2)
    assert replicated.trace.fsdp and not replicated.trace.ddp_buckets
    assert all(unit.keeps_gathered for unit in replicated.trace.units)  # read from FSDP2's state
    assert replicated.breakdown()["gathered weights"] == replicated.trace.parameters * 2  # bytes
    (reduce,) = collectives(replicated.trace, replicated.config)
    assert (reduce.group, reduce.per_step(2)) == ("dp_cp", (5, replicated.trace.parameters * 4))  # 4 buckets of one 201 MB block, and the root


def test_a_bucket_of_blocks_is_one_replicated_unit_with_all_their_parameters():
    """Blocks of about 16 MB: FSDP2's replicate wraps two per 25 MiB bucket as one unit, gathered and
    all-reduced together; the plan counts it once, with both blocks' parameters."""
    from p3d.plan import collectives

    wide = ["model.config.hidden_size=512", "model.config.intermediate_size=2048", "model.config.num_hidden_layers=4"]
    result = planned([*TINY, *wide, "parallel.dp_replicate=2", "train.dtype=bf16"], 2)  # a compute cast: FSDP2's replicate
    buckets = result.trace.units[:-1]
    assert [unit.modules for unit in buckets] == [["model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3"]]
    block = sum(p.numel() for name, p in _meta_model(result).named_parameters() if name.startswith("model.layers.0."))
    assert all(unit.gathered_numel == 2 * block and len(unit.parameters) == 2 * 9 for unit in buckets)  # llama: 9 tensors per block
    assert sum(unit.gathered_numel for unit in result.trace.units) == result.trace.parameters
    (reduce,) = collectives(result.trace, result.config)
    assert reduce.per_step(result.trace.micro_batches)[0] == 3  # two buckets and the root


def _meta_model(result):
    from p3d.model import build_meta_model

    return build_meta_model(result.setup.hf_config)


def test_hsdp_shards_over_dp_shard_and_all_reduces_over_the_replicas():
    """dp_replicate=2 x dp_shard=2: each rank holds half the model (its replica's shard); all-gathers and
    reduce-scatters run over dp_shard_cp, and the reduced shards are all-reduced over dp_replicate."""
    from p3d.plan import collectives

    one = planned(OPT_4_LAYERS, 1)
    hsdp = planned([*OPT_4_LAYERS, "parallel.dp_replicate=2", "parallel.dp_shard=2"], 4)
    assert hsdp.breakdown()["weights"] == pytest.approx(one.breakdown()["weights"] / 2, rel=1e-3)
    for rank in range(4):
        assert sum(hsdp.trace.shard_numel[rank].values()) == pytest.approx(hsdp.trace.parameters / 2, rel=1e-3), rank
    found = {(c.group, c.name.split(" of ")[0]): c for c in collectives(hsdp.trace, hsdp.config)}
    assert set(found) == {("dp_shard_cp", "FSDP all-gather"), ("dp_shard_cp", "FSDP reduce-scatter"), ("dp_replicate", "HSDP all-reduce")}
    reduce_scatter, all_reduce = found[("dp_shard_cp", "FSDP reduce-scatter")], found[("dp_replicate", "HSDP all-reduce")]
    assert all_reduce.per_micro_batch == reduce_scatter.per_micro_batch == len(hsdp.trace.units)
    assert all_reduce.bytes_per_micro_batch == pytest.approx(reduce_scatter.bytes_per_micro_batch / 2, rel=1e-3)  # this rank's half


@pytest.mark.parametrize("key, part", [("parallel.reshard_after_forward=false", "gathered weights"), ("parallel.grad_sync=step", "gathered gradients")])
def test_fsdp_options_that_cost_memory_raise_the_transients(key, part):
    """Both keep the whole unsharded model on each rank at the peak: every unit's gathered weights from
    forward to backward (FSDP2's state says which units reshard), or the unsharded fp32 gradients held
    across the micro-batches until the step's one reduction (parallel/fsdp.py decides when)."""
    base = [*OPT_4_LAYERS, "parallel.dp=4", "train.micro_batch_size=1"]  # two micro-batches per step
    before, after = planned(base, 4), planned([*base, key], 4)
    assert after.breakdown()[part] >= after.trace.parameters * 4
    assert transients(after) > transients(before) + after.breakdown()["weights"]


def test_replicate_buckets_group_blocks_in_backward_order():
    from p3d.parallel.fsdp import replicate_buckets

    assert replicate_buckets([10, 10], bucket_bytes=25) == []  # all in the root unit: one all-reduce
    assert replicate_buckets([10] * 5, bucket_bytes=25) == [[2, 3, 4]]  # blocks 0, 1 stay with the root
    assert replicate_buckets([30, 1, 30], bucket_bytes=25) == [[2], [0, 1]]


@pytest.mark.parametrize("sizes", [dict(dp=4, cp=2, tp=2, dp_replicate=2), dict(dp=2, cp=2, tp=1, ep=2)])
def test_mesh_coordinates_are_the_meshes_own(sizes):
    """The plan reads every rank's shard at ParallelDims.mesh_coordinates: they must be the coordinates the
    real meshes give that rank (each rank of a fake process group in turn)."""
    from p3d import compat
    from p3d.distributed.mesh import Meshes, ParallelDims

    dims = ParallelDims(**sizes)
    compat.import_dynamo()
    for rank in range(dims.world_size):
        with compat.fake_process_group(dims.world_size, rank):
            meshes = Meshes(dims, "cpu")
            views = [meshes.world, meshes.dp, meshes.dp_cp, meshes.data_parallel, meshes.vocab] + ([meshes.experts] if dims.ep > 1 else [])
            coordinates = {name: coordinate for mesh in views for name, coordinate in zip(mesh.mesh_dim_names, mesh.get_coordinate())}
        expected = dims.mesh_coordinates(rank)
        assert {name: expected[name] for name in coordinates} == coordinates, rank


def test_returning_freed_memory_leaves_no_allocator_term():
    """dist.cpu_return_freed_memory=true: glibc keeps no freed buffers, so the plan counts the live tensors only."""
    default = planned([*TINY, "parallel.dp=2"], 2).largest
    returned = planned([*TINY, "parallel.dp=2", "dist.cpu_return_freed_memory=true"], 2).largest
    assert default.allocator > 0 and returned.allocator == 0
    assert returned.total == pytest.approx(default.total - default.allocator)


VOCABULARY = ["model=tiny_llama", "model.config.hidden_size=256", "model.config.intermediate_size=512", "model.config.vocab_size=32000", "train.global_batch_size=8", "train.micro_batch_size=1"]


def test_vocabulary_parallel_embeddings_are_sharded_over_every_rank_and_never_gathered():
    """parallel.vocab_parallel=true (parallel/vocab.py): each rank holds 1/N of the embedding's and the head's
    vocabulary rows, FSDP2 neither gathers nor reduces them, the token ids and hidden states move over dp x cp
    instead, and the peak drops by the gathered head, its unsharded gradient and its reduce buffer."""
    from p3d.plan import collectives

    vocab, hidden = 32000, 256
    before = planned([*VOCABULARY, "parallel.dp=4"], 4)
    after = planned([*VOCABULARY, "parallel.dp=4", "parallel.vocab_parallel=true"], 4)
    units = {unit.name: unit for unit in after.trace.units}
    assert not units["model.embed_tokens"].gathered and not units["lm_head"].gathered
    for rank in range(4):
        assert after.trace.shard_numel[rank]["lm_head"] == after.trace.shard_numel[rank]["model.embed_tokens"] == vocab * hidden // 4

    def fsdp_bytes(plan, what):
        return sum(c.bytes_per_micro_batch for c in collectives(plan.trace, plan.config) if c.name.startswith(what))
    # the embedding is gathered for its forward and its backward, the head once (it stays gathered)
    assert fsdp_bytes(before, "FSDP all-gather") - fsdp_bytes(after, "FSDP all-gather") == 3 * vocab * hidden * 4
    assert fsdp_bytes(before, "FSDP reduce-scatter") - fsdp_bytes(after, "FSDP reduce-scatter") == 2 * vocab * hidden * 4
    moved = {c.name: c.per_micro_batch for c in collectives(after.trace, after.config) if not c.name.startswith("FSDP")}
    # ids, labels, hidden states and the embedding's gradient gathered; the embedding and the hidden states'
    # gradient reduce-scattered; the loss's max and sums all-reduced (dp x cp is dp here)
    assert moved == {"DP all-gather (activations and their gradients)": 4, "DP reduce-scatter (activations and their gradients)": 2, "DP all-reduce (activations and their gradients)": 2}
    assert after.breakdown()["gathered weights"] < before.breakdown()["gathered weights"]
    assert after.largest.total < before.largest.total - 2 * vocab * hidden * 4


def test_the_plan_reads_backward_prefetch_from_fsdp2(monkeypatch):
    """parallel.backward_prefetch=false: FSDP2 gathers each unit when its backward begins, one unit's weights
    less at the peak; the plan reads that from FSDP2's state (with the switch a no-op, it prefetches again)."""
    base = [*OPT_4_LAYERS, "parallel.dp=4", "train.micro_batch_size=1"]
    on, off = planned(base, 4), planned([*base, "parallel.backward_prefetch=false"], 4)
    assert all(unit.prefetches for unit in on.trace.units) and not any(unit.prefetches for unit in off.trace.units)
    block = max(unit.gathered_numel for unit in on.trace.units if ".layers." in unit.name) * 4  # fp32
    assert on.breakdown()["gathered weights"] - off.breakdown()["gathered weights"] == pytest.approx(block, rel=0.01)
    monkeypatch.setattr("p3d.parallel.fsdp.no_backward_prefetch", lambda unit: None)
    assert all(unit.prefetches for unit in planned([*base, "parallel.backward_prefetch=false"], 4).trace.units)
