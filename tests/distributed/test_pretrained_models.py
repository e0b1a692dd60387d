"""`model=hf model.pretrained=<dir>`: a sharded Hugging Face checkpoint of any architecture trains with every
size from its config.json, each rank reading only its slices (fused q|k|v and Conv1D weights of GPT-2
included); the same losses at one process and tp2cp2; `p3d export` gives it back to transformers."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from p3d.models.tiny import shrink
from tests.conftest import assert_ok, layout_overrides, run_command, run_p3d
from tests.distributed.test_checkpoint import batch_at, mean_loss
from tests.distributed.test_parity import assert_parity

# Sizes p3d's tiny preset does not use, so a run can only get them from config.json.
OWN_SIZES = {"num_hidden_layers": 3, "vocab_size": 300}
RUN = ["model=hf", "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4", "data.seq_len=32", "checkpoint.every=2", "checkpoint.at_end=false"]


def save_checkpoint(arch: str, directory) -> None:
    """A randomly initialised model of `arch`, saved by transformers in several safetensors shards."""
    defaults = AutoConfig.for_model(arch)
    config = AutoConfig.for_model(arch, **{**shrink(defaults, layers=3), **OWN_SIZES})
    if arch != "gpt2":
        config.intermediate_size = 96
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="100KB")
    assert len(list(directory.glob("*.safetensors"))) > 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gpt2"])
def test_sharded_checkpoint_trains_alike_on_any_layout_and_exports(arch, tmp_path):
    checkpoint_dir = tmp_path / f"{arch}-checkpoint"
    save_checkpoint(arch, checkpoint_dir)
    overrides = [*RUN, f"model.pretrained={checkpoint_dir}"]
    one = run_p3d(tmp_path / "one", overrides)
    assert_ok(one)
    assert f"{arch}-checkpoint" in one.stdout  # named after the checkpoint
    sharded = run_p3d(tmp_path / "sharded", [*overrides, *layout_overrides(2, 1, 2)], nproc=4)
    assert_ok(sharded)
    assert_parity(sharded.losses, one.losses)  # the first loss depends on the loaded weights alone

    out_dir = tmp_path / "exported"
    done = run_command([sys.executable, "-m", "p3d.cli", "export", str(sharded.run_dir), str(out_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert exported.config.num_hidden_layers == 3 and exported.config.vocab_size == 300
    inputs, labels = batch_at(overrides, consumed=2 * 4)  # step 3's batch, trained from the step-2 weights
    with torch.no_grad():
        loss = mean_loss(exported(input_ids=inputs).logits, labels)
    assert abs(loss - sharded.losses[2]) < 1e-4
