"""What users see: metrics fields, TensorBoard and W&B (offline) sinks, the progress bar on a terminal only."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import termios
import select
import subprocess
import sys
import time

from tests.conftest import FAST, _env, assert_ok, run_p3d

SHORT = [*FAST, "train.steps=3"]
SUMMARY_LINE = re.compile(
    r"^p3d: done: step (?P<step>\d+), (?P<steps_run>\d+) steps this run \| final loss (?P<loss>\S+) \| (?P<tokens_per_s>\S+) tok/s \| "
    r"peak mem per rank (?P<memory>\S+) GB(?: \((?P<job>\S+) GB summed over (?P<ranks>\d+) ranks\))? \| run dir (?P<run_dir>.+) \| checkpoint (?P<checkpoint>.+)$"
)


def test_main_layout_prints_no_warning_and_ends_with_the_summary_line(p3d_runner):
    """The README's layout (tp2dp2cp2 on tiny_llama): FSDP2 warned 24 times that a unit "returned a view tensor"
    (backward could fail or give wrong gradients); now no warning, and one summary line ends the run."""
    result = p3d_runner(["model=tiny_llama", "parallel=tp2dp2cp2", *SHORT, "checkpoint.at_end=true"], nproc=8)
    assert_ok(result)
    assert "returned a view tensor" not in result.stderr
    assert "Warning" not in result.stderr, result.stderr
    match = SUMMARY_LINE.match(result.stdout.splitlines()[-1])
    assert match, result.stdout[-2000:]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert int(match["step"]) == int(match["steps_run"]) == 3
    assert float(match["loss"]) == round(result.losses[-1], 4)
    assert float(match["tokens_per_s"].replace(",", "")) == round(summary["tokens_per_s"])
    peaks = summary["peak_mem_gb_per_rank"]
    assert len(peaks) == 8 and match["memory"] in (f"{max(peaks):.2f}", f"{min(peaks):.2f}-{max(peaks):.2f}")
    assert (match["job"], match["ranks"]) == (f"{sum(peaks):.2f}", "8")
    assert match["run_dir"] == str(result.run_dir)
    assert match["checkpoint"] == str(result.run_dir / "checkpoints" / "step_00000003") == summary["checkpoint"]

    again = run_p3d(result.run_dir, ["model=tiny_llama", *SHORT, "checkpoint.at_end=true", "checkpoint.resume=true"])
    assert_ok(again)
    assert "nothing to do" in again.stdout
    rerun = SUMMARY_LINE.match(again.stdout.splitlines()[-1])
    assert rerun and (rerun["step"], rerun["steps_run"], rerun["loss"]) == ("3", "0", "n/a"), again.stdout[-2000:]
    assert json.loads((result.run_dir / "summary.json").read_text()) == summary  # the training run's summary stays


def test_units_that_return_views_give_no_fsdp_warning(p3d_runner):
    """OPT's decoder layer returns a view (`(residual + hidden_states).view(shape)`): FSDP2 warned per
    layer and rank that an in-place op could drop its backward all-gather; its outputs are now
    tensors of their own, with the same losses."""
    result = p3d_runner(["model=tiny_opt", *SHORT, "parallel.dp=2", "parallel.tp=1", "parallel.cp=1"], nproc=2)
    assert_ok(result)
    assert "returned a view tensor" not in result.stderr, result.stderr[-2000:]


def test_metrics_records_carry_throughput_mfu_memory_and_data_wait(p3d_runner):
    result = p3d_runner([*SHORT, "logging.peak_tflops=0.5"])
    assert_ok(result)
    record = result.records[-1]
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "data_wait_frac"):
        assert record[key] is not None, key
    assert 0 < record["mfu"] < 1 and 0 <= record["data_wait_frac"] < 1
    assert record["tokens_per_s_per_device"] == record["tokens_per_s"]  # one device


def test_no_mfu_on_cpu_without_a_configured_peak(p3d_runner):
    result = p3d_runner(SHORT)
    assert_ok(result)
    assert result.records[-1]["mfu"] is None


def test_tensorboard_event_file_holds_the_scalars(p3d_runner):
    result = p3d_runner([*SHORT, "logging=tensorboard"])
    assert_ok(result)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (result.run_dir / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    assert len(losses) == 3 and abs(losses[0] - result.losses[0]) < 1e-5


def test_wandb_offline_run_is_written_without_network_or_key(p3d_runner):
    result = p3d_runner([*SHORT, "logging=wandb"])
    assert_ok(result)
    (run,) = (result.run_dir / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb"))
    output = result.stdout + result.stderr
    assert "api_key" not in output.lower() and "WANDB_API_KEY" not in output


def run_in_terminal(command: list[str], cwd, timeout: float = 120) -> str:
    """Run with stdout and stderr on a pseudo-terminal; return everything it wrote."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size
    process = subprocess.Popen(command, stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL, cwd=cwd, env=_env())
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                data = os.read(controller, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(controller)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_with_eta_on_a_terminal(tmp_path):
    output = run_in_terminal([sys.executable, "-m", "p3d.train", *SHORT, f"run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert "3/3" in output and "\r" in output
    assert "step/s" in output or "s/step" in output
    assert "<" in output  # tqdm's elapsed<remaining (ETA)
    assert "step     1/3 |" not in output  # no plain lines on a terminal


def test_plain_lines_and_no_bar_when_not_a_terminal(p3d_runner):
    result = p3d_runner(SHORT)
    assert_ok(result)
    assert "step     1/3 | loss" in result.stdout
    assert "\r" not in result.stdout and "s/step" not in result.stdout and "step/s" not in result.stdout
