"""`p3d train` derives its process count from the parallel.* keys and says what it chose."""

from __future__ import annotations

import pytest

from p3d import cli
from p3d.config.compose import compose, to_object
from p3d.errors import ConfigError


def chosen(overrides: list[str], nnodes: str = "1") -> tuple[int, str]:
    return cli.processes_per_node(to_object(compose(overrides)), nnodes)


@pytest.mark.parametrize(
    "overrides, nnodes, count",
    [
        (["parallel.tp=2"], "1", 2),  # dp=-1 on CPU: tp*cp
        (["parallel=tp2cp2"], "1", 4),
        (["parallel=default"], "1", 1),
        (["parallel=dp8"], "1", 8),
        (["parallel=tp2dp2cp2"], "1", 8),
        (["parallel=tp2dp4cp2"], "2", 8),  # dp*cp*tp over the nodes
        (["parallel.tp=2"], "2", 2),  # dp=-1 on CPU: tp*cp per node, dp = nodes
        (["parallel.dp_replicate=2"], "1", 2),  # dp=-1 on CPU: tp*cp*dp_replicate
        (["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.tp=2"], "1", 8),  # dp = dp_replicate*dp_shard
    ],
)
def test_process_count_on_cpu(overrides, nnodes, count):
    number, reason = chosen(overrides, nnodes)
    assert number == count
    assert "--nproc-per-node" in reason


def test_the_reason_names_the_layout():
    assert chosen(["parallel.tp=2"])[1] == (
        "parallel.dp=-1 on CPU takes tp2 x cp1 = 2 per node, dp 1 (--nproc-per-node N for more data-parallel ranks)"
    )
    assert chosen(["parallel=tp2dp4cp2"], "2")[1] == "parallel tp2 x dp4 x cp2 = 16 ranks over 2 nodes (--nproc-per-node N to choose)"


def test_a_layout_that_does_not_split_over_the_nodes_is_refused():
    with pytest.raises(ConfigError, match=r"parallel.dp\*parallel.cp\*parallel.tp=6 ranks do not split evenly over --nnodes 4"):
        chosen(["parallel=tp2dp3"], "4")


@pytest.fixture
def gpu_machine(monkeypatch):
    """A node with 8 GPUs, as the launcher sees it."""
    import torch

    import p3d.distributed.env as env

    monkeypatch.setattr(env, "resolve_device_type", lambda requested: "cuda")
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 8)


def test_dp_minus_one_fills_the_node_on_gpus(gpu_machine):
    assert chosen(["parallel.tp=2"]) == (8, "parallel.dp=-1 fills this node's 8 cuda devices (tp2 x cp1, dp 4; --nproc-per-node N to choose)")
    assert chosen(["parallel=tp2cp2"], "2")[0] == 8
    assert chosen(["parallel=dp4"])[0] == 4  # a fixed dp is never filled up


def test_gpus_that_do_not_fit_the_model_ranks_are_refused(gpu_machine):
    with pytest.raises(ConfigError, match=r"this node's 8 cuda devices are not a multiple of parallel.tp\*parallel.cp=3"):
        chosen(["parallel.tp=3"])
