"""Hydra's flags as p3d honours them: --cfg, --resolve, --package, --info, --help print and exit;
--config-dir is parsed in every entry point; the flags p3d does not honour are one line each."""

from __future__ import annotations

import pytest
import yaml

from p3d import cli
from p3d import train as train_module
from p3d.config.compose import compose
from p3d.config.flags import HydraFlags, split_hydra_flags
from p3d.errors import ConfigError


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def printed(capsys, entry, args) -> str:
    entry(args)
    out, err = capsys.readouterr()
    assert err == ""
    return out


@pytest.mark.parametrize("entry", [cli.train_command, train_module.main], ids=["p3d train", "python -m p3d.train"])
def test_cfg_job_prints_the_composed_config(entry, capsys):
    out = printed(capsys, entry, ["--cfg", "job", "parallel=tp2dp2cp2", "optim.lr=3e-4", "model=tiny_opt"])
    config = yaml.safe_load(out)
    assert config["parallel"]["tp"] == 2 and config["parallel"]["cp"] == 2 and config["optim"]["lr"] == 3e-4
    assert config["model"]["name"] == "tiny_opt" and config["run"]["dir"].startswith("runs/tiny_opt-")
    assert "hydra" not in config and "p3d: starting" not in out  # nothing launched


def test_cfg_package_and_all_and_hydra(capsys):
    out = printed(capsys, cli.train_command, ["--cfg", "job", "--package", "parallel", "parallel=tp2cp2"])
    assert out.splitlines()[0] == "# @package parallel"
    assert yaml.safe_load(out) == {
        "dp": -1, "dp_replicate": 1, "dp_shard": -1, "reshard_after_forward": True, "backward_prefetch": True, "grad_sync": "auto",
        "cp": 2, "tp": 2, "ep": 1, "cp_layout": "balanced", "cp_impl": "auto", "sequence_parallel": False, "vocab_parallel": False,
    }
    both = yaml.safe_load(printed(capsys, cli.train_command, ["--cfg", "all"]))
    assert {"hydra", "model", "parallel", "train"} <= set(both)
    unresolved = printed(capsys, cli.train_command, ["--cfg", "hydra", "-p", "hydra.run"])
    resolved = printed(capsys, cli.train_command, ["--cfg", "hydra", "-p", "hydra.run", "--resolve"])
    assert "${now:" in unresolved and "${" not in resolved


def test_info_and_help(capsys):
    info = printed(capsys, cli.train_command, ["--info", "parallel=tp2"])
    for part in ("Config search path", "p3d layouts", "Defaults List", "parallel/tp2", "Config"):
        assert part in info, info
    assert "Config search path" in printed(capsys, cli.plan_command, ["--info", "searchpath", "--world-size", "4"])
    compose([])  # Hydra's logging, configured by --info, is undone: composing later in the process prints nothing
    assert capsys.readouterr() == ("", "")
    helped = printed(capsys, cli.train_command, ["--help", "train.steps=7"])
    assert "== Configuration groups ==" in helped and "parallel: default, or any layout by name tp{T}dp{D}cp{C}" in helped
    assert "+recipe: opt1.3b_bf16_3d, opt1.3b_cpu_smoke, tiny_llama_3d" in helped
    assert yaml.safe_load(helped.split("Override anything in the config (foo.bar=value)\n")[1])["train"]["steps"] == 7


def test_other_ranks_print_nothing(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert printed(capsys, train_module.main, ["--cfg", "job"]) == ""


def test_flags_are_parsed_in_every_form():
    flags, rest = split_hydra_flags(["-cd", "a", "--config-dir=b", "--cfg=all", "--resolve", "-p", "model", "x=1", "--nnodes", "2", "-m", "y=2"])
    assert flags == HydraFlags(config_dirs=["a", "b"], cfg="all", resolve=True, package="model", multirun=True)
    assert rest == ["x=1", "--nnodes", "2", "y=2"]
    assert split_hydra_flags(["--info"])[0].info == "all"
    assert split_hydra_flags(["-i", "defaults", "x=1"]) == (HydraFlags(info="defaults"), ["x=1"])
    assert split_hydra_flags(["--config-dir", "d"])[0].config_dir_args() == ["--config-dir", "d"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config-path", "x"], "--config-path: p3d does not take this Hydra flag; --config-dir DIR adds your groups"),
        (["-cn", "x"], "-cn: p3d does not take this Hydra flag; write your experiment as DIR/recipe/NAME.yaml"),
        (["--hydra-help"], "--hydra-help: p3d does not take this Hydra flag"),
        (["--cfg", "yaml"], "--cfg yaml: one of job, all, hydra"),
        (["--info=everything"], "--info everything: one of all, config, defaults"),
        (["--resolve"], "--resolve: goes with --cfg job|all|hydra"),
        (["--config-dir"], "--config-dir: needs a value (a directory)"),
    ],
)
def test_flags_p3d_does_not_honour_are_one_line(args, message):
    with pytest.raises(ConfigError) as error:
        split_hydra_flags(args)
    (line,) = error.value.problems
    assert line.startswith(message), line


def test_multirun_inside_a_worker_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["-m", "optim.lr=1e-3,3e-4"])
    assert exit_info.value.code == 2
