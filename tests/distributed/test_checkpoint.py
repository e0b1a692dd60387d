"""Checkpoints that never lose work: exact resume on other layouts, killed and async saves,
SIGTERM, torchrun restarts, two nodes on loopback, Hugging Face export (all real processes on gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from p3d.checkpoint import COMPLETE_MARKER, checkpoint_problem, complete_checkpoints, verify_checkpoint
from p3d.config.compose import compose, to_object
from p3d.config.schema import Packing
from p3d.data import build_sampler, builtin_documents
from tests.conftest import HOOKRUN, _env, assert_ok, hooks_env, layout_overrides, run_command, run_p3d
from tests.distributed.test_parity import GRAD_NORM_TOLERANCE, TOLERANCE

P3D_TRAIN = [sys.executable, "-m", "p3d.cli", "train"]
P3D_TRAIN_WITH_HOOKS = [sys.executable, str(HOOKRUN), "--p3d-train"]  # `p3d train`, its workers with tests/hooks.py
# On the layout that saved, a resumed or restarted run repeats the same arithmetic: measured bitwise
# equal losses and gradient norms (difference 0) in every same-layout comparison here and in
# test_end_to_end. Another layout is held to the parity tests' tolerances (measured here: loss
# 9.5e-7, gradient norm 7.7e-7 relative, resuming tp2dp2cp2's checkpoint in one process).
SAME_LAYOUT = {"tolerance": 1e-6, "grad_norm_tolerance": 1e-6}


def assert_same_losses(records: list[dict], expected: list[dict], tolerance: float = TOLERANCE, grad_norm_tolerance: float = GRAD_NORM_TOLERANCE) -> None:
    """Per step: the same step numbers and learning rates, the loss within `tolerance`, the gradient norm
    within `grad_norm_tolerance` (relative)."""
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(records, expected))
    assert worst < tolerance, f"max |loss - expected| = {worst:.2e}\n{[r['loss'] for r in records]}\n{[r['loss'] for r in expected]}"
    worst = max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(records, expected))
    assert worst < grad_norm_tolerance, f"max |grad_norm / expected - 1| = {worst:.2e}\n{[(a['grad_norm'], b['grad_norm']) for a, b in zip(records, expected)]}"
    assert all(abs(a["lr"] - b["lr"]) < 1e-12 for a, b in zip(records, expected))


def one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


# --- resume on another layout -------------------------------------------------------------

RESUME = ["model=tiny_llama", "train.steps=20", "train.global_batch_size=8", "data.seq_len=32", "checkpoint.every=10"]
RESUME_LAYOUTS = {  # name: (tp, dp, cp, micro-batch)
    "tp2dp2cp2": (2, 2, 2, 1),  # the saving layout itself
    "dp4": (1, 4, 1, 2),
    "tp2cp2": (2, 1, 2, 4),  # two micro-batches per step
    "1 process": (1, 1, 1, 8),
}


@pytest.fixture(scope="module")
def uninterrupted_3d(tmp_path_factory):
    run = run_p3d(tmp_path_factory.mktemp("uninterrupted") / "run", [*RESUME, *layout_overrides(2, 2, 2), "train.micro_batch_size=1"], nproc=8)
    assert_ok(run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_checkpoint_of_tp2dp2cp2_resumes_on_any_layout_with_the_uninterrupted_losses(layout, uninterrupted_3d, tmp_path):
    tp, dp, cp, micro = RESUME_LAYOUTS[layout]
    checkpoint = uninterrupted_3d.run_dir / "checkpoints" / "step_00000010"
    overrides = [*RESUME, *layout_overrides(tp, dp, cp), f"train.micro_batch_size={micro}", f"checkpoint.load_from={checkpoint}"]
    resumed = run_p3d(tmp_path / "run", overrides, nproc=tp * dp * cp)
    assert_ok(resumed)
    assert f"resumed from {checkpoint} (step 10, 80 samples consumed)" in resumed.stdout
    assert ("re-seeded every rank" in resumed.stdout) == (layout != "tp2dp2cp2")
    assert json.loads((resumed.run_dir / "summary.json").read_text())["resume_load_s"] > 0
    assert_same_losses(resumed.records, uninterrupted_3d.records[10:], **(SAME_LAYOUT if layout == "tp2dp2cp2" else {}))


@pytest.mark.slow
def test_resume_comparison_detects_a_missing_optimizer_state(uninterrupted_3d, tmp_path):
    """Negative control: the one-process resume above, loading the weights but not the optimizer state."""
    checkpoint = uninterrupted_3d.run_dir / "checkpoints" / "step_00000010"
    overrides = [*RESUME, "train.micro_batch_size=8", f"checkpoint.load_from={checkpoint}"]
    resumed = run_p3d(tmp_path / "run", overrides, env=hooks_env("fresh_optimizer_on_resume"))
    assert_ok(resumed)
    with pytest.raises(AssertionError, match="loss"):
        assert_same_losses(resumed.records, uninterrupted_3d.records[10:])


# --- a save killed midway; async saves; SIGTERM ------------------------------------------

DP2_BASE = ["model=tiny_llama", "train.global_batch_size=8", "train.micro_batch_size=2", "data.seq_len=32", "parallel.dp=2"]
DP2 = [*DP2_BASE, "train.steps=10"]


def reference_run(tmp_path_factory, name: str, overrides: list[str], nproc: int):
    """An uninterrupted run without checkpoints: the losses an interrupted or restarted run must end with."""
    run = run_p3d(tmp_path_factory.mktemp(name) / "run", [*overrides, "checkpoint=none"], nproc=nproc)
    assert_ok(run)
    return run


@pytest.fixture(scope="module")
def dp2_reference(tmp_path_factory):
    return reference_run(tmp_path_factory, "dp2", DP2, nproc=2)


def damage_in_place(file: Path) -> None:
    """4 KB of random bytes written over the middle of `file`: its size stays the same."""
    with file.open("r+b") as stream:
        stream.seek(file.stat().st_size // 2)
        stream.write(os.urandom(4096))


@pytest.mark.slow
def test_a_killed_save_or_a_damaged_checkpoint_is_never_loaded(dp2_reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*DP2, "checkpoint.every=5"]
    killed = run_p3d(run_dir, overrides, nproc=2, env=hooks_env("kill_in_save=10", fault_rank=1))
    assert killed.returncode != 0 and "injected SIGKILL in the save of step 10 on rank 1" in killed.stderr
    checkpoints = run_dir / "checkpoints"
    half_written = checkpoints / "step_00000010"
    assert list(half_written.glob("*.distcp")) and not (half_written / COMPLETE_MARKER).exists()
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [5]

    named = run_command([*P3D_TRAIN, *overrides, f"run.dir={run_dir}", f"checkpoint.load_from={half_written}"], cwd=tmp_path)
    assert one_error_line(named).startswith(f"p3d: error: checkpoint.load_from={half_written}: incomplete checkpoint")
    corrupt = tmp_path / "copy" / "step_00000005"
    shutil.copytree(checkpoints / "step_00000005", corrupt)
    (corrupt / ".metadata").write_bytes(b"\x80 not a pickle")
    named = run_command([*P3D_TRAIN, *overrides, f"run.dir={tmp_path / 'fresh'}", f"checkpoint.load_from={corrupt}"], cwd=tmp_path)
    assert one_error_line(named).startswith(f"p3d: error: checkpoint.load_from={corrupt}: corrupt checkpoint")

    resumed = run_p3d(run_dir, overrides, nproc=2)
    assert_ok(resumed)
    assert f"resumed from {checkpoints / 'step_00000005'} (step 5," in resumed.stdout
    assert_same_losses(resumed.records, dp2_reference.records, **SAME_LAYOUT)
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [5, 10]

    # The newest checkpoint damaged in place (same size): never loaded, by export, load_from or resume.
    damage_in_place(checkpoints / "step_00000010" / "__1_0.distcp")
    exported = run_command([sys.executable, "-m", "p3d.cli", "export", str(run_dir), str(tmp_path / "exported")], cwd=tmp_path)
    assert one_error_line(exported) == (
        f"p3d: error: {run_dir}: its newest checkpoint step_00000010 cannot be used (corrupt checkpoint: __1_0.distcp does not "
        f"match the checksum recorded when it was saved (damaged since)); the newest intact checkpoint there is "
        f"{checkpoints / 'step_00000005'}: export that one by name"
    )
    one_process = [*DP2_BASE, "train.steps=10", "parallel.dp=1"]
    named = run_p3d(tmp_path / "fresh", [*one_process, f"checkpoint.load_from={checkpoints / 'step_00000010'}"])
    assert one_error_line(named).endswith(f"the newest intact one there is step_00000005: set checkpoint.load_from={checkpoints / 'step_00000005'}")
    fallen_back = run_p3d(run_dir, overrides, nproc=2)
    assert_ok(fallen_back)
    assert f"checkpoint {checkpoints / 'step_00000010'} is damaged and is not loaded: corrupt checkpoint: __1_0.distcp" in fallen_back.stdout
    assert f"resuming from the newest intact checkpoint {checkpoints / 'step_00000005'} instead: steps 6-10 are trained again" in fallen_back.stdout
    assert_same_losses(fallen_back.records, dp2_reference.records)
    assert verify_checkpoint(checkpoints / "step_00000010") is None  # saved again

    reshaped = run_command([*P3D_TRAIN, *overrides, f"run.dir={run_dir}", "model.config.num_hidden_layers=3"], cwd=tmp_path)
    line = one_error_line(reshaped)
    assert line.startswith("p3d: error: model.config.num_hidden_layers: 2 in checkpoint step_00000010, 3 now: that changes the model's parameter shapes")


@pytest.mark.slow
def test_ranks_that_resolve_run_dir_differently_use_rank_0s_and_one_checkpoint(tmp_path):
    """Each rank composes its own config (as under plain torchrun); ${now:...} differs per process."""
    forkrun = [sys.executable, str(Path(__file__).parents[1] / "forkrun.py"), "2"]
    overrides = [*DP2_BASE, "train.steps=1", "train.global_batch_size=4", "run.dir=runs/x_${now:%H%M%S_%f}"]
    done = run_command([*forkrun, *overrides], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [path for path in (tmp_path / "runs").iterdir() if path.name != "data-cache"]  # runs/data-cache: the token cache
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    assert verify_checkpoint(checkpoint) is None
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert {"__0_0.distcp", "__1_0.distcp", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(marker["files"])
    assert f"run dir runs/{run_dir.name}" in done.stdout and not (run_dir / "p3d.lock").exists()


@pytest.mark.slow
def test_other_data_under_the_same_data_path_stops_the_resume_unless_accepted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(builtin_documents()[:40]))
    base = ["model=tiny_llama", "train.global_batch_size=2", "train.micro_batch_size=2", "data.seq_len=32", f"data.path={corpus}", "checkpoint.every=2"]
    run_dir = tmp_path / "run"
    assert_ok(run_p3d(run_dir, [*base, "train.steps=2"]))
    corpus.write_text("\n\n".join(builtin_documents()[40:80]))  # replaced by other text, same name
    refused = run_p3d(run_dir, [*base, "train.steps=3"])
    line = one_error_line(refused)
    assert line.startswith(f"p3d: error: data.path={corpus}: the data changed since checkpoint step_00000002 (corpus.txt has ")
    assert "set checkpoint.allow_data_change=true to resume on the new data anyway" in line
    accepted = run_p3d(run_dir, [*base, "train.steps=3", "checkpoint.allow_data_change=true"])
    assert_ok(accepted)
    assert f"config change since step_00000002: the data behind data.path={corpus}: corpus.txt has " in accepted.stdout
    assert [r["step"] for r in accepted.records] == [1, 2, 3]


def wait_for_steps(metrics: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} steps after {timeout} s")


@pytest.mark.slow
def test_a_second_job_on_a_run_dir_stops_and_a_dead_job_s_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    base = ["model=tiny_llama", "train.global_batch_size=2", "train.micro_batch_size=2", "data.seq_len=32", "checkpoint=none"]
    command = [sys.executable, "-m", "p3d.train", *base, "train.steps=100000", f"run.dir={run_dir}"]
    first = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_steps(run_dir / "metrics.jsonl", 1, first)
        second = run_p3d(run_dir, [*base, "train.steps=1"])
        line = one_error_line(second)
        assert line.startswith(f"p3d: error: run.dir={run_dir} is in use by another p3d job (pid {first.pid} on host ")
        assert (run_dir / "metrics.jsonl").read_text().count('"step": 1,') == 1  # the second job wrote nothing there
        first.kill()  # SIGKILL: no chance to release the lock
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    third = run_p3d(run_dir, [*base, "train.steps=1"])
    assert_ok(third)
    assert f"p3d: run.dir={run_dir}: took over the lock of pid {first.pid} on host" in third.stdout
    assert f"its process {first.pid} is no longer running" in third.stdout
    assert not (run_dir / "p3d.lock").exists()


@pytest.mark.slow
def test_async_saves_overlap_training_keep_the_last_two_and_resume_exactly(dp2_reference, tmp_path):
    run = run_p3d(tmp_path / "async", [*DP2, "checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.async_mode=thread"], nproc=2)
    assert_ok(run)
    assert_same_losses(run.records, dp2_reference.records, **SAME_LAYOUT)
    assert {2, 4, 6, 8, 10} <= {r["step"] for r in run.records if "checkpoint_blocked_s" in r}
    assert run.stdout.count("training blocked") == 5
    checkpoints = run.run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_00000008", "step_00000010"]
    assert all(checkpoint_problem(path) is None for path in checkpoints.iterdir())
    marker = json.loads((checkpoints / "step_00000008" / COMPLETE_MARKER).read_text())
    assert marker["async"] and 0 <= marker["blocked_s"] <= marker["marked_s"] and 0 < marker["save_s"] <= marker["marked_s"]
    resumed = run_p3d(tmp_path / "resumed", [*DP2, f"checkpoint.load_from={checkpoints / 'step_00000008'}"], nproc=2)
    assert_ok(resumed)
    assert_same_losses(resumed.records, dp2_reference.records[8:], **SAME_LAYOUT)


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint_and_a_rerun_resumes_with_the_uninterrupted_losses(dp2_reference, tmp_path):
    """SIGTERM to `p3d train`, which passes it on to the workers. Rank 0 sends it to its launcher after
    step 4 (a test hook) and goes on once its own SIGTERM has arrived, so the workers stop after step 5."""
    run_dir = tmp_path / "run"
    overrides = [*DP2, "checkpoint.every=4", "checkpoint.async_mode=thread"]
    command = [*P3D_TRAIN_WITH_HOOKS, *overrides, f"run.dir={run_dir}"]
    done = run_command(command, cwd=tmp_path, env=hooks_env("sigterm_launcher_after_step=4", fault_rank=0))
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "p3d: stopped by SIGTERM" in done.stderr
    assert "stopped by SIGTERM after step 5" in done.stdout
    saved = run_dir / "checkpoints" / "step_00000005"
    assert checkpoint_problem(saved) is None
    assert json.loads((run_dir / "summary.json").read_text())["stopped_by_sigterm"] is True
    assert not (run_dir / "p3d.lock").exists()  # released on the way out

    rerun = run_p3d(run_dir, overrides, nproc=2)
    assert_ok(rerun)
    assert f"resumed from {saved} (step 5," in rerun.stdout
    assert_same_losses(rerun.records, dp2_reference.records, **SAME_LAYOUT)


# --- RNG: dropout resumes exactly on the same layout ----------------------------------------

DROPOUT = ["model=tiny_opt", "model.config.dropout=0.2", "train.steps=8", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=32", "checkpoint.every=4"]


@pytest.mark.slow
def test_a_dropout_run_resumes_exactly_because_rng_states_are_restored(tmp_path):
    full = run_p3d(tmp_path / "full", DROPOUT)
    assert_ok(full)
    checkpoint = full.run_dir / "checkpoints" / "step_00000004"
    resumed = run_p3d(tmp_path / "resumed", [*DROPOUT, f"checkpoint.load_from={checkpoint}"])
    assert_ok(resumed)
    assert_same_losses(resumed.records, full.records[4:], **SAME_LAYOUT)
    # The same resume without the saved states re-seeds, and the losses move: the check above has teeth.
    stripped = tmp_path / "stripped" / "step_00000004"
    shutil.copytree(checkpoint, stripped)
    shutil.rmtree(stripped / "rng")
    marker = json.loads((stripped / COMPLETE_MARKER).read_text())  # a checkpoint without them is intact only if its marker says so
    marker["files"] = {name: record for name, record in marker["files"].items() if not name.startswith("rng/")}
    (stripped / COMPLETE_MARKER).write_text(json.dumps(marker))
    reseeded = run_p3d(tmp_path / "reseeded", [*DROPOUT, f"checkpoint.load_from={stripped}"])
    assert_ok(reseeded)
    assert "random-number states are missing for some rank: re-seeded" in reseeded.stdout
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(reseeded.records, full.records[4:])) > 1e-3


# --- torchrun restarts and two nodes --------------------------------------------------------

TP2DP2 = ["model=tiny_llama", "train.steps=20", "train.global_batch_size=8", "train.micro_batch_size=2", "data.seq_len=32", *layout_overrides(2, 2, 1)]


@pytest.fixture(scope="module")
def one_node_tp2dp2(tmp_path_factory):
    return reference_run(tmp_path_factory, "tp2dp2", TP2DP2, nproc=4)


@pytest.mark.slow
def test_torchrun_restarts_a_failed_group_which_resumes_and_ends_with_the_same_loss(one_node_tp2dp2, tmp_path):
    run_dir = tmp_path / "run"
    command = [*P3D_TRAIN_WITH_HOOKS, "--max-restarts", "2", *TP2DP2, "checkpoint.every=5", f"run.dir={run_dir}"]
    done = run_command(command, cwd=tmp_path, env=hooks_env("fail_after_step=13", fault_rank=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("injected failure after step 13 on rank 2") == 1  # the restarted group runs past it
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000010'} (step 10," in done.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert_same_losses(records, one_node_tp2dp2.records, **SAME_LAYOUT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_on_loopback_train_as_two_nodes(one_node_tp2dp2, tmp_path):
    port = free_port()
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"p3d-{port}"]
    run_dir = tmp_path / "run"
    command = [*P3D_TRAIN, *rendezvous, *TP2DP2, "checkpoint=none", f"run.dir={run_dir}"]
    agents = [subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=600) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "dp=2 cp=1 tp=2 (world 4)" in outputs[0][0] + outputs[1][0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert_same_losses(records, one_node_tp2dp2.records, **SAME_LAYOUT)


# --- export to a Hugging Face model directory -------------------------------------------------


def batch_at(overrides: list[str], consumed: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = to_object(compose(overrides))
    batch = config.train.global_batch_size
    sampler = build_sampler(config.data, config.model, config.train.seed, batch, batch, 1, 0)
    assert config.data.packing is Packing.stream  # positions are 0..seq_len-1, as transformers assumes
    (batch,) = sampler.micro_batches(consumed)
    return batch.input_ids, batch.labels


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_export_loads_in_transformers_with_the_same_logits_and_trains_on(model, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    overrides = [f"model={model}", "train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=32", "checkpoint.every=3"]
    run = run_p3d(tmp_path / "run", [*overrides, *layout_overrides(2, 1, 1)], nproc=2)
    assert_ok(run)
    checkpoint = run.run_dir / "checkpoints" / "step_00000003"
    out_dir = tmp_path / "exported"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_command([sys.executable, "-m", "p3d.cli", "export", str(checkpoint), str(out_dir)], cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in out_dir.iterdir()}

    exported = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    # The same weights by another route: DCP's own converter, into a model built from the config.
    dcp_to_torch_save(checkpoint, tmp_path / "full.pt")
    weights = torch.load(tmp_path / "full.pt", weights_only=True)["app"]["model"]
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out_dir)).eval()
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the input embedding
    inputs, labels = batch_at(overrides, consumed=3 * 4)  # the batch of step 4, trained from these weights
    with torch.no_grad():
        logits, reference_logits = exported(input_ids=inputs).logits, reference(input_ids=inputs).logits
    assert (logits - reference_logits).abs().max().item() < 1e-5
    assert abs(mean_loss(logits, labels) - run.records[3]["loss"]) < TOLERANCE

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer("héllo, wörld", add_special_tokens=False)["input_ids"] == list("héllo, wörld".encode())

    continued_overrides = [*overrides, "model.init=pretrained", f"model.pretrained={out_dir}", "train.steps=1", "checkpoint=none"]
    continued = run_p3d(tmp_path / "continued", continued_overrides)
    assert_ok(continued)
    first_inputs, first_labels = batch_at(continued_overrides, consumed=0)
    with torch.no_grad():
        expected = mean_loss(exported(input_ids=first_inputs).logits, first_labels)
    assert abs(continued.losses[0] - expected) < 1e-5
