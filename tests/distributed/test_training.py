"""What people who train expect: schedules that resume exactly, optimizers that are exact on sharded
parameters, a validation pass, sampling from a checkpoint (real processes on gloo)."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest

from tests.conftest import FAST, assert_ok, layout_overrides, run_command, run_p3d
from tests.distributed.test_checkpoint import SAME_LAYOUT, assert_same_losses
from tests.distributed.test_parity import assert_matches

# --- schedules ----------------------------------------------------------------------------------

WSD = [*FAST, "train.steps=8", "optim.schedule=wsd", "optim.decay_ratio=0.5", "optim.min_lr_ratio=0", "checkpoint=default", "checkpoint.every=5"]


@pytest.mark.slow
def test_wsd_resumed_in_its_decay_continues_with_the_uninterrupted_learning_rates_and_losses(p3d_runner):
    """Warmup 2, stable 2, decay over the last 4 steps; resumed at step 5, inside the decay. (Every schedule
    rebuilt at every step is checked in tests/unit/test_optim.py.)"""
    full = p3d_runner(WSD)
    assert_ok(full)
    rates = [record["lr"] for record in full.records]
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    resumed = p3d_runner([*WSD, f"checkpoint.load_from={full.run_dir / 'checkpoints' / 'step_00000005'}"])
    assert_ok(resumed)
    assert_same_losses(resumed.records, full.records[5:], **SAME_LAYOUT)


# --- optimizers on sharded parameters -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adafactor"])
def test_whole_matrix_optimizers_at_tp2dp2_match_one_process_and_resume_on_it(optimizer, p3d_runner):
    """Muon gathers each update for its Newton-Schulz step, Adafactor sums rows, columns and norms across
    ranks: per-step losses and gradient norms as one process's. The tp2dp2 checkpoint (Adafactor's whole
    factored state, Muon's sharded momentum) resumes in one process on the uninterrupted losses."""
    overrides = [*FAST, f"optim.name={optimizer}", "checkpoint=default", "checkpoint.every=3"]
    reference = p3d_runner([*overrides, "train.micro_batch_size=4"])
    assert_ok(reference)
    sharded = p3d_runner([*overrides, *layout_overrides(2, 2, 1)], nproc=4)
    assert_ok(sharded)
    assert_matches(sharded.records, reference.records)
    resumed = p3d_runner([*overrides, "train.micro_batch_size=4", f"checkpoint.load_from={sharded.run_dir / 'checkpoints' / 'step_00000003'}"])
    assert_ok(resumed)
    assert_same_losses(resumed.records, reference.records[3:])


# --- validation ---------------------------------------------------------------------------------


def write_held_out(path):
    """Short documents (paragraphs of stdlib docstrings), so packed-document boundaries fall inside the windows."""
    import argparse, collections, csv, json as json_module, textwrap

    paragraphs = [part.strip() for module in (argparse, textwrap, collections, csv, json_module) for part in (module.__doc__ or "").split("\n\n")]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in paragraphs if text))
    return path


# 5 steps, a pass every 2 (steps 2 and 4) and the final one (step 5); packed documents in the held-out data.
VALIDATED = [*FAST, "train.steps=5", "eval.every=2", "eval.steps=2", "data.packing=documents"]
EVALUATED_STEPS = [2, 4, 5]


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    """One process with every sink on."""
    root = tmp_path_factory.mktemp("validated")
    held_out = write_held_out(root / "held_out.jsonl")
    overrides = [*VALIDATED, f"data.eval_path={held_out}", "train.micro_batch_size=4"]
    result = run_p3d(root / "run", [*overrides, "logging.tensorboard=true", "logging.wandb=true"])
    assert_ok(result)
    return result, held_out


@pytest.mark.slow
def test_validation_goes_on_the_evaluated_steps_records_of_metrics_jsonl(validated_run):
    result, _ = validated_run
    evaluated = [record for record in result.records if "val_loss" in record]
    assert [record["step"] for record in evaluated] == EVALUATED_STEPS  # every 2 steps, and after the last
    for record in evaluated:
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]), rel=1e-12) and record["eval_s"] > 0
    assert 3 < evaluated[-1]["val_loss"] < evaluated[0]["val_loss"]  # the model learns bytes, so held-out loss falls


@pytest.mark.slow
def test_validation_is_printed_on_the_console_and_summarised(validated_run):
    result, _ = validated_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("eval ")]
    evaluated = [record for record in result.records if "val_loss" in record]
    assert lines == [
        f"eval {r['step']:>5}/5 | val_loss {r['val_loss']:.4f} | val_ppl {r['val_ppl']:.2f} | {r['eval_s']:.2f} s" for r in evaluated
    ]
    assert f"| val_loss {evaluated[-1]['val_loss']:.4f} |" in result.stdout.splitlines()[-1]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["val_loss"] == evaluated[-1]["val_loss"]
    # Training throughput leaves the validation passes out.
    assert summary["eval_s"] == pytest.approx(sum(r["eval_s"] for r in evaluated), abs=2e-3)
    tokens = 5 * result.records[-1]["tokens"]
    assert summary["tokens_per_s"] == pytest.approx(tokens / (summary["seconds"] - summary["eval_s"]), rel=1e-2)


@pytest.mark.slow
def test_validation_goes_to_tensorboard(validated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = validated_run
    (events,) = (result.run_dir / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    evaluated = [record for record in result.records if "val_loss" in record]
    for tag, key in (("val/loss", "val_loss"), ("val/ppl", "val_ppl")):
        scalars = accumulator.Scalars(tag)
        assert [event.step for event in scalars] == EVALUATED_STEPS
        assert [event.value for event in scalars] == pytest.approx([record[key] for record in evaluated], rel=1e-6)


@pytest.mark.slow
def test_validation_goes_to_wandb_offline(validated_run):
    """The offline run file holds each logged value as its JSON text right after its key."""
    result, _ = validated_run
    (run_file,) = (result.run_dir / "wandb").glob("offline-run-*/*.wandb")
    data = run_file.read_bytes()
    for record in result.records:
        for key, name in (("val_loss", b"val/loss"), ("val_ppl", b"val/ppl")):
            if key in record:
                assert re.search(re.escape(name) + rb".{1,4}" + re.escape(json.dumps(record[key]).encode()), data, re.DOTALL), (key, record["step"])
    assert data.count(b"val/loss") == data.count(b"val/ppl") >= len(EVALUATED_STEPS)


@pytest.mark.slow
def test_validation_at_tp2dp2cp2_gives_one_process_s_numbers(validated_run, tmp_path):
    reference, held_out = validated_run
    result = run_p3d(tmp_path / "run", [*VALIDATED, f"data.eval_path={held_out}", "parallel=tp2dp2cp2", "train.micro_batch_size=1"], nproc=8)
    assert_ok(result)
    ours = [(r["step"], r["val_loss"]) for r in result.records if "val_loss" in r]
    expected = [(r["step"], r["val_loss"]) for r in reference.records if "val_loss" in r]
    assert [step for step, _ in ours] == EVALUATED_STEPS
    worst = max(abs(a - b) for (_, a), (_, b) in zip(ours, expected))
    assert worst < 1e-4, (ours, expected)


# --- sampling from a checkpoint -------------------------------------------------------------------

PROMPT = "The "


@pytest.mark.slow
def test_generate_prints_the_same_greedy_text_twice_and_the_tokens_of_transformers_generate(p3d_runner, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p3d.export import export_checkpoint
    from p3d.generate import GenerateOptions, generate_ids, load_for_generation, prompt_ids

    run = p3d_runner([*FAST, "checkpoint=default", "checkpoint.every=3"])
    assert_ok(run)
    command = [sys.executable, "-m", "p3d.cli", "generate", str(run.run_dir), "--prompt", PROMPT, "--max-new-tokens", "24"]
    first, second = run_command(command, cwd=tmp_path), run_command(command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout and len(first.stdout) > 1  # some text (the tiny model favours spaces)
    assert first.stderr.strip() == f"p3d: generating from {run.run_dir / 'checkpoints' / 'step_00000006'} (step 6)"

    exported_dir = export_checkpoint(run.run_dir, tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(exported_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported_dir)
    assert exported.generation_config.eos_token_id == tokenizer.eos_token_id == 256  # the byte tokenizer's, not Llama's 2
    prompt = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")
    expected = exported.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1] :].tolist()
    _, model, own_tokenizer = load_for_generation(run.run_dir)
    greedy = GenerateOptions(PROMPT, max_new_tokens=24)
    assert generate_ids(model, prompt_ids(own_tokenizer, greedy), greedy) == expected
    assert first.stdout == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    # Sampling is seeded: the same seed gives the same tokens, another seed other ones.
    sampled = [generate_ids(model, prompt_ids(own_tokenizer, options), options) for options in (
        GenerateOptions(PROMPT, 24, temperature=1.0, top_p=0.95, seed=1),
        GenerateOptions(PROMPT, 24, temperature=1.0, top_p=0.95, seed=1),
        GenerateOptions(PROMPT, 24, temperature=1.0, top_p=0.95, seed=2),
    )]
    assert sampled[0] == sampled[1] != sampled[2]
