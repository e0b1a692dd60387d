"""The models seam: tiny versions of any architecture, checkpoints' own sizes, plans and where they come from."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from p3d.config.compose import compose, to_object
from p3d.config.validate import validate
from p3d.errors import ConfigError
from p3d.model import build_hf_config, build_meta_model
from p3d.models import architecture, decoder_blocks, tiny


def hf_config(overrides):
    return build_hf_config(to_object(compose(overrides)).model)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3", "falcon", "gemma3_text"])
def test_tiny_builds_any_architecture_from_its_own_config(arch):
    cfg = compose(["model=tiny", f"model.arch={arch}"])
    config = build_hf_config(to_object(cfg).model)
    assert config.model_type == arch and config.hidden_size == 64 and config.num_hidden_layers == 2 and config.vocab_size == 264
    assert cfg.model.name == f"tiny_{arch}" and f"tiny_{arch}-" in cfg.run.dir
    model = build_meta_model(config)
    assert len(decoder_blocks(model)) == 2 and sum(p.numel() for p in model.parameters()) < 500_000


def test_model_arch_alone_means_a_tiny_model_of_it():
    config = hf_config(["model.arch=gpt2"])  # the default preset's Llama sizes do not leak in
    assert type(config).__name__ == "GPT2Config" and config.n_embd == 64


def test_a_preset_for_another_architecture_says_how_to_get_a_tiny_one():
    with pytest.raises(ConfigError) as error:
        validate(to_object(compose(["model=tiny_llama", "model.arch=gpt2"])), 1)
    assert any("use model=tiny model.arch=gpt2" in problem for problem in error.value.problems)


def test_default_token_ids_outside_a_smaller_vocabulary_are_dropped_and_given_ones_refused():
    config = hf_config(["model=tiny_llama", "model.arch=phi3"])  # Phi-3's default pad id 32000
    assert config.pad_token_id is None
    with pytest.raises(ConfigError, match=r"model.config.pad_token_id=300: not below model.config.vocab_size=264"):
        hf_config(["model=tiny", "model.arch=phi3", "model.config.pad_token_id=300"])


def test_layer_type_patterns_keep_one_layer_of_each_type_and_follow_the_layer_count():
    config = hf_config(["model=tiny", "model.arch=gemma3_text"])
    assert config.layer_types == ["sliding_attention", "full_attention"] and config.sliding_window == 16
    config = hf_config(["model=tiny", "model.arch=gemma3_text", "model.config.num_hidden_layers=3"])
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("arch, layers", [("zamba", 3), ("zamba2", 2), ("gemma3n", 4), ("gemma3n_text", 4), ("gemma4_unified", 2)])
def test_values_given_per_layer_follow_the_smaller_layer_count(arch, layers):
    """Zamba keeps its layer types as `layers_block_type` (and ties its hybrid layers: it needs two); Gemma 3n's
    text config lists an MLP width per layer, Gemma 4's a per_layer_config keyed by layer index: all must
    describe the tiny model's layers (transformers' config classes refuse them otherwise). Gemma 3n's last layers
    reuse earlier layers' keys/values: one layer of each type computes them, one reuses them."""
    config = hf_config(["model=tiny", f"model.arch={arch}"])
    text = config.get_text_config()
    assert text.num_hidden_layers == layers and len(text.layer_types) == layers
    assert text.num_kv_shared_layers == (2 if arch.startswith("gemma3n") else 0) if hasattr(text, "num_kv_shared_layers") else True
    if arch != "gemma3n":  # its vision tower needs timm
        assert sum(p.numel() for p in build_meta_model(config).parameters()) < 5_000_000


def test_shrink_follows_sizes_derived_from_the_hidden_size():
    values = tiny.shrink(AutoConfig.for_model("opt"))
    assert values["hidden_size"] == values["word_embed_proj_dim"] == 64 and values["ffn_dim"] == 128


def test_hf_takes_every_size_from_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    saved = AutoConfig.for_model("qwen3", **{**tiny.shrink(AutoConfig.for_model("qwen3"), layers=3), "intermediate_size": 96})
    AutoModelForCausalLM.from_config(saved).save_pretrained(tmp_path / "ckpt")
    cfg = compose(["model=hf", f"model.pretrained={tmp_path / 'ckpt'}", "model.config.rms_norm_eps=0.001"])
    config = build_hf_config(to_object(cfg).model)
    assert (config.num_hidden_layers, config.intermediate_size, config.rms_norm_eps) == (3, 96, 0.001)
    assert cfg.model.name == "ckpt"
    with pytest.raises(ConfigError, match=r"model.arch=llama: model.pretrained=.* is a 'qwen3' checkpoint"):
        hf_config(["model=tiny_llama", "model.init=pretrained", f"model.pretrained={tmp_path / 'ckpt'}"])


def test_plans_come_from_p3d_transformers_or_the_module_structure():
    def choice(arch):
        config = hf_config(["model=tiny", f"model.arch={arch}"])
        return architecture(config).plan(build_meta_model(config))

    assert choice("gpt2").source == "p3d" and choice("gpt2").plan["transformer.h.*.attn.c_attn"] == "packed_colwise:3"
    assert choice("qwen3").source == "transformers"
    opt = choice("opt")
    assert opt.source == "inferred" and opt.plan == {
        "model.decoder.layers.*.self_attn.q_proj": "colwise",
        "model.decoder.layers.*.self_attn.k_proj": "colwise",
        "model.decoder.layers.*.self_attn.v_proj": "colwise",
        "model.decoder.layers.*.self_attn.out_proj": "rowwise",
        "model.decoder.layers.*.fc1": "colwise",
        "model.decoder.layers.*.fc2": "rowwise",
        "lm_head": "colwise_gather_output",
        "model.decoder.embed_tokens": "embedding_rowwise",
    }
    electra = choice("electra").plan  # the MLP is found from the block's width (64), not the embeddings' (128)
    assert electra["electra.encoder.layer.*.intermediate.dense"] == "colwise" and electra["electra.encoder.layer.*.output.dense"] == "rowwise"
    lfm2 = choice("lfm2")  # transformers shards its tied head over the vocabulary but leaves the embedding out
    assert lfm2.source == "transformers" and lfm2.plan["lm_head"] == "colwise_gather_output" and lfm2.plan["model.embed_tokens"] == "embedding_rowwise"
    falcon = choice("falcon").plan  # a fused query_key_value of unknown layout is gathered
    assert falcon["transformer.h.*.self_attention.query_key_value"] == "colwise_gather_output"
    assert falcon["transformer.h.*.self_attention.dense"] == "rowwise_split_input"
    moshi = choice("moshi").plan  # projections wrapped in a module (`q_proj.linear`); an embedding with one row more than the head
    assert moshi["model.layers.*.self_attn.q_proj.linear"] == "colwise" and "model.embed_tokens" not in moshi
    bitnet = choice("bitnet").plan  # a norm inside the MLP over its intermediate features: the MLP is gathered
    assert bitnet["model.layers.*.mlp.up_proj"] == "colwise_gather_output" and bitnet["model.layers.*.mlp.down_proj"] == "rowwise_split_input"


def test_validation_reports_where_the_plan_comes_from():
    assert validate(to_object(compose(["model=tiny_opt", "parallel.tp=2"])), 2).plan_source == "inferred"
    assert validate(to_object(compose(["model=tiny_opt", "parallel.tp=2", "model.tp_plan={model.decoder.layers.*.fc1: colwise, model.decoder.layers.*.fc2: rowwise}"])), 2).plan_source == "model.tp_plan"


def test_real_shape_presets_have_their_published_sizes():
    millions = {
        "qwen3-0.6b": 596.0, "gpt2": 124.4, "smollm2-135m": 134.5, "llama3.2-1b": 1235.8,
        "mixtral-8x7b": 46702.8, "qwen3-30b-a3b": 30532.1, "olmoe-1b-7b": 6919.2,  # mixtures of experts (all experts counted)
    }
    for preset, expected in millions.items():
        model = build_meta_model(hf_config([f"model={preset}"]))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == expected, preset


def test_probe_finds_what_attention_asks_for():
    from p3d.models.probe import probe

    gemma2 = probe(hf_config(["model=tiny", "model.arch=gemma2"]), with_documents=True)
    assert gemma2.windows == {16} and gemma2.softcap and gemma2.route == "interface" and gemma2.reordered_error < 1e-5
    falcon = probe(hf_config(["model=tiny", "model.arch=falcon"]), with_documents=False)
    assert falcon.route == "sdpa" and falcon.plain_causal
    gptj = probe(hf_config(["model=tiny", "model.arch=gptj"]), with_documents=True)
    assert gptj.route == "attn_method" and gptj.reordered_error < 1e-5 and gptj.documents_error < 1e-5
    bloom = probe(hf_config(["model=tiny", "model.arch=bloom"]), with_documents=True)  # ALiBi computed inline: its own attention, whole
    assert bloom.route == "whole_sequence" and bloom.reordered_error < 1e-5 and bloom.documents_error < 1e-5


def test_probe_keeps_attention_written_by_hand_where_the_model_gives_the_same_results():
    from p3d.models.probe import probe

    xglm = probe(hf_config(["model=tiny", "model.arch=xglm"]), with_documents=True)
    assert xglm.route == "whole_sequence" and xglm.reordered_error < 1e-5 and xglm.documents_error < 1e-5
    mvp = probe(hf_config(["model=tiny", "model.arch=mvp"]), with_documents=False)
    assert mvp.route == "gathered_keys" and mvp.reordered_error < 1e-5
    roformer = probe(hf_config(["model=tiny", "model.arch=roformer"]), with_documents=False)  # its rotary table comes per token
    assert roformer.route == "whole_sequence" and roformer.token_arguments == {"sinusoidal_pos": -2} and roformer.reordered_error < 1e-5
    cpmant = probe(hf_config(["model=tiny", "model.arch=cpmant"]), with_documents=False)  # a prompt before the tokens, a pairwise bias
    assert cpmant.attention_calls == 0


def test_probe_runs_each_cp_rank_alone_where_the_model_keeps_its_attention():
    """XGLM reshapes its keys by its query count: with every token in one process (as many keys as queries) the
    gathered keys look exact; only a cp rank alone (more keys than queries) shows the mix-up of heads."""
    from p3d.models import probe as probing

    config = hf_config(["model=tiny", "model.arch=xglm"])
    attempt, model = probing._probe_route(config, "gathered_keys")
    assert model is not None and attempt.reordered_error > 1e-3
    reference = probing._build(probing.probe_config(config))
    probing._recorder.findings = probing.Findings()  # what the probe's hooks count into
    try:
        assert probing._reordered_error(model, attention="eager", reference=reference, per_rank=False) < 1e-5
    finally:
        probing._recorder.findings = None


def test_parameters_no_init_weights_sets_start_at_zero_not_at_uninitialised_memory():
    from p3d.model import initialize_random

    config = hf_config(["model=tiny", "model.arch=data2vec-text"])  # its tied LM-head bias is zeroed only in the constructor
    model = build_meta_model(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    initialize_random(model, config, seed=0)
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert torch.equal(model.lm_head.bias, torch.zeros_like(model.lm_head.bias))


def test_a_position_limit_refuses_longer_sequences_and_a_negative_one_means_none():
    """XLNet's config says max_position_embeddings=-1: relative positions, no limit."""
    xlnet = hf_config(["model=tiny", "model.arch=xlnet"])
    assert xlnet.max_position_embeddings == -1 and architecture(xlnet).position_problems(xlnet, 4096) == []
    llama = hf_config(["model=tiny", "model.arch=llama", "model.config.max_position_embeddings=64"])
    assert architecture(llama).position_problems(llama, 128) == ["data.seq_len=128 exceeds model.config.max_position_embeddings=64"]
