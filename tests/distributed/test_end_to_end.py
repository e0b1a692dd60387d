"""The mission command, resume after a crash, and what a user sees on bad input."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import FAST, _env, assert_ok, hooks_env, run_command, run_p3d
from tests.distributed.test_checkpoint import SAME_LAYOUT, assert_same_losses

HELPERS = Path(__file__).parent / "helpers"

MISSION = ["parallel=tp2dp2cp2", "train.steps=20"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_mission_command_trains_and_a_rerun_resumes(model, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "-m", "p3d.train", *MISSION, f"model={model}"]
    done = run_command(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [path for path in (tmp_path / "runs").iterdir() if path.name != "data-cache"]  # runs/data-cache: the token cache
    assert run_dir.name.startswith(f"{model}-")
    assert (run_dir / "config.yaml").exists()
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, [r["loss"] for r in records]
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "peak_mem_gb"):
        assert key in records[0]
    assert (run_dir / "checkpoints" / "step_00000010" / "p3d_complete.json").exists()
    assert (run_dir / "checkpoints" / "step_00000020" / "p3d_complete.json").exists()
    again = run_command(command, cwd=tmp_path)
    assert again.returncode == 0
    assert "resumed from" in again.stdout and "already trained to step 20" in again.stdout


@pytest.mark.slow
def test_run_stopped_after_checkpoint_resumes_with_identical_losses(tmp_path):
    overrides = ["parallel=tp2dp2cp2", "train.steps=20", "checkpoint.every=10", "checkpoint.at_end=false", "data.seq_len=64"]
    interrupted = run_p3d(tmp_path / "interrupted", overrides, nproc=8, env=hooks_env("fail_after_step=10", fault_rank=5))
    assert interrupted.returncode != 0
    assert [r["step"] for r in interrupted.records] == list(range(1, 11))
    resumed = run_p3d(tmp_path / "interrupted", overrides, nproc=8)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "(step 10," in resumed.stdout
    assert [r["step"] for r in resumed.records] == list(range(1, 21))
    uninterrupted = run_p3d(tmp_path / "uninterrupted", overrides, nproc=8)
    assert_ok(uninterrupted)
    assert_same_losses(resumed.records, uninterrupted.records, **SAME_LAYOUT)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


BAD_INPUTS = {
    "world size": (["parallel=tp2dp2cp2", "--nproc-per-node", "6"], "parallel.dp*parallel.cp*parallel.tp"),
    "tp vs heads": (["parallel=tp4dp1cp1", "model.config.hidden_size=96", "model.config.num_attention_heads=6", "model.config.num_key_value_heads=6"], "model.config.num_attention_heads=6"),
    "config transformers refuses": (["model.config.num_attention_heads=6", "model.config.num_key_value_heads=6"], "model.config.num_attention_heads=6"),
    "seq_len vs cp": (["parallel=tp1dp1cp2", "data.seq_len=30"], "data.seq_len=30"),
    "missing data": (["data.path=./missing/corpus.jsonl"], "data.path=./missing/corpus.jsonl"),
    "unknown model": (["model=gpt5"], "model=gpt5"),
    "unknown key": (["train.stepz=3"], "train.stepz"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_key(case, tmp_path):
    args, key = BAD_INPUTS[case]
    started = children_cpu_s()
    done = run_command([sys.executable, "-m", "p3d.cli", "train", *args], cwd=tmp_path)
    assert done.returncode != 0
    assert children_cpu_s() - started < 30  # refused before any worker starts (CPU time: wall time counts other jobs)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("p3d: error: ") and key in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists()  # nothing written before validation passed


def test_bad_input_under_plain_torchrun_prints_the_line_once(tmp_path):
    done = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "p3d.train", "parallel=tp2dp2cp2"], cwd=tmp_path)
    assert done.returncode != 0
    p3d_lines = [line for line in done.stderr.splitlines() if line.startswith("p3d: error:")]
    assert len(p3d_lines) == 1 and "world size is 2" in p3d_lines[0]


def test_single_process_bad_input_has_no_traceback(tmp_path):
    done = run_command([sys.executable, "-m", "p3d.train", *FAST, "data.seq_len=0"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "p3d: error: data.seq_len=0: must be >= 1"


def processes_in_group(group: int) -> list[int]:
    """Live processes whose process group is `group` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_run_forked_by_the_tests_zygote_ends_as_the_script_would(tmp_path):
    """run_p3d's runs are children of tests/zygote.py: the same exit code and output as `python -m p3d.train`,
    and a run past its timeout is killed with its ranks."""
    fresh = run_command([sys.executable, "-m", "p3d.train", *FAST, "data.seq_len=0", f"run.dir={tmp_path / 'fresh'}"], cwd=tmp_path)
    forked = run_p3d(tmp_path / "forked", [*FAST, "data.seq_len=0"])
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr) == (2, "", "p3d: error: data.seq_len=0: must be >= 1\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_p3d(tmp_path / "slow", ["train.steps=100000", "checkpoint=none"], nproc=2, timeout=5)
    deadline = time.monotonic() + 30  # SIGKILL is delivered asynchronously: ranks may take a moment to go
    while processes_in_group(conftest._zygote.last_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in_group(conftest._zygote.last_pid) == []
    assert run_p3d(tmp_path / "after", FAST).returncode == 0  # the zygote serves the next run


def test_debug_mode_shows_the_traceback(tmp_path):
    done = run_command([sys.executable, "-m", "p3d.train", "data.seq_len=0"], cwd=tmp_path, env={"P3D_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_p3d_train_launches_the_layout_it_is_given(tmp_path):
    done = run_command([sys.executable, "-m", "p3d.cli", "train", "parallel=tp1dp2cp1", *FAST, f"run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dp=2 cp=1 tp=1 (world 2)" in done.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_exit_after_shutdown_cannot_abort_on_a_collective_still_held_by_gloo(tmp_path):
    """helpers/exit_check.py replays, deterministically, the random SIGABRT at exit of ring-CP runs: a gloo
    worker that outlives shutdown() frees a Python tensor while the interpreter finalizes (std::terminate)."""
    port = free_port()
    ranks = []
    for rank in (1, 0):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, str(HELPERS / "exit_check.py")], cwd=tmp_path, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rank1, rank0 = ranks
    stdout, stderr = rank0.communicate(timeout=300)
    rank1.communicate(timeout=60)
    assert "terminate called" not in stderr, stderr
    assert rank0.returncode == 0, stderr[-3000:]
    assert "gloo threads after shutdown: 0" in stdout, stdout
