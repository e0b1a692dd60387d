"""Checkpoint validity and integrity (sizes and checksums taken while writing, verified before
loading), the resume plan (which checkpoint, which config and data changes), retention, RNG,
export's tokenizer."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from p3d import checkpoint as checkpoint_module
from p3d import rng
from p3d.checkpoint import (
    COMPLETE_MARKER,
    CONFIG_FILE,
    FORMAT_VERSION,
    HF_CONFIG_FILE,
    Checkpointer,
    RecordingWriter,
    checkpoint_problem,
    complete_checkpoints,
    file_checksum,
    files_missing_from,
    verify_checkpoint,
    write_file,
)
from p3d.config.compose import compose, to_object
from p3d.config.schema import AsyncMode, CheckpointConfig
from p3d.data import ByteTokenizer, builtin_documents, data_fingerprint
from p3d.distributed.mesh import ParallelDims
from p3d.errors import ConfigError
from p3d.export import byte_tokenizer, resolve_checkpoint
from p3d.model import build_hf_config
from p3d.resume import hf_config_json, plan_resume

BASE = ["model=tiny_llama", "data.seq_len=32"]


def configured(tmp_path: Path, *overrides: str):
    cfg = compose([*BASE, f"run.dir={tmp_path / 'run'}", *overrides])
    config = to_object(cfg)
    return cfg, config, build_hf_config(config.model)


def make_checkpoint(path: Path, *overrides: str, step: int = 10, tmp_path: Path | None = None) -> Path:
    """A small but real checkpoint directory: DCP files, stored configs and the marker with every
    file's size and checksum, as Checkpointer writes them."""
    cfg, config, hf_config = configured(tmp_path or path.parent, *overrides)
    writer = RecordingWriter(path, checksums=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group says it assumes one process
        dcp.save({"app": {"model": {"weight": torch.arange(1000.0)}}, "train": {"step": step}}, storage_writer=writer, checkpoint_id=str(path))
    files = writer.records(path)
    files[CONFIG_FILE] = write_file(path / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True).encode(), checksums=True)
    files[HF_CONFIG_FILE] = write_file(path / HF_CONFIG_FILE, hf_config_json(hf_config).encode(), checksums=True)
    marker = {"format": FORMAT_VERSION, "step": step, "layout": {"dp": 1, "cp": 1, "tp": 1}, "data": data_fingerprint(config.data), "files": files}
    (path / COMPLETE_MARKER).write_text(json.dumps(marker))
    return path


def damage(file: Path, size: int = 8) -> None:
    """Overwrite `size` bytes in the middle of `file` with other bytes; its size stays."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + size] = bytes(b ^ 0xFF for b in data[middle : middle + size])
    file.write_bytes(bytes(data))


def test_a_complete_checkpoint_has_no_problem(tmp_path):
    path = make_checkpoint(tmp_path / "step_00000010")
    assert checkpoint_problem(path) is None and verify_checkpoint(path) is None


def test_incomplete_missing_and_corrupt_checkpoints_are_told_apart(tmp_path):
    assert checkpoint_problem(tmp_path / "nowhere") == "no such checkpoint directory"
    unmarked = make_checkpoint(tmp_path / "a")
    (unmarked / COMPLETE_MARKER).unlink()
    assert checkpoint_problem(unmarked).startswith("incomplete checkpoint")
    garbled = make_checkpoint(tmp_path / "b")
    (garbled / ".metadata").write_bytes(b"not a pickle")
    assert checkpoint_problem(garbled).startswith("corrupt checkpoint: .metadata is 12 bytes")
    truncated = make_checkpoint(tmp_path / "c")
    (data_file,) = truncated.glob("*.distcp")
    data_file.write_bytes(data_file.read_bytes()[:100])
    assert checkpoint_problem(truncated) == f"corrupt checkpoint: {data_file.name} is 100 bytes, {os.path.getsize(tmp_path / 'a' / data_file.name)} when saved"
    unlisted = make_checkpoint(tmp_path / "d")
    (unlisted / COMPLETE_MARKER).write_text(json.dumps({"step": 10, "layout": {"dp": 1, "cp": 1, "tp": 1}}))  # an older p3d's marker
    assert checkpoint_problem(unlisted).startswith("unverifiable checkpoint")


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", CONFIG_FILE, HF_CONFIG_FILE])
def test_a_file_damaged_in_place_is_named_and_a_missing_one_too(name, tmp_path):
    path = make_checkpoint(tmp_path / "step_00000010")
    damage(path / name)
    assert checkpoint_problem(path) is None  # same sizes: only the checksums see it
    assert verify_checkpoint(path) == f"corrupt checkpoint: {name} does not match the checksum recorded when it was saved (damaged since)"
    (path / name).unlink()
    assert verify_checkpoint(path) == f"corrupt checkpoint: {name} is missing"


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


def test_held_out_data_and_validation_can_change_on_resume(tmp_path):
    """data.eval_path is not part of the training data's position (the rest of data.* is)."""
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root / "step_00000010", tmp_path=tmp_path)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("held-out text\n")
    _, config, hf_config = configured(tmp_path, f"data.eval_path={held_out}", "eval.every=5")
    assert plan_resume(config, hf_config).changes == (f"data.eval_path: None -> {held_out}", "eval.every: 0 -> 5")


def test_where_the_token_cache_lives_can_change_on_resume(tmp_path):
    """data.cache_dir and data.tokenize_workers leave the training samples as they are."""
    make_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000010", tmp_path=tmp_path)
    _, config, hf_config = configured(tmp_path, f"data.cache_dir={tmp_path / 'shared'}", "data.tokenize_workers=3")
    assert plan_resume(config, hf_config).changes == (f"data.cache_dir: None -> {tmp_path / 'shared'}", "data.tokenize_workers: 0 -> 3")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.config.num_hidden_layers=3", "model.config.num_hidden_layers: 2 in checkpoint step_00000010, 3 now: that changes the model's parameter shapes"),
        ("model.config.hidden_size=128", "model.config.hidden_size: 64 in checkpoint step_00000010, 128 now: that changes the model's parameter shapes"),
        ("data.seq_len=64", "data.seq_len: 32 in checkpoint step_00000010, 64 now: the data position"),
        ("train.seed=1", "train.seed: 0 in checkpoint step_00000010, 1 now: the data position"),
        ("data.tokenizer=gpt2", "data.tokenizer: auto in checkpoint step_00000010, gpt2 now"),
        ("optim.name=muon", "optim.name: adamw in checkpoint step_00000010, muon now: the checkpoint holds adamw's optimizer state"),
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
        f"the newest intact one there is step_00000005: set checkpoint.load_from={good}"
    ]
    (good / ".metadata").write_bytes(b"\x80garbage")
    _, config, hf_config = configured(tmp_path, f"checkpoint.load_from={good}")
    with pytest.raises(ConfigError, match=r"checkpoint.load_from=.*: corrupt checkpoint: .metadata is 8 bytes, .* when saved; name an intact checkpoint directory \(there is none beside it\)"):
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


def test_a_damaged_newest_checkpoint_of_run_dir_is_skipped_for_the_newest_intact_one(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    intact = make_checkpoint(root / "step_00000005", step=5, tmp_path=tmp_path)
    damaged = [make_checkpoint(root / f"step_{step:08d}", step=step, tmp_path=tmp_path) for step in (10, 15)]
    damage(damaged[0] / "__0_0.distcp")
    (damaged[1] / ".metadata").unlink()
    _, config, hf_config = configured(tmp_path)
    plan = plan_resume(config, hf_config)
    assert plan.path == intact
    assert plan.notices == (
        f"checkpoint {damaged[1]} is damaged and is not loaded: corrupt checkpoint: .metadata is missing",
        f"checkpoint {damaged[0]} is damaged and is not loaded: corrupt checkpoint: __0_0.distcp does not match the checksum recorded when it was saved (damaged since)",
        f"resuming from the newest intact checkpoint {intact} instead: steps 6-15 are trained again",
    )
    damage(intact / CONFIG_FILE)
    with pytest.raises(ConfigError, match=r"checkpoint.resume: run.dir has no intact checkpoint \(checkpoint .*step_00000015 is damaged"):
        plan_resume(config, hf_config)
    _, config, hf_config = configured(tmp_path, "checkpoint.resume=false")
    assert plan_resume(config, hf_config).path is None


def test_a_damaged_load_from_is_one_line_naming_the_intact_checkpoint_to_use(tmp_path):
    other = tmp_path / "other" / "checkpoints"
    intact = make_checkpoint(other / "step_00000005", step=5, tmp_path=tmp_path)
    damaged = make_checkpoint(other / "step_00000010", tmp_path=tmp_path)
    damage(damaged / "__0_0.distcp")
    _, config, hf_config = configured(tmp_path, f"checkpoint.load_from={damaged}")
    with pytest.raises(ConfigError) as error:
        plan_resume(config, hf_config)
    assert error.value.problems == [
        f"checkpoint.load_from={damaged}: corrupt checkpoint: __0_0.distcp does not match the checksum recorded when it was saved "
        f"(damaged since); the newest intact one there is step_00000005: set checkpoint.load_from={intact}"
    ]
    with pytest.raises(ConfigError, match=f"cannot be used .*; the newest intact checkpoint there is {intact}: export that one by name"):
        resolve_checkpoint(tmp_path / "other")
    assert resolve_checkpoint(intact) == intact


def test_checkpoints_changed_under_the_same_data_path_are_refused_unless_accepted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\n" * 200)
    make_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000010", f"data.path={corpus}", tmp_path=tmp_path)
    _, config, hf_config = configured(tmp_path, f"data.path={corpus}")
    assert plan_resume(config, hf_config).changes == ()
    corpus.write_text("another document\n" * 200)
    with pytest.raises(ConfigError) as error:
        plan_resume(config, hf_config)
    (problem,) = error.value.problems
    assert problem.startswith(f"data.path={corpus}: the data changed since checkpoint step_00000010 (corpus.txt has 3400 bytes, 2600 then)")
    assert "set checkpoint.allow_data_change=true to resume on the new data anyway" in problem
    _, config, hf_config = configured(tmp_path, f"data.path={corpus}", "checkpoint.allow_data_change=true")
    assert plan_resume(config, hf_config).changes == (
        "checkpoint.allow_data_change: False -> True",
        f"the data behind data.path={corpus}: corpus.txt has 3400 bytes, 2600 then (checkpoint.allow_data_change=true)",
    )


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
    assert verify_checkpoint(path) is None and json.loads((path / COMPLETE_MARKER).read_text())["async"] is True
    restored, restored_state = nn.Linear(512, 512), TrainState()
    checkpointer.load(path, {"app": ModelAndOptimizer(restored, torch.optim.AdamW(restored.parameters())), "train": restored_state})
    assert torch.equal(restored.weight, expected) and restored_state.step == 3


@pytest.mark.parametrize("async_mode", [AsyncMode.disabled, AsyncMode.thread])
def test_the_marker_lists_every_file_with_the_checksum_of_its_bytes_taken_while_writing(async_mode, tmp_path, one_process_group, monkeypatch):
    from torch import nn

    from p3d.checkpoint import ModelAndOptimizer, TrainState

    model = nn.Linear(1024, 1024)  # 4 MB tensors: hashed on the helper thread while written
    fingerprint = {"kind": "builtin", "name": "test"}
    checkpointer = Checkpointer(
        tmp_path, CheckpointConfig(async_mode=async_mode), True, ParallelDims(1, 1, 1), "a: 1\n", "{}", info=lambda _: None, data_fingerprint=fingerprint
    )

    def no_reading_back(file):
        raise AssertionError(f"{file} read back during the save")

    monkeypatch.setattr(checkpoint_module, "file_checksum", no_reading_back)
    checkpointer.save(2, {"app": ModelAndOptimizer(model, torch.optim.AdamW(model.parameters())), "train": TrainState(step=2)})
    checkpointer.wait()
    monkeypatch.undo()
    path = checkpointer.path_for(2)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    on_disk = {str(file.relative_to(path)) for file in path.rglob("*") if file.is_file() and file.name != COMPLETE_MARKER}
    assert set(marker["files"]) == on_disk == {".metadata", "__0_0.distcp", CONFIG_FILE, HF_CONFIG_FILE, "rng/rank_00000.pt"}
    for name, record in marker["files"].items():
        assert record == {"size": (path / name).stat().st_size, "xxh3_128": file_checksum(path / name)}, name
    assert marker["checksum"] == "xxh3_128" and marker["data"] == fingerprint
    damage(path / "rng" / "rank_00000.pt")
    assert verify_checkpoint(path) == "corrupt checkpoint: rng/rank_00000.pt does not match the checksum recorded when it was saved (damaged since)"


def test_without_checksums_the_marker_keeps_the_sizes(tmp_path, one_process_group):
    from torch import nn

    from p3d.checkpoint import ModelAndOptimizer, TrainState

    model = nn.Linear(64, 64)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(checksums=False), True, ParallelDims(1, 1, 1), "a: 1\n", "{}", info=lambda _: None)
    checkpointer.save(1, {"app": ModelAndOptimizer(model, torch.optim.AdamW(model.parameters())), "train": TrainState(step=1)})
    path = checkpointer.path_for(1)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["checksum"] is None and all(record["xxh3_128"] is None and record["size"] > 0 for record in marker["files"].values())
    assert verify_checkpoint(path) is None
    (path / CONFIG_FILE).write_text("a: 2\n")  # same size: unseen without checksums, as documented
    assert verify_checkpoint(path) is None
    (path / CONFIG_FILE).write_text("a: 22\n")
    assert verify_checkpoint(path) == f"corrupt checkpoint: {CONFIG_FILE} is 6 bytes, 5 when saved"


def test_rank_0_marks_nothing_complete_while_a_rank_s_files_are_not_in_its_directory(tmp_path):
    (tmp_path / "__0_0.distcp").write_bytes(b"x" * 10)
    reports = [
        {"dir": str(tmp_path), "files": {"__0_0.distcp": {"size": 10}}},
        {"dir": "/elsewhere/step_00000001", "files": {"__1_0.distcp": {"size": 7}}},
    ]
    assert files_missing_from(tmp_path, reports) == (
        f"rank 1 wrote __1_0.distcp (7 bytes) into /elsewhere/step_00000001, and rank 0 does not see it in {tmp_path.resolve()}"
    )
    (tmp_path / "__1_0.distcp").write_bytes(b"x" * 3)
    assert "rank 0 sees 3 bytes" in files_missing_from(tmp_path, reports)
    (tmp_path / "__1_0.distcp").write_bytes(b"x" * 7)
    assert files_missing_from(tmp_path, reports) is None
