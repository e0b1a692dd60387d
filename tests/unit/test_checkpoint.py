"""Checkpoint validity, the resume plan (which checkpoint, which config changes), retention, RNG, export's tokenizer."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from p3d import rng
from p3d.checkpoint import COMPLETE_MARKER, CONFIG_FILE, HF_CONFIG_FILE, Checkpointer, checkpoint_problem, complete_checkpoints
from p3d.config.compose import compose, to_object
from p3d.config.schema import CheckpointConfig
from p3d.data import ByteTokenizer, builtin_documents
from p3d.distributed.mesh import ParallelDims
from p3d.errors import ConfigError
from p3d.export import byte_tokenizer
from p3d.model import build_hf_config
from p3d.resume import hf_config_json, plan_resume

BASE = ["model=tiny_llama", "data.seq_len=32"]


def configured(tmp_path: Path, *overrides: str):
    cfg = compose([*BASE, f"run.dir={tmp_path / 'run'}", *overrides])
    config = to_object(cfg)
    return cfg, config, build_hf_config(config.model)


def make_checkpoint(path: Path, *overrides: str, step: int = 10, tmp_path: Path | None = None) -> Path:
    """A small but real checkpoint directory: DCP files, stored configs and the marker."""
    cfg, _, hf_config = configured(tmp_path or path.parent, *overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group says it assumes one process
        dcp.save({"app": {"model": {"weight": torch.arange(1000.0)}}, "train": {"step": step}}, checkpoint_id=str(path))
    (path / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (path / HF_CONFIG_FILE).write_text(hf_config_json(hf_config))
    (path / COMPLETE_MARKER).write_text(json.dumps({"step": step, "layout": {"dp": 1, "cp": 1, "tp": 1}}))
    return path


def test_a_complete_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(make_checkpoint(tmp_path / "step_00000010")) is None


def test_incomplete_missing_and_corrupt_checkpoints_are_told_apart(tmp_path):
    assert checkpoint_problem(tmp_path / "nowhere") == "no such checkpoint directory"
    unmarked = make_checkpoint(tmp_path / "a")
    (unmarked / COMPLETE_MARKER).unlink()
    assert checkpoint_problem(unmarked).startswith("incomplete checkpoint")
    garbled = make_checkpoint(tmp_path / "b")
    (garbled / ".metadata").write_bytes(b"not a pickle")
    assert checkpoint_problem(garbled).startswith("corrupt checkpoint: cannot read its metadata")
    truncated = make_checkpoint(tmp_path / "c")
    (data_file,) = truncated.glob("*.distcp")
    data_file.write_bytes(data_file.read_bytes()[:100])
    assert "truncated" in checkpoint_problem(truncated)


def test_resume_takes_the_newest_complete_checkpoint_of_run_dir(tmp_path):
    _, config, hf_config = configured(tmp_path)
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root / "step_00000005", step=5, tmp_path=tmp_path)
    make_checkpoint(root / "step_00000010", step=10, tmp_path=tmp_path)
    (root / "step_00000015").mkdir()  # a save that died: no marker
    plan = plan_resume(config, hf_config)
    assert plan.path == root / "step_00000010" and plan.changes == ()


def test_allowed_changes_are_listed(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root / "step_00000010", tmp_path=tmp_path)
    _, config, hf_config = configured(tmp_path, "optim.lr=5e-4", "parallel.tp=2", "train.steps=40", "model.config.attention_dropout=0.1")
    plan = plan_resume(config, hf_config)
    assert plan.changes == (
        "model.config.attention_dropout: <unset> -> 0.1",
        "optim.lr: 0.001 -> 0.0005",
        "parallel.tp: 1 -> 2",
        "train.steps: 20 -> 40",
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.config.num_hidden_layers=3", "model.config.num_hidden_layers: 2 in checkpoint step_00000010, 3 now: that changes the model's parameter shapes"),
        ("model.config.hidden_size=128", "model.config.hidden_size: 64 in checkpoint step_00000010, 128 now: that changes the model's parameter shapes"),
        ("data.seq_len=64", "data.seq_len: 32 in checkpoint step_00000010, 64 now: the data position"),
        ("train.seed=1", "train.seed: 0 in checkpoint step_00000010, 1 now: the data position"),
        ("data.tokenizer=gpt2", "data.tokenizer: auto in checkpoint step_00000010, gpt2 now"),
    ],
)
def test_shape_and_data_changes_are_refused_naming_the_key(override, key, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root / "step_00000010", tmp_path=tmp_path)
    _, config, hf_config = configured(tmp_path, override)
    with pytest.raises(ConfigError) as error:
        plan_resume(config, hf_config)
    (problem,) = error.value.problems
    assert problem.startswith(key) and "start fresh with another run.dir or checkpoint.resume=false" in problem


def test_load_from_an_incomplete_or_corrupt_checkpoint_is_one_clear_error(tmp_path):
    other = tmp_path / "other" / "checkpoints"
    good = make_checkpoint(other / "step_00000005", step=5, tmp_path=tmp_path)
    unmarked = make_checkpoint(other / "step_00000010", tmp_path=tmp_path)
    (unmarked / COMPLETE_MARKER).unlink()
    _, config, hf_config = configured(tmp_path, f"checkpoint.load_from={unmarked}")
    with pytest.raises(ConfigError) as error:
        plan_resume(config, hf_config)
    assert error.value.problems == [
        f"checkpoint.load_from={unmarked}: incomplete checkpoint: it has no {COMPLETE_MARKER}, so its save never finished; "
        f"name a complete checkpoint directory (complete ones there: step_00000005)"
    ]
    (good / ".metadata").write_bytes(b"\x80garbage")
    _, config, hf_config = configured(tmp_path, f"checkpoint.load_from={good}")
    with pytest.raises(ConfigError, match=r"checkpoint.load_from=.*: corrupt checkpoint: cannot read its metadata"):
        plan_resume(config, hf_config)


def test_load_from_starts_a_run_and_the_runs_own_newer_checkpoints_win_afterwards(tmp_path):
    source = make_checkpoint(tmp_path / "other" / "step_00000010", tmp_path=tmp_path)
    _, config, hf_config = configured(tmp_path, f"checkpoint.load_from={source}")
    assert plan_resume(config, hf_config).path == source
    own = make_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000015", step=15, tmp_path=tmp_path)
    plan = plan_resume(config, hf_config)  # e.g. a torchrun restart of the same command
    assert plan.path == own and plan.notices[0].startswith(f"checkpoint.load_from={source} not used")


def test_load_from_an_older_checkpoint_of_the_same_run_dir_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    older = make_checkpoint(root / "step_00000005", step=5, tmp_path=tmp_path)
    make_checkpoint(root / "step_00000010", step=10, tmp_path=tmp_path)
    _, config, hf_config = configured(tmp_path, f"checkpoint.load_from={older}")
    with pytest.raises(ConfigError, match="an older checkpoint of this run.dir.*use a new run.dir"):
        plan_resume(config, hf_config)


def test_a_corrupt_newest_checkpoint_of_run_dir_is_an_error_not_a_silent_fallback(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root / "step_00000005", step=5, tmp_path=tmp_path)
    newest = make_checkpoint(root / "step_00000010", tmp_path=tmp_path)
    (newest / ".metadata").unlink()
    _, config, hf_config = configured(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.resume: run.dir's newest checkpoint .* cannot be used"):
        plan_resume(config, hf_config)
    _, config, hf_config = configured(tmp_path, "checkpoint.resume=false")
    assert plan_resume(config, hf_config).path is None


def test_retention_deletes_older_complete_and_unfinished_checkpoints_only(tmp_path):
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_last=2), True, ParallelDims(1, 1, 1), "", "")
    for step in (2, 4, 6, 8, 10):
        checkpointer.path_for(step).mkdir(parents=True)
        if step != 6:
            (checkpointer.path_for(step) / COMPLETE_MARKER).write_text("{}")
    checkpointer.path_for(12).mkdir()  # newer and unfinished: maybe being written
    checkpointer._apply_retention(newest_step=10)
    assert [path.name for path in sorted(checkpointer.root.iterdir())] == ["step_00000008", "step_00000010", "step_00000012"]
    assert [step for step, _ in complete_checkpoints(checkpointer.root)] == [8, 10]


def test_rng_states_round_trip(tmp_path):
    rng.seed_all(3, 7, 1)
    rng.save(tmp_path / "rank.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    rng.seed_all(4, 0, 0)
    rng.restore(rng.load(tmp_path / "rank.pt"))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_test_faults_fire_on_their_rank_in_the_first_attempt_only(monkeypatch):
    from tests import hooks

    monkeypatch.setenv("RANK", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("P3D_TEST_FAULT_RANK", raising=False)
    assert hooks.armed()
    monkeypatch.setenv("P3D_TEST_FAULT_RANK", "1")
    assert not hooks.armed()
    monkeypatch.setenv("P3D_TEST_FAULT_RANK", "2")
    assert hooks.armed()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not hooks.armed()


def test_p3d_carries_no_test_fault_hooks():
    """Fault injection lives in tests/hooks.py, installed from outside; no p3d module reads a test variable."""
    source = Path(__file__).resolve().parents[2] / "src" / "p3d"
    for path in source.rglob("*.py"):
        found = re.findall(r"P3D_TEST_\w*|P3D_FAIL\w*|P3D_KILL\w*|\bfaults\b", path.read_text())
        assert not found, f"{path.relative_to(source)} mentions {found}"


def test_exported_byte_tokenizer_gives_p3d_byte_ids(tmp_path):
    from transformers import AutoTokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = builtin_documents()[:40] + ["héllo wörld ✓ 日本語 \x00\x7f\ttab\n  two spaces ", ""]
    ids = loaded(texts, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode_batch(texts)
    assert loaded.eos_token_id == ByteTokenizer.eos_token_id and len(loaded) == ByteTokenizer.vocab_size
    assert loaded.decode(ids[-2]) == texts[-2]


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_async_save_writes_the_state_as_it_was_when_save_returned(tmp_path, one_process_group):
    from torch import nn

    from p3d.checkpoint import ModelAndOptimizer, TrainState
    from p3d.config.schema import AsyncMode

    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 512)).sum().backward()
    optimizer.step()
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_mode=AsyncMode.thread), True, ParallelDims(1, 1, 1), "a: 1\n", "{}", info=lambda _: None)
    state = TrainState(step=3, consumed_samples=12)
    expected = model.weight.detach().clone()
    checkpointer.save(3, {"app": ModelAndOptimizer(model, optimizer), "train": state})
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the background thread writes
    state.step = 4
    path = checkpointer.path_for(3)
    assert checkpointer.pending is not None and not (path / COMPLETE_MARKER).exists()
    checkpointer.wait()
    assert checkpoint_problem(path) is None and json.loads((path / COMPLETE_MARKER).read_text())["async"] is True
    restored, restored_state = nn.Linear(512, 512), TrainState()
    checkpointer.load(path, {"app": ModelAndOptimizer(restored, torch.optim.AdamW(restored.parameters())), "train": restored_state})
    assert torch.equal(restored.weight, expected) and restored_state.step == 3
