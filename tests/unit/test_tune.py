"""`p3d tune`: the layouts it tries, which of them validate and fit (asked of validate and p3d plan),
the order of the measured runs, and how they rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import p3d.plan
from p3d import cli
from p3d.errors import ConfigError
from p3d.sweep import JobResult
from p3d.tune import Candidate, candidates, check, check_node, format_ranking, layout_splits, layouts_to_try, ranking, schedule, steady_rates, tune


def test_every_split_of_the_world_over_tp_cp_and_dp():
    splits = list(layout_splits(8))
    assert len(splits) == 10 and {"tp": 2, "dp": 2, "cp": 2} in splits and {"tp": 8, "dp": 1, "cp": 1} in splits
    assert all(s["tp"] * s["dp"] * s["cp"] == 8 for s in splits)
    assert len(list(layout_splits(12))) == 18


def test_the_command_can_fix_some_sizes_but_not_the_whole_layout():
    assert layouts_to_try(["parallel.tp=2"], 8) == [{"tp": 2, "dp": 4, "cp": 1}, {"tp": 2, "dp": 2, "cp": 2}, {"tp": 2, "dp": 1, "cp": 4}]
    assert layouts_to_try(["parallel.tp=2", "parallel.cp=2"], 8) == [{"tp": 2, "dp": 2, "cp": 2}]
    assert len(layouts_to_try(["parallel.dp=-1"], 8)) == 10  # dp filling the world is what every split does
    with pytest.raises(ConfigError, match="parallel=tp2: p3d tune chooses the layout"):
        layouts_to_try(["parallel=tp2"], 8)
    with pytest.raises(ConfigError, match=r"parallel.tp=3: no split of --world-size 8 ranks"):
        layouts_to_try(["parallel.tp=3"], 8)


def test_a_candidate_must_validate_and_fit_by_p3d_plans_estimate(monkeypatch):
    heads = Candidate({"tp": 8, "dp": 1, "cp": 1}, "none")
    check(heads, ["model=tiny_llama"], [], 8)
    assert heads.problem == "does not validate: parallel.tp=8 does not divide model.config.num_key_value_heads=4: choose a tp that divides it"
    good = Candidate({"tp": 2, "dp": 2, "cp": 2}, "none")
    check(good, ["model=tiny_llama", "parallel.tp=4"], [], 8)  # the command's own layout keys give way to the candidate's
    assert good.problem is None and good.memory_gb > 0.4 and good.fit.endswith(" GB")
    monkeypatch.setattr(p3d.plan, "machine_memory_gb", lambda: 1.0)
    small_machine = Candidate({"tp": 2, "dp": 2, "cp": 2}, "none")
    check(small_machine, ["model=tiny_llama"], [], 8)
    assert small_machine.problem.startswith("does not fit: 8 ranks on this machine need about 3.") and small_machine.problem.endswith(", 1.0 GB here")


def test_activation_checkpointing_is_tried_only_where_a_layout_does_not_fit_without_it(monkeypatch):
    long = ["model=tiny_llama", "data.seq_len=4096", "model.config.max_position_embeddings=4096", "parallel.tp=1", "parallel.cp=1"]
    (plain,) = candidates(long, 2)
    assert (plain.name, plain.ac, plain.problem) == ("dp2", "none", None)
    full = Candidate({"tp": 1, "dp": 2, "cp": 1}, "full")
    check(full, long, [], 2)
    assert full.memory_gb < plain.memory_gb
    fixed = candidates([*long, "train.activation_checkpointing=selective"], 2)
    assert [(c.ac, c.problem) for c in fixed] == [("selective", None)]
    between = (full.memory_gb + plain.memory_gb)  # two ranks: more than they need with AC, less than without
    monkeypatch.setattr(p3d.plan, "machine_memory_gb", lambda: between)
    tried = candidates(long, 2)
    assert [(c.ac, (c.problem or "runs").split(":")[0]) for c in tried] == [("none", "does not fit"), ("full", "runs")]


def test_rounds_alternate_their_order_so_a_change_in_load_reaches_every_layout():
    a, b, c = (Candidate({"tp": 1, "dp": n, "cp": 1}, "none") for n in (1, 2, 3))
    assert schedule([a, b, c], 3) == [(1, a), (1, b), (1, c), (2, c), (2, b), (2, a), (3, a), (3, b), (3, c)]


def _run(tmp_path, name: str, rates: list[float], status: str = "ok", error: str | None = None) -> JobResult:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"tokens_per_s": rate}) + "\n" for rate in rates))
    return JobResult(0, [], [], str(run_dir), status, 0 if status == "ok" else 3, error, final_loss=5.0, peak_mem_gb=0.4)


def test_ranked_by_the_median_tokens_per_s_of_every_rounds_steps_after_the_first(tmp_path):
    assert steady_rates(str(tmp_path / "nothing")) == []
    slow = Candidate({"tp": 1, "dp": 2, "cp": 1}, "none", runs=[_run(tmp_path, "s1", [10, 100, 110]), _run(tmp_path, "s2", [1, 120, 130])])
    fast = Candidate({"tp": 2, "dp": 1, "cp": 1}, "none", runs=[_run(tmp_path, "f1", [1, 200, 190]), _run(tmp_path, "f2", [1000, 150, 170])])
    failed = Candidate(
        {"tp": 1, "dp": 1, "cp": 2}, "none", runs=[_run(tmp_path, "x1", [1, 900, 900]), _run(tmp_path, "x2", [], "failed", "step 1: loss nan is not finite")]
    )
    assert slow.tokens_per_s == 115 and slow.round_medians == [105, 125]
    assert fast.tokens_per_s == 180 and failed.tokens_per_s is None  # a layout that failed a round is not ranked
    assert ranking([slow, failed, fast]) == [fast, slow]
    lines = format_ranking([slow, failed, fast], 3, 2).splitlines()
    assert lines[0].startswith("p3d: tune: ranked by tokens/s, the median of steps 2-3 over 2 rounds in alternating order; measured on this machine")
    assert lines[3].split()[:6] == ["1", "tp2dp1", "none", "180", "195", "/"] and lines[4].split()[:4] == ["2", "dp2", "none", "115"]
    assert lines[5].startswith("-     dp1cp2") and lines[5].endswith("failed (exit 3): step 1: loss nan is not finite")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model=tiny_llama"], "p3d tune needs --world-size N (the number of ranks to tune for)"),
        (["--world-size", "8", "--steps", "1"], "--steps 1: needs a whole number >= 2"),
        (["--world-size", "8", "--rounds", "x"], "--rounds x: needs a whole number >= 1"),
        (["parallel=tp2dp2cp2", "--world-size", "8"], "parallel=tp2dp2cp2: p3d tune chooses the layout"),
        (["-m", "--world-size", "8"], "-m/--multirun: p3d tune runs its own sweep over the layouts"),
    ],
)
def test_bad_tune_commands_are_one_line_and_exit_2(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"p3d: error: {expected}") and len(err.splitlines()) == 1, err


def test_on_accelerators_the_world_must_fit_this_nodes_devices(monkeypatch):
    import torch

    import p3d.distributed.env as env

    monkeypatch.setattr(env, "resolve_device_type", lambda requested: "cuda")
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match=r"--world-size 8: p3d tune runs every layout on this node, which has 4 cuda devices"):
        check_node(["model=tiny_llama"], [], 8)
    check_node(["model=tiny_llama"], [], 4)


def test_a_stopped_tuner_ranks_what_it_measured_and_exits_1(tmp_path, monkeypatch, capsys):
    """tune() itself, its p3d train jobs replaced: the first layout measured, then SIGINT during the second."""
    import p3d.tune

    def first_job_then_stopped(jobs, launcher_args, config_dirs, tune_dir):
        assert [job.swept for job in jobs] == [[*layout, "(round 1)"] for layout in (["parallel=dp2", "train.activation_checkpointing=none"], ["parallel=dp1cp2", "train.activation_checkpointing=none"])]
        Path(jobs[0].run_dir).mkdir(parents=True)
        (Path(jobs[0].run_dir) / "metrics.jsonl").write_text("".join(json.dumps({"tokens_per_s": r}) + "\n" for r in (5, 50, 70)))
        jobs[0].status, jobs[0].exit_code, jobs[0].final_loss = "ok", 0, 5.5
        jobs[1].status, jobs[1].exit_code, jobs[1].error = "interrupted", 130, "exited with code 130"

    monkeypatch.setattr(p3d.tune, "run_in_turn", first_job_then_stopped)
    code = tune(["model=tiny_llama", "parallel.tp=1", f"run.root={tmp_path}"], 2, steps=3, rounds=1)
    out, err = capsys.readouterr()
    assert code == 1 and err == ""
    rows = out.split("rank  layout      AC    tokens/s  per round         peak mem/rank  final loss  status\n")[1].splitlines()
    assert rows[0].split() == ["1", "dp2", "none", "60", "60", "n/a", "5.5000", "ok"]
    assert rows[1].split()[:4] == ["-", "dp1cp2", "none", "n/a"] and rows[1].endswith("interrupted (exit 130): exited with code 130")
    assert rows[2] == "p3d: tune: fastest of the layouts measured before the tuner was stopped: dp2 with activation checkpointing none; train with:"
    assert rows[3] == f"    p3d train model=tiny_llama run.root={tmp_path} parallel=dp2 train.activation_checkpointing=none"
    (tune_dir,) = (tmp_path / "tune").iterdir()
    assert [entry["status"] for entry in json.loads((tune_dir / "tune.json").read_text())] == ["ok", "interrupted (exit 130): exited with code 130"]
