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


@pytest.mark.parametrize(
    "name, sizes",
    [("tp1dp1cp1", (1, 1, 1)), ("tp2dp4cp2", (2, 4, 2)), ("tp3dp5cp7", (3, 5, 7)), ("tp16dp12cp1", (16, 12, 1)),
     ("dp8", (1, 8, 1)), ("tp2cp2", (2, -1, 2)), ("tp4", (4, -1, 1)), ("cp8", (1, -1, 8)), ("default", (1, -1, 1))],
)
def test_any_layout_by_name(name, sizes):
    """No file per layout: a name gives tp, dp, cp (left out: tp and cp 1, dp -1, filling the world)."""
    config = to_object(compose([f"parallel={name}"]))
    assert (config.parallel.tp, config.parallel.dp, config.parallel.cp) == sizes
    assert not (conf_dir() / "parallel" / f"{name}.yaml").exists() or name == "default"


def test_layout_names_work_in_a_recipe_and_lose_to_a_later_override():
    config = to_object(compose(["+recipe=tiny_llama_3d", "parallel=tp4dp2"]))
    assert (config.parallel.tp, config.parallel.dp, config.parallel.cp) == (4, 2, 1)
    config = to_object(compose(["parallel=tp4dp2", "parallel.cp=2"]))
    assert (config.parallel.tp, config.parallel.dp, config.parallel.cp) == (4, 2, 2)


@pytest.mark.parametrize("name", ["tp2dp4cp", "tp0dp2", "cp2tp2", "tp2dp02", "tpdp", "dp-1", "tp2x"])
def test_a_malformed_layout_name_is_one_line_with_the_grammar(name):
    with pytest.raises(ConfigError) as error:
        compose([f"parallel={name}"])
    (line,) = error.value.problems
    assert line.startswith(f"parallel={name}: no such preset or layout name; layouts are named tp{{T}}dp{{D}}cp{{C}}")
    assert "or a preset: default" in line


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
    assert first == compose(["model=tiny_opt", "train.seed=3", "data.cache_dir=/tmp/shared-cache", "data.tokenize_workers=4"]).run.dir
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


def user_config_dir(root):
    """A user's directory: a new model preset, one replacing a shipped preset, a new group option, a recipe."""
    (root / "model").mkdir(parents=True)
    (root / "parallel").mkdir()
    (root / "recipe").mkdir()
    (root / "model" / "user_llama.yaml").write_text("# mine\nname: user_llama\narch: llama\nconfig:\n  num_hidden_layers: 3\n  hidden_size: 32\n  num_attention_heads: 4\n  num_key_value_heads: 2\n  intermediate_size: 64\n  vocab_size: 264\n")
    (root / "model" / "tiny_opt.yaml").write_text("name: my_tiny_opt\narch: llama\nconfig:\n  num_hidden_layers: 1\n")
    (root / "parallel" / "wide.yaml").write_text("# all data-parallel, 4 ranks\ndp: 4\n")
    (root / "recipe" / "user_run.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: user_llama\n  - override /parallel: tp2\ntrain:\n  steps: 7\n"
    )
    return root


def test_config_dir_adds_presets_and_recipes_in_front_of_p3ds(tmp_path):
    mine = user_config_dir(tmp_path / "mine")
    config = to_object(compose(["+recipe=user_run"], [mine]))
    assert (config.model.name, config.model.config["num_hidden_layers"], config.parallel.tp, config.train.steps) == ("user_llama", 3, 2, 7)
    assert to_object(compose(["model=tiny_opt"], [mine])).model.name == "my_tiny_opt"  # the user's file wins
    assert to_object(compose(["model=tiny_opt"])).model.name == "tiny_opt"  # and only where given
    assert to_object(compose(["parallel=wide"], [mine])).parallel.dp == 4
    assert to_object(compose(["parallel=tp2dp2"], [mine])).parallel.tp == 2  # layout names still work
    assert to_object(compose(["+recipe=tiny_llama_3d"], [mine])).train.steps == 40  # shipped recipes too


def test_a_missing_config_dir_or_preset_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config-dir .*nope: no such directory"):
        compose([], [tmp_path / "nope"])
    mine = user_config_dir(tmp_path / "mine")
    with pytest.raises(ConfigError) as error:
        compose(["model=gpt5"], [mine])
    (line,) = error.value.problems
    available = line.split("(available: ")[1].split(")")[0].split(", ")
    assert {"opt1.3b", "tiny_llama", "tiny_opt", "user_llama"} <= set(available) and available == sorted(available)  # the user's preset among p3d's
    assert line.startswith("model=gpt5: no such preset in group 'model' (available: ")
    assert line.endswith("); or write DIR/model/gpt5.yaml and pass --config-dir DIR")
