"""Architectures other than the tiny Llama and OPT: each one's tiny version (`model=tiny model.arch=...`)
trains exactly under tensor and context parallelism, with nothing of p3d written for most of them.

A fixed subset of the coverage sweep (benchmarks/model_coverage.py runs every causal-LM type): tp2cp2
exercises every TP style of the architecture's plan and p3d's attention in one 4-rank run. The
attention features CP must honour each get a run: sliding windows and softcapping (Gemma 2),
sinks (GraniteSWA), learned and offset positions (GPT-2, OPT), embedding scaling (Gemma), a model
that calls torch's SDPA itself (Falcon), attention written by hand (MegatronBERT, BLOOM, TrOCR), under both
ring and allgather, with packed documents.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_ok, layout_overrides, run_command
from tests.distributed.test_parity import assert_parity

STEPS = ["train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=32", "checkpoint=none"]
CI_ARCHITECTURES = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "olmo2", "granite", "smollm3", "falcon"]

_references: dict[tuple, list[float]] = {}
HELPERS = Path(__file__).parent / "helpers"


def test_every_tensor_parallel_style_equals_the_unsharded_module(tmp_path):
    """Each style (Linear and Conv1D, packed parts, embeddings, per-head norms, sinks, all_reduce) at tp=2:
    outputs and every gradient equal the unsharded module's (float64)."""
    done = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HELPERS / "tp_styles_check.py")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok 18" in done.stdout


def reference_losses(p3d_runner, arch: str, extra: tuple[str, ...] = ()) -> list[float]:
    key = (arch, extra)
    if key not in _references:
        result = p3d_runner(["model=tiny", f"model.arch={arch}", *STEPS, *extra])
        assert_ok(result)
        assert len(result.losses) == 3
        _references[key] = result.losses
    return _references[key]


@pytest.mark.slow
@pytest.mark.parametrize("arch", CI_ARCHITECTURES)
def test_tiny_architecture_matches_one_process_at_tp2cp2(arch, p3d_runner):
    result = p3d_runner(["model=tiny", f"model.arch={arch}", *STEPS, *layout_overrides(2, 1, 2)], nproc=4)
    assert_ok(result)
    assert f"tiny_{arch} ({arch}) on" in result.stdout  # the start-up line names the architecture
    assert_parity(result.losses, reference_losses(p3d_runner, arch))


# arch: (cp_impl, packing) -- each attention feature under a schedule, with packed documents where it matters
CP_FEATURES = {
    "gemma2": ("ring", "documents"),  # sliding windows and softcapped scores
    "granite_swa": ("allgather", "documents"),  # sinks (tp-sharded per head) and windows
    "gpt2": ("allgather", "documents"),  # learned absolute positions
    "opt": ("ring", "documents"),  # learned positions with an offset
    "gemma": ("allgather", "stream"),  # scaled embeddings
    "falcon": ("ring", "documents"),  # torch's SDPA called by the model itself
    "megatron-bert": ("ring", "documents"),  # attention by hand, run on the gathered whole sequence (whole_sequence)
    "bigbird_pegasus": ("ring", "stream"),  # its decoder's attention says is_causal=False and masks causally
    "bloom": ("allgather", "documents"),  # whole_sequence with its ALiBi rebuilt for the whole sequence (models/bloom.py)
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CP_FEATURES))
def test_attention_features_are_exact_under_context_parallelism(arch, p3d_runner, tmp_path):
    impl, packing = CP_FEATURES[arch]
    extra = ()
    if packing == "documents":
        corpus = tmp_path / "documents.jsonl"
        corpus.write_text("\n".join(json.dumps({"text": f"doc {index}: " + "word " * (index % 7)}) for index in range(400)))
        extra = ("data.packing=documents", f"data.path={corpus}")
    result = p3d_runner(["model=tiny", f"model.arch={arch}", *STEPS, *extra, *layout_overrides(1, 1, 2), f"parallel.cp_impl={impl}"], nproc=2)
    assert_ok(result)
    assert_parity(result.losses, reference_losses(p3d_runner, arch, extra))


@pytest.mark.slow
def test_attention_by_hand_is_exact_at_tp2cp2_with_its_blocks_recomputed(p3d_runner):
    """The routes that keep the model's own attention gather over the cp group in hooks, which run again when
    activation checkpointing recomputes a block in the backward (TrOCR: its keys and values gathered, and
    p3d's plan with its attention gathered over tp)."""
    extra = ("train.activation_checkpointing=full",)
    result = p3d_runner(["model=tiny", "model.arch=trocr", *STEPS, *extra, *layout_overrides(2, 1, 2)], nproc=4)
    assert_ok(result)
    assert_parity(result.losses, reference_losses(p3d_runner, "trocr", extra))


@pytest.mark.slow
def test_bidirectional_attention_is_exact_under_context_parallelism(p3d_runner):
    """A bidirectional model (BERT, is_decoder=false) runs its own attention on the gathered whole sequence."""
    extra = ("model.config.is_decoder=false",)
    result = p3d_runner(["model=tiny", "model.arch=bert", *STEPS, *extra, *layout_overrides(1, 1, 2)], nproc=2)
    assert_ok(result)
    assert "context-parallel attention: the model's own attention code on the whole sequence" in result.stdout  # said at start-up
    assert_parity(result.losses, reference_losses(p3d_runner, "bert", extra))
