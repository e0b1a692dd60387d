"""Validation before any collective: each problem is one line that names the keys."""

from __future__ import annotations

import pytest

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.errors import ConfigError
from p3d.models import architecture


def problems(overrides, world_size):
    with pytest.raises(ConfigError) as error:
        validate(to_object(compose(overrides)), world_size)
    return error.value.problems


def test_valid_config_passes_and_infers_dp():
    setup = validate(to_object(compose(["parallel.tp=2", "parallel.cp=2"])), 8)
    assert (setup.dims.dp, setup.dims.cp, setup.dims.tp) == (2, 2, 2)


@pytest.mark.parametrize("overrides, world, sizes", [
    (["parallel.dp_replicate=2"], 2, (2, 1, True, False, 1)),  # (dp_replicate, dp_shard, replicated, hybrid, shard ranks)
    (["parallel.dp_replicate=2"], 4, (2, 2, False, True, 2)),
    (["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.cp=2"], 4, (2, 1, True, False, 1)),
    (["parallel=tp2dp2cp2"], 8, (1, 2, False, False, 4)),  # the default: FSDP over dp x cp
    (["parallel.dp_shard=2", "parallel.dp_replicate=2", "parallel.tp=2"], 8, (2, 2, False, True, 2)),
])
def test_dp_is_dp_replicate_times_dp_shard(overrides, world, sizes):
    dims = validate(to_object(compose(overrides)), world).dims
    assert (dims.dp_replicate, dims.dp_shard, dims.replicated, dims.hybrid, dims.shard_ranks) == sizes
    assert dims.dp == dims.dp_replicate * dims.dp_shard and dims.world_size == world


def test_a_dp_given_by_replicas_and_shards_must_fit_the_world():
    (problem,) = problems(["parallel.dp_replicate=2", "parallel.dp_shard=2"], 2)
    assert problem.startswith("parallel.dp_replicate*parallel.dp_shard*parallel.cp*parallel.tp = 4*1*1 = 4 but the world size is 2: launch 4 processes")
    (problem,) = problems(["parallel.dp_replicate=2"], 3)
    assert problem == "parallel.dp_replicate=2 does not divide the data-parallel degree dp=3: choose a parallel.dp_replicate that divides 3"


def test_expert_parallelism_is_not_combined_with_replicas():
    (problem,) = problems(["model=tiny", "model.arch=mixtral", "parallel.ep=2", "parallel.dp_replicate=2"], 4)
    assert problem == "parallel.ep=2 with parallel.dp_replicate=2: expert parallelism is not combined with replicated data parallelism yet; use parallel.dp_replicate=1 or parallel.ep=1"


def test_world_size_must_be_dp_cp_tp():
    (problem,) = problems(["parallel=tp2dp2cp2"], 6)
    assert "parallel.dp*parallel.cp*parallel.tp" in problem and "world size is 6" in problem


def test_inferred_dp_needs_divisible_world():
    (problem,) = problems(["parallel.tp=4"], 6)
    assert "parallel.cp*parallel.tp" in problem


def test_tp_must_divide_heads():
    found = problems(["parallel.tp=3", "parallel.dp=1"], 3)
    assert any("model.config.num_attention_heads=8" in p and "parallel.tp=3" in p for p in found)


def test_tp_must_divide_kv_heads():
    found = problems(["parallel=tp8dp1cp1"], 8)
    assert any("model.config.num_key_value_heads=4" in p for p in found)


@pytest.mark.parametrize("layout, chunks", [("balanced", 4), ("contiguous", 2)])
def test_seq_len_divisible_for_cp(layout, chunks):
    found = problems(["parallel=tp1dp1cp2", "data.seq_len=66", f"parallel.cp_layout={layout}"], 2) if layout == "balanced" else problems(["parallel=tp1dp1cp2", "data.seq_len=65", f"parallel.cp_layout={layout}"], 2)
    assert any(p.startswith("data.seq_len=") and f"divisible by {chunks}" in p for p in found)


def test_global_batch_divisible_by_micro_times_dp():
    (problem,) = problems(["parallel=tp1dp2cp1", "train.global_batch_size=6", "train.micro_batch_size=2"], 2)
    assert "train.global_batch_size=6" in problem and "train.micro_batch_size*dp" in problem


def test_missing_data_path():
    (problem,) = problems(["data.path=./no/such/file.jsonl"], 1)
    assert problem.startswith("data.path=./no/such/file.jsonl") and "no such file" in problem


def plan_problems(plan: dict[str, str]) -> list[str]:
    """A model YAML's own plan (patterns contain dots, so YAML, not key=value, is where plans live)."""
    config = to_object(compose(["model=tiny_opt", "parallel=tp2dp1cp1"]))
    config.model.tp_plan = plan
    with pytest.raises(ConfigError) as error:
        validate(config, 2)
    return error.value.problems


def test_tp_plan_pattern_must_match_a_module():
    found = plan_problems({"model.decoder.layers.*.fc1": "colwise", "model.decoder.layers.*.nope": "colwise"})
    assert any("pattern 'model.decoder.layers.*.nope' matches no module" in p for p in found)


def test_tp_plan_style_must_be_supported():
    found = plan_problems({"model.decoder.layers.*.fc1": "diagonal"})
    assert any("style 'diagonal'" in p and "model.tp_plan" in p for p in found)
    (problem,) = plan_problems({"model.decoder.layers.*.fc2": "moe_identity_expert"})
    assert problem == "model.tp_plan: model.decoder.layers.*.fc2: moe_identity_expert (identity experts) is not supported under tensor parallelism; use parallel.tp=1"


def test_experts_style_needs_fused_experts_that_tp_divides():
    (problem,) = plan_problems({"model.decoder.layers.*.fc2": "moe_tp_experts"})
    assert problem == (
        "parallel.tp=2: 'model.decoder.layers.0.fc2' (Linear) is not a fused experts module (3-D weights, "
        "forward(hidden, top_k_index, top_k_weights)); use parallel.tp=1"
    )
    (problem,) = problems(["model=tiny", "model.arch=mixtral", "parallel.tp=8", "model.config.num_attention_heads=8", "model.config.num_key_value_heads=8"], 8)
    assert problem == "parallel.tp=8: 4 experts of 'model.layers.0.mlp.experts' cannot be split evenly over 8 ranks; choose a degree that divides 4"


def test_transformers_plan_entries_for_other_variants_are_left_out():
    """DeepSeek-V2's plan names q_proj (no query compression) and q_b_proj (with it): the tiny model has the latter."""
    setup = validate(to_object(compose(["model=tiny", "model.arch=deepseek_v2", "parallel.tp=2"])), 2)
    assert "model.layers.*.self_attn.q_b_proj" in setup.tp_plan and "model.layers.*.self_attn.q_proj" not in setup.tp_plan
    assert setup.tp_plan["model.layers.*.mlp.experts"] == "moe_tp_experts"
    assert "model.layers.*.mlp.experts.gate_up_proj" not in setup.tp_plan  # subsumed: experts stay whole


def test_tp_plan_must_shard_tied_embeddings_alike():
    found = plan_problems({"model.decoder.embed_tokens": "embedding_rowwise"})
    assert any("tied embeddings" in p for p in found)


def test_whole_plan_can_be_replaced_from_the_command_line():
    overrides = ["model=tiny_opt", "model.tp_plan=null", "model.tp_plan={model.decoder.layers.*.fc1: colwise, model.decoder.layers.*.fc2: rowwise}"]
    assert validate(to_object(compose(overrides)), 1).tp_plan == {"model.decoder.layers.*.fc1": "colwise", "model.decoder.layers.*.fc2": "rowwise"}


def test_a_model_whose_structure_is_not_recognised_needs_a_plan_under_tp():
    (problem,) = problems(["model=tiny", "model.arch=mamba", "parallel=tp2dp1cp1"], 2)
    assert problem.startswith("model.tp_plan: MambaForCausalLM: block structure not recognised (no query/key/value projections")
    assert problem.endswith("give one in the model YAML (module pattern: style)")


def test_tokenizer_must_fit_the_vocabulary():
    found = problems(["model.config.vocab_size=200"], 1)
    assert any("model.config.vocab_size=200" in p for p in found)


def test_several_problems_are_all_reported():
    found = problems(["parallel=tp2dp2cp2", "train.global_batch_size=6", "data.path=./nope.txt"], 6)
    assert len(found) == 3


def test_optimizer_in_backward_needs_no_clipping_and_no_accumulation():
    found = problems(["optim.in_backward=true", "train.global_batch_size=8", "train.micro_batch_size=2"], 1)
    assert any(p.startswith("optim.in_backward=true") and "optim.grad_clip=0" in p for p in found)
    assert any("train.micro_batch_size=8" in p for p in found)


def test_compile_is_accepted_with_tensor_parallelism():
    # TP linears compute on local shards with explicit collectives (parallel/tensor.py), which compile;
    # tests/distributed/test_real_size.py shows the compiled tp2cp2 run keeps parity.
    validate(to_object(compose(["train.compile=true", "parallel=tp2dp1cp1"])), 2)  # raises ConfigError if refused


def test_unknown_architecture():
    found = problems(["model.arch=not_a_model"], 1)
    assert any(p.startswith("model.arch=not_a_model") for p in found)


def test_pretrained_needs_a_source():
    found = problems(["model.init=pretrained"], 1)
    assert any("model.pretrained" in p for p in found)


@pytest.mark.parametrize("packing", ["stream", "documents"])
def test_sliding_windows_softcapping_and_sinks_are_allowed_under_cp(packing):
    for arch in ("mistral", "gemma2", "granite_swa"):
        setup = validate(to_object(compose([f"model.arch={arch}", f"data.packing={packing}", "parallel=tp1dp1cp2"])), 2)
        assert setup.dims.cp == 2


def test_bidirectional_attention_runs_on_the_whole_sequence_under_cp_and_is_refused_for_packed_documents():
    bidirectional = ["model.arch=bert", "model.config.is_decoder=false"]
    setup = validate(to_object(compose([*bidirectional, "parallel=tp1dp1cp2"])), 2)
    assert architecture(setup.hf_config).attention_route(setup.hf_config).name == "whole_sequence"  # every rank all of it: exact
    (problem,) = problems([*bidirectional, "parallel=tp1dp1cp2", "data.packing=documents"], 2)
    assert problem.startswith("model.arch=bert: packed documents do not give each document's own results")


def test_attention_saying_it_is_not_causal_is_taken_as_causal_where_the_model_masks_causally():
    setup = validate(to_object(compose(["model.arch=bigbird_pegasus", "parallel=tp1dp1cp2"])), 2)  # its decoder says is_causal=False
    assert architecture(setup.hf_config).attention_route(setup.hf_config).causal_by_mask


def test_attention_outside_the_interface_is_refused_under_cp():
    (problem,) = problems(["model.arch=cpmant", "parallel=tp1dp1cp2"], 2)  # a learned prompt before the tokens, a pairwise bias
    assert problem.startswith("model.arch=cpmant: its attention does not go through transformers' attention interface, and p3d's other ways in")


def test_attention_dropout_is_refused_naming_the_key():
    (problem,) = problems(["model.arch=qwen2", "model.config.attention_dropout=0.1", "data.packing=documents"], 1)
    assert problem.startswith("model.config.attention_dropout=0.1: p3d's attention (data.packing=documents) has no attention dropout")


def test_positions_that_cannot_restart_per_row_are_refused_for_packed_documents():
    (problem,) = problems(["model.arch=bart", "data.packing=documents"], 1)
    assert problem.startswith("model.arch=bart: packed documents do not give each document's own results")
    assert validate(to_object(compose(["model.arch=bart", "parallel=tp1dp1cp2"])), 2).dims.cp == 2  # its positions are p3d's under CP


def test_models_without_attention_are_refused_under_cp():
    (problem,) = problems(["model.arch=mamba", "parallel=tp1dp1cp2"], 2)
    assert problem.startswith("model.arch=mamba:") and "parallel.cp=2" in problem and "use parallel.cp=1" in problem


def test_torch_cp_impl_runs_plain_causal_attention_only():
    found = problems(["model.arch=mistral", "parallel=tp1dp1cp2", "parallel.cp_impl=torch", "dist.device=cpu"], 2)
    assert any("uses sliding windows" in p for p in found), found


def test_torch_cp_impl_needs_cuda():
    (problem,) = problems(["parallel=tp1dp1cp2", "parallel.cp_impl=torch", "dist.device=cpu"], 2)
    assert problem.startswith("parallel.cp_impl=torch needs CUDA")


def test_torch_cp_impl_cannot_keep_documents_apart():
    found = problems(["parallel=tp1dp1cp2", "parallel.cp_impl=torch", "data.packing=documents"], 2)
    assert any(p.startswith("parallel.cp_impl=torch") and "data.packing=documents" in p for p in found), found


def test_auto_cp_impl_is_ring_on_cpu():
    setup = validate(to_object(compose(["parallel=tp1dp1cp2", "dist.device=cpu"])), 2)
    assert setup.cp_impl.value == "ring"


def test_sequence_parallel_needs_tensor_parallelism():
    (problem,) = problems(["parallel.sequence_parallel=true"], 1)
    assert problem.startswith("parallel.sequence_parallel=true needs parallel.tp > 1")


def test_sequence_parallel_needs_tokens_divisible_by_tp():
    found = problems(["parallel=tp2dp1cp1", "parallel.sequence_parallel=true", "data.seq_len=33"], 2)
    assert any(p.startswith("data.seq_len:") and "parallel.tp=2" in p for p in found), found


def test_sequence_parallel_is_offered_only_for_verified_models():
    found = problems(["model.arch=qwen2", "parallel=tp2dp1cp1", "parallel.sequence_parallel=true"], 2)
    assert any("not verified for model type 'qwen2'" in p for p in found), found


def test_expert_parallel_degree_is_checked_in_one_line_each():
    moe = ["model=tiny", "model.arch=mixtral"]
    found = problems([*moe, "parallel.ep=3"], 4)
    assert found[0] == "parallel.ep=3 does not divide dp*cp = 4*1 = 4 (expert parallelism borrows the dp x cp ranks): choose an ep that divides 4"
    (problem,) = problems([*moe, "parallel.ep=2", "parallel.tp=2"], 4)
    assert problem.startswith("parallel.ep=2 with parallel.tp=2: experts are split over tp or over ep, not both")
    (problem,) = problems([*moe, "parallel.ep=8", "train.micro_batch_size=1"], 8)
    assert problem == "parallel.ep=8: 4 experts of 'model.layers.0.mlp.experts' cannot be split evenly over 8 ranks; choose a degree that divides 4"
    (problem,) = problems(["model=tiny_llama", "parallel.ep=2"], 2)
    assert problem == "parallel.ep=2: model.arch=llama has no mixture-of-experts layers p3d can split (fused experts modules); use parallel.ep=1"
    (problem,) = problems([*moe, "model.config.output_router_logits=true"], 1)
    assert problem.startswith("model.config.output_router_logits=true: p3d does not add the model's load-balancing")


def test_returning_freed_memory_needs_glibc(monkeypatch):
    import p3d.config.validate as validate_module

    monkeypatch.setattr(validate_module, "glibc_mallopt", lambda: None)
    found = problems(["dist.cpu_return_freed_memory=true"], 1)
    assert found == ["dist.cpu_return_freed_memory=true needs Linux with glibc (its mallopt); set dist.cpu_return_freed_memory=false"]


def test_a_config_with_several_text_parts_is_refused_in_one_line_not_a_traceback():
    """MusicGen's config holds a text encoder and a decoder: which text config is meant is ambiguous, and its
    causal LM cannot be built from it; validation says the latter instead of failing on the former."""
    (problem,) = problems(["model=tiny", "model.arch=musicgen"], 1)
    assert problem.startswith("model.config: transformers cannot build MusicgenConfig's model (model.arch=musicgen)")


def test_vocabulary_parallelism_needs_one_replica_and_plain_embeddings():
    validate(to_object(compose(["model=tiny_llama", "parallel.vocab_parallel=true", "parallel.dp=2"])), 2)
    validate(to_object(compose(["model=tiny_opt", "parallel.vocab_parallel=true", "parallel.tp=2"])), 2)  # tied: one weight, sharded once
    (problem,) = problems(["model=tiny_llama", "parallel.vocab_parallel=true", "parallel.dp_replicate=2"], 2)
    assert problem.startswith("parallel.vocab_parallel=true") and "parallel.dp_replicate=1" in problem
