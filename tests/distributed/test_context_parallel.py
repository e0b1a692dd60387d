"""Context parallelism, complete: ring and allgather attention, balanced / contiguous sharding,
packed documents, sequence parallelism.

The parity matrix is chosen so that few 8-rank runs cover every item: each cp_impl runs at cp2,
cp4 and cp8, on both models, with and without packed documents, mixed with tp2 (with sequence
parallelism) and dp2. Every run is checked per step against a one-process run of the same
config (fp32, 6 steps, |loss difference| < 1e-4, gradient norm as in test_parity). Clipping is
off here (test_parity covers it): every step would be clipped, which hides a gradient's scale.
A negative control (dK/dV not summed over the cp ranks) shows the comparison failing. The
one-process run with packed documents is itself checked against transformers' own model
applied to each document separately.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from p3d.config.compose import compose, to_object
from p3d.data import IGNORE_INDEX, build_sampler
from p3d.model import build_hf_config, build_meta_model, materialize
from tests.conftest import FAST, assert_ok, hooks_env, layout_overrides, run_command, run_p3d
from tests.distributed.test_parity import assert_matches

UNCLIPPED = [*FAST, "optim.grad_clip=0"]

HELPERS = Path(__file__).parent / "helpers"
WORDS = "the cat sat on a mat while dogs ran far away into fields of green grass under blue sky".split()


@pytest.fixture(scope="module")
def documents_file(tmp_path_factory) -> Path:
    """Short documents (1-4 words), so every 32-token window holds several document boundaries."""
    path = tmp_path_factory.mktemp("data") / "short_documents.jsonl"
    generator = random.Random(0)
    rows = [{"text": " ".join(generator.choice(WORDS) for _ in range(generator.randint(1, 4)))} for _ in range(3000)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def packing_overrides(packing: str, documents_file: Path) -> list[str]:
    if packing == "stream":
        return []
    return ["data.packing=documents", f"data.path={documents_file}"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, documents_file):
    """Module-scoped one-process references, keyed by (model, packing)."""
    cache: dict[tuple[str, str], list[dict]] = {}
    root = tmp_path_factory.mktemp("references")

    def records(model: str, packing: str) -> list[dict]:
        if (model, packing) not in cache:
            result = run_p3d(root / f"{model}-{packing}", [f"model={model}", *UNCLIPPED, "train.micro_batch_size=4", *packing_overrides(packing, documents_file)])
            assert_ok(result)
            assert len(result.records) == 6
            cache[model, packing] = result.records
        return cache[model, packing]

    return records


# name: (model, cp_impl, (tp, dp, cp), packing, extra overrides)
MATRIX = {
    "ring-llama-tp2dp2cp2-sp-documents": ("tiny_llama", "ring", (2, 2, 2), "documents", ["parallel.sequence_parallel=true"]),
    "ring-opt-dp2cp4": ("tiny_opt", "ring", (1, 2, 4), "stream", []),
    "ring-opt-tp2cp4-sp-documents": ("tiny_opt", "ring", (2, 1, 4), "documents", ["parallel.sequence_parallel=true"]),
    "ring-llama-cp8-timed": ("tiny_llama", "ring", (1, 1, 8), "stream", ["logging.attention_timing=true"]),
    "allgather-opt-tp2dp2cp2-sp": ("tiny_opt", "allgather", (2, 2, 2), "stream", ["parallel.sequence_parallel=true"]),
    "allgather-llama-tp2cp4-sp": ("tiny_llama", "allgather", (2, 1, 4), "stream", ["parallel.sequence_parallel=true"]),
    "allgather-llama-dp2cp4-documents-contiguous": ("tiny_llama", "allgather", (1, 2, 4), "documents", ["parallel.cp_layout=contiguous"]),
    "allgather-opt-cp8-documents": ("tiny_opt", "allgather", (1, 1, 8), "documents", []),
}


def run_cp(p3d_runner, model: str, impl: str, layout: tuple[int, int, int], packing: str, extra: list[str], documents_file: Path, **kwargs):
    tp, dp, cp = layout
    micro = 2 if dp == 2 else 4
    overrides = [f"model={model}", *UNCLIPPED, *layout_overrides(tp, dp, cp), f"train.micro_batch_size={micro}", f"parallel.cp_impl={impl}"]
    result = p3d_runner([*overrides, *packing_overrides(packing, documents_file), *extra], nproc=tp * dp * cp, **kwargs)
    assert_ok(result)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_cp_matches_one_process(name, p3d_runner, one_process, documents_file):
    model, impl, (tp, dp, cp), packing, extra = MATRIX[name]
    result = run_cp(p3d_runner, model, impl, (tp, dp, cp), packing, extra, documents_file)
    assert_matches(result.records, one_process(model, packing))
    if "logging.attention_timing=true" in extra:
        summary = json.loads((result.run_dir / "summary.json").read_text())
        for key in ("attention_compute_s_per_rank", "attention_total_s_per_rank"):
            assert len(summary[key]) == cp and all(seconds > 0 for seconds in summary[key]), summary


@pytest.mark.slow
def test_comparison_detects_key_value_gradients_not_summed_over_cp(p3d_runner, one_process, documents_file):
    """Negative control: all-gather attention keeps each rank's own dK/dV instead of reduce-scattering them."""
    result = run_cp(p3d_runner, "tiny_llama", "allgather", (1, 1, 2), "stream", [], documents_file, env=hooks_env("unsummed_kv_grads"))
    with pytest.raises(AssertionError):
        assert_matches(result.records, one_process("tiny_llama", "stream"))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 8])
def test_ring_and_allgather_attention_equal_sdpa(nproc, tmp_path):
    """Outputs and q/k/v (and sink) gradients of both schedules, both layouts, with and without documents, GQA
    heads, with sliding windows, softcapping and attention sinks, and value head dims other than the key's."""
    done = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(HELPERS / "cp_attention_check.py")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok 176" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_sequence_parallel_shards_the_norms_and_changes_nothing_else(model, tmp_path):
    done = run_command(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HELPERS / "sequence_parallel_check.py"), f"model={model}"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok "), done.stdout


def per_document_loss(checkpoint: Path, overrides: list[str]) -> float:
    """transformers' model applied to each packed document on its own: the loss packing=documents must give."""
    config = to_object(compose(overrides))
    batch_size = config.train.global_batch_size
    sampler = build_sampler(config.data, config.model, config.train.seed, batch_size, batch_size, 1, 0)
    (batch,) = sampler.micro_batches(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa")
    total, count, documents = 0.0, 0, 0
    with torch.no_grad():
        for row in range(batch_size):
            for document in batch.document_ids[row].unique():
                tokens = batch.document_ids[row] == document
                logits = model(input_ids=batch.input_ids[row, tokens][None]).logits[0]
                labels = batch.labels[row, tokens]
                total += F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += int((labels != IGNORE_INDEX).sum())
                documents += 1
    assert documents >= 3 * batch_size, "the test data should put several documents in each window"
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_opt"])
def test_packed_documents_equal_separate_documents(preset, tmp_path, p3d_runner, documents_file):
    config = to_object(compose([f"model={preset}"]))
    hf_config = build_hf_config(config.model)
    source = build_meta_model(hf_config)
    materialize(source, config.model, hf_config, seed=5, device=torch.device("cpu"))
    checkpoint = tmp_path / "checkpoint"
    source.save_pretrained(checkpoint)
    overrides = [f"model={preset}", "model.init=pretrained", f"model.pretrained={checkpoint}", *FAST, "train.micro_batch_size=4", *packing_overrides("documents", documents_file)]
    expected = per_document_loss(checkpoint, overrides)
    result = p3d_runner([*overrides, "train.steps=1"])
    assert_ok(result)
    assert abs(result.losses[0] - expected) < 1e-5, (result.losses[0], expected)
    streamed = p3d_runner([*overrides, "train.steps=1", "data.packing=stream"])
    assert_ok(streamed)
    assert abs(streamed.losses[0] - expected) > 1e-3, "documents seeing each other should change the loss"
