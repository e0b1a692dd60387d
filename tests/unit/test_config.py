"""Composition: presets, overrides, typed schema errors, run directory ids."""

from __future__ import annotations

import pytest

from p3d.config.compose import compose, conf_dir, run_id, to_object
from p3d.config.schema import CPLayout, InitMode
from p3d.errors import ConfigError
from p3d.model import build_hf_config, build_meta_model


def test_defaults_compose_to_a_typed_config():
    config = to_object(compose())
    assert config.model.name == "tiny_llama"
    assert config.model.init is InitMode.random
    assert config.parallel.dp == -1 and config.parallel.cp == 1 and config.parallel.tp == 1
    assert config.parallel.cp_layout is CPLayout.balanced
    assert config.data.path is None


@pytest.mark.parametrize("preset", ["tp1dp1cp1", "tp2dp2cp2", "tp2dp1cp4", "tp1dp2cp4"])
def test_parallel_presets_set_their_sizes(preset):
    config = to_object(compose([f"parallel={preset}"]))
    digits = [int(c) for c in preset if c.isdigit()]
    assert (config.parallel.tp, config.parallel.dp, config.parallel.cp) == tuple(digits)


def test_every_parallel_preset_matches_its_name():
    for path in (conf_dir() / "parallel").glob("tp*dp*cp*.yaml"):
        config = to_object(compose([f"parallel={path.stem}"]))
        assert path.stem == f"tp{config.parallel.tp}dp{config.parallel.dp}cp{config.parallel.cp}"


def test_model_config_override_changes_the_model():
    config = to_object(compose(["model.config.num_hidden_layers=3"]))
    model = build_meta_model(build_hf_config(config.model))
    assert len(model.model.layers) == 3
    default = build_meta_model(build_hf_config(to_object(compose()).model))
    assert len(default.model.layers) == 2


@pytest.mark.parametrize("overrides", [[], ["model.config.hidden_size=256", "model.config.num_attention_heads=8"]])
def test_derived_fields_follow_the_given_sizes(overrides):
    """Llama derives head_dim from hidden_size / num_attention_heads: never the class default's 128."""
    config = build_hf_config(to_object(compose(["model=tiny_llama", *overrides])).model)
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    model = build_meta_model(config)
    assert model.model.layers[0].self_attn.q_proj.out_features == config.hidden_size


def test_model_config_override_may_name_a_field_absent_from_the_preset():
    config = to_object(compose(["model.config.rms_norm_eps=0.001"]))
    assert build_hf_config(config.model).rms_norm_eps == 0.001


def test_unknown_hf_config_field_is_an_error_naming_it():
    config = to_object(compose(["model.config.num_hiden_layers=3"]))
    with pytest.raises(ConfigError, match=r"model\.config\.num_hiden_layers"):
        build_hf_config(config.model)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("parallel.cp_layout=diagonal", "parallel.cp_layout"),
        ("model.init=magic", "model.init"),
        ("model=nope", "model=nope"),
        ("+recipe=nope", "recipe=nope"),
    ],
)
def test_bad_overrides_fail_at_compose_time_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        compose([override])
    assert len(error.value.problems) == 1
    assert key in error.value.problems[0]
    assert "\n" not in error.value.problems[0]


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*opt1.3b, .*tiny, tiny_llama, tiny_opt"):
        compose(["model=nope"])


def test_recipe_selects_presets_and_keys():
    config = to_object(compose(["+recipe=tiny_llama_3d"]))
    assert (config.parallel.tp, config.parallel.dp, config.parallel.cp) == (2, 2, 2)
    assert config.train.steps == 40 and config.data.seq_len == 256


def test_command_line_overrides_win_over_recipes():
    config = to_object(compose(["+recipe=tiny_llama_3d", "train.steps=7"]))
    assert config.train.steps == 7


def test_run_dir_is_shared_by_identical_commands_and_ignores_layout():
    first = compose(["model=tiny_opt", "train.seed=3"]).run.dir
    assert first == compose(["model=tiny_opt", "train.seed=3"]).run.dir
    assert first == compose(["train.seed=3", "model=tiny_opt", "parallel=tp2dp2cp2", "train.steps=99"]).run.dir
    assert first != compose(["model=tiny_opt", "train.seed=4"]).run.dir
    assert first.startswith("runs/tiny_opt-")


def test_run_id_depends_only_on_overrides():
    assert run_id(["a=1", "b=2"]) == run_id(["b=2", "a=1"])
    assert run_id(["a=1"]) != run_id(["a=2"])


def test_explicit_run_dir_is_kept():
    assert compose(["run.dir=/tmp/somewhere"]).run.dir == "/tmp/somewhere"


def test_hydra_flags_are_refused():
    with pytest.raises(ConfigError, match="--multirun"):
        compose(["--multirun"])
