"""Data through real runs: chat data is exact under tp2cp2 (packed conversations, assistant-only
labels) and its loss falls; a mixture reports its sources per step and resumes exactly on another
layout; the validation pass reads data.eval_fraction's held-out documents."""

from __future__ import annotations

import json

import pytest

from p3d.config.compose import compose, to_object
from p3d.data import build_sampler

from tests.conftest import FAST, assert_ok, layout_overrides
from tests.distributed.test_checkpoint import assert_same_losses
from tests.distributed.test_parity import assert_matches

CHAT = ["model=tiny_llama", *FAST, "data=chat", "optim.grad_clip=0"]


@pytest.mark.slow
def test_chat_data_at_tp2cp2_matches_one_process(p3d_runner):
    reference = p3d_runner([*CHAT, "train.micro_batch_size=4"])
    assert_ok(reference)
    result = p3d_runner([*CHAT, *layout_overrides(2, 1, 2), "train.micro_batch_size=2"], nproc=4)
    assert_ok(result)
    assert_matches(result.records, reference.records)
    assert [r["label_tokens"] for r in result.records] == [r["label_tokens"] for r in reference.records]
    assert all(0 < r["label_tokens"] < r["tokens"] for r in result.records)  # only the assistant's tokens are targets


@pytest.mark.slow
def test_the_loss_falls_on_the_builtin_chat_set(p3d_runner):
    result = p3d_runner(["model=tiny_llama", "data=chat", "data.seq_len=128", "train.steps=40", "train.global_batch_size=8", "train.micro_batch_size=8", "optim.lr=3e-3", "checkpoint=none"])
    assert_ok(result)
    losses = result.losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses


def mixture(tmp_path) -> list[str]:
    for name, words in (("prose", "the quick brown fox jumps over the lazy dog "), ("code", "def f(x): return x * 2\n")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": words * (1 + i % 5)}) + "\n" for i in range(400)))
    sources = f"data.sources=[{{path: {tmp_path / 'prose.jsonl'}, weight: 0.8}}, {{path: {tmp_path / 'code.jsonl'}, weight: 0.2}}]"
    return ["model=tiny_llama", sources, "data.seq_len=32", "train.global_batch_size=8", "train.steps=8", "checkpoint.every=4"]


@pytest.mark.slow
def test_a_mixture_reports_its_sources_and_resumes_exactly_on_another_layout(tmp_path, p3d_runner):
    overrides = mixture(tmp_path)
    uninterrupted = p3d_runner([*overrides, "parallel.dp=2", "train.micro_batch_size=2"], nproc=2)
    assert_ok(uninterrupted)
    counts = [record["samples_per_source"] for record in uninterrupted.records]
    config = to_object(compose([*overrides, f"data.cache_dir={uninterrupted.run_dir.parent / 'runs' / 'data-cache'}"]))
    sampler = build_sampler(config.data, config.model, config.train.seed, 8, 8, 1, 0)
    assert counts == [sampler.source_counts(step * 8) for step in range(8)]
    assert all(sum(count.values()) == 8 and set(count) == {"prose", "code"} for count in counts)
    checkpoint = uninterrupted.run_dir / "checkpoints" / "step_00000004"
    resumed = p3d_runner([*overrides, "train.micro_batch_size=8", f"checkpoint.load_from={checkpoint}"])
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    assert_same_losses(resumed.records, uninterrupted.records[4:])
    assert [r["samples_per_source"] for r in resumed.records] == counts[4:]


@pytest.mark.slow
def test_a_validation_pass_over_eval_fraction_scores_exactly_the_held_out_documents(tmp_path, p3d_runner):
    """data.eval_fraction=0.25 on one corpus trains and validates as data.path = its training documents and
    data.eval_path = its held-out ones, written as two files: the same losses and val_loss."""
    from p3d.data.cache import held_out

    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4) for i in range(300)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    held = [text for text in texts if held_out(text.encode(), 0.25)]
    assert 0 < len(held) < len(texts)
    for name, part in (("train.jsonl", [t for t in texts if t not in held]), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps({"text": text}) + "\n" for text in part))
    validated = ["model=tiny_llama", *FAST, "eval.every=3", "eval.steps=2", "data.packing=documents"]
    fraction = p3d_runner([*validated, f"data.path={tmp_path / 'corpus.jsonl'}", "data.eval_fraction=0.25"])
    assert_ok(fraction)
    files = p3d_runner([*validated, f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'held.jsonl'}"])
    assert_ok(files)
    assert [r["step"] for r in fraction.records if "val_loss" in r] == [3, 6]
    assert [r["loss"] for r in fraction.records] == [r["loss"] for r in files.records]
    assert [r.get("val_loss") for r in fraction.records] == [r.get("val_loss") for r in files.records]
