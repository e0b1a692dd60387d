"""Model build: layout-independent random init, and loading real checkpoints shard by shard."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from p3d.config.compose import compose, to_object
from p3d.errors import ConfigError
from p3d.model import build_hf_config, build_meta_model, materialize


def built(overrides, seed=0):
    config = to_object(compose(overrides))
    hf_config = build_hf_config(config.model)
    model = build_meta_model(hf_config)
    materialize(model, config.model, hf_config, seed, torch.device("cpu"))
    return model


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_opt"])
def test_random_init_is_deterministic_and_follows_the_model_init(preset):
    first, second = built([f"model={preset}"]), built([f"model={preset}"])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    other = built([f"model={preset}"], seed=1)
    assert not torch.equal(first.get_input_embeddings().weight, other.get_input_embeddings().weight)
    for name, param in first.named_parameters():
        if "norm" in name and name.endswith("weight"):
            assert torch.all(param == 1), name
        if name.endswith("bias"):
            assert torch.all(param == 0), name
    weight = first.get_input_embeddings().weight
    assert 0.01 < weight.std().item() < 0.03


def test_tied_embeddings_stay_tied():
    model = built(["model=tiny_opt"])
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_a_composite_model_keeps_the_head_tie_its_top_level_config_asks_for():
    # MOSS-Transcribe-Diarize ties lm_head to its language model's embedding by the top-level config;
    # its text config says tie_word_embeddings=False. An untied copy trained differently on one
    # process than under FSDP (which keeps the meta model's tie): losses 1e-1 apart.
    model = built(["model=tiny", "model.arch=moss_transcribe_diarize"])
    assert model.lm_head.weight is model.get_input_embeddings().weight
    untied = built(["model=tiny", "model.arch=qwen3"])
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight


def test_rotary_buffers_are_computed():
    model = built(["model=tiny_llama"])
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.isfinite(inv_freq).all() and inv_freq[0] == 1.0


def save_sharded(tmp_path, preset):
    """A tiny model saved by transformers as several safetensors shards."""
    reference = built([f"model={preset}"], seed=7)
    out = tmp_path / preset
    reference.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_opt"])
def test_pretrained_load_matches_transformers(tmp_path, preset):
    path = save_sharded(tmp_path, preset)
    ours = built([f"model={preset}", "model.init=pretrained", f"model.pretrained={path}"])
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.allclose(ours(tokens).logits, theirs(tokens).logits, atol=1e-6)


def test_a_config_that_changes_a_checkpoints_shapes_is_refused_naming_the_key(tmp_path):
    path = save_sharded(tmp_path, "tiny_llama")
    with pytest.raises(ConfigError) as error:
        built(["model=tiny_llama", "model.init=pretrained", f"model.pretrained={path}", "model.config.intermediate_size=64", "model.config.rms_norm_eps=0.001"])
    (problem,) = error.value.problems
    assert problem.startswith("model.config.intermediate_size=64 (config.json: 128): would change the shapes of model.pretrained=")


def test_weights_that_disagree_with_their_config_json_are_a_clear_error(tmp_path):
    path = save_sharded(tmp_path, "tiny_llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ConfigError, match="has shape"):
        built(["model=hf", f"model.pretrained={path}"])


def test_pretrained_missing_weights_are_listed(tmp_path):
    path = save_sharded(tmp_path, "tiny_llama")
    ours = build_hf_config(to_object(compose(["model.init=pretrained", f"model.pretrained={path}"])).model)
    ours.num_hidden_layers = 3  # the checkpoint has 2 layers
    model = build_meta_model(ours)
    config = to_object(compose(["model.init=pretrained", f"model.pretrained={path}"]))
    with pytest.raises(ConfigError, match="checkpoint lacks .* weights: model.layers.2"):
        materialize(model, config.model, ours, 0, torch.device("cpu"))


def test_pretrained_missing_directory():
    with pytest.raises(ConfigError, match="model.pretrained=./nowhere: no such directory"):
        build_hf_config(to_object(compose(["model.init=pretrained", "model.pretrained=./nowhere"])).model)


def test_flops_per_token_count_only_the_experts_a_token_is_routed_to():
    from p3d.metrics import matmul_params
    from p3d.model import build_hf_config, build_meta_model
    from p3d.config.schema import ModelConfig

    model = build_meta_model(build_hf_config(ModelConfig(arch="mixtral", tiny=True)))
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    embedding = model.get_input_embeddings().weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - experts - embedding
    assert matmul_params(model) == dense + experts * 2 / 4  # 2 of 4 experts per token


def test_flops_per_token_of_a_config_that_names_its_layers_otherwise():
    """BLT's config has no num_hidden_layers: the attention term counts the model's decoder blocks instead of
    failing the run."""
    from transformers import PretrainedConfig

    from p3d.config.schema import ModelConfig
    from p3d.metrics import flops_per_token, matmul_params
    from p3d.model import build_hf_config, build_meta_model

    model = build_meta_model(build_hf_config(ModelConfig(arch="llama", tiny=True)))
    unnamed = PretrainedConfig()  # neither num_hidden_layers nor hidden_size
    assert flops_per_token(model, unnamed, 32) == 6 * matmul_params(model) + 12 * 2 * 64 * 32
