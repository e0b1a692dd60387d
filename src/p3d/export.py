"""`p3d export <checkpoint> <out_dir>`: a p3d checkpoint as a Hugging Face model directory.

The model is rebuilt from the checkpoint's own hf_config.json (so it works from any directory
and without the run's presets), filled from the DCP files in one process without a process
group (DCP gathers every shard into full tensors), and written with `save_pretrained`
(safetensors, fp32 as trained) beside the tokenizer the run used:
- a Hugging Face tokenizer (the pretrained model's own, or data.tokenizer) is saved as it is;
- p3d's byte-level tokenizer has no Hugging Face counterpart, so an equivalent one is written:
  a byte-level BPE without merges whose ids are the UTF-8 bytes (0-255) and whose
  end-of-document token <|endoftext|> is id 256, exactly p3d's ids. (Only a document that
  contains that literal text would tokenize differently.)
The generation config names the tokenizer's end-of-text id (see `align_special_tokens`).
The output appears whole or not at all: it is written next to out_dir and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from transformers import PreTrainedModel

from p3d.checkpoint import CONFIG_FILE, HF_CONFIG_FILE, complete_checkpoints, newest_intact, read_marker, verify_checkpoint
from p3d.config.schema import DataConfig, InitMode, ModelConfig
from p3d.data import ByteTokenizer, HFTokenizer, build_tokenizer
from p3d.errors import ConfigError
from p3d.model import build_meta_model, initialize_random, retie_weights
from p3d.resume import load_hf_config

BYTE_EOS_TOKEN = "<|endoftext|>"


def resolve_checkpoint(source: Path, verb: str = "export") -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory; verified intact
    (every file's size and checksum as its marker recorded) before anything is read from it. `verb`
    names what the errors say it is for (export, generate from)."""
    if (source / "checkpoints").is_dir():
        found = complete_checkpoints(source / "checkpoints")
        if not found:
            raise ConfigError(f"{source}: this run directory has no complete checkpoint to {verb}")
        checkpoint = found[-1][1]
        problem = verify_checkpoint(checkpoint)
        if problem:
            raise ConfigError(f"{source}: its newest checkpoint {checkpoint.name} cannot be used ({problem}); {_intact_hint(checkpoint, verb)}")
        return checkpoint
    problem = verify_checkpoint(source)
    if problem:
        raise ConfigError(f"{source}: {problem}; {_intact_hint(source, verb)}")
    return source


def _intact_hint(checkpoint: Path, verb: str) -> str:
    intact = newest_intact(checkpoint.parent, other_than=checkpoint)
    if intact is None:
        return "name an intact checkpoint directory or a run directory (there is none beside it)"
    return f"the newest intact checkpoint there is {intact}: {verb} that one by name"


def export_checkpoint(source: Path, out_dir: Path) -> Path:
    checkpoint = resolve_checkpoint(source)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: already exists and is not empty; choose a new output directory")
    model = load_model(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)
    align_special_tokens(model, tokenizer)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    provenance = {"checkpoint": str(checkpoint.resolve()), "step": read_marker(checkpoint)["step"]}
    (partial / "p3d_export.json").write_text(json.dumps(provenance, indent=1) + "\n")
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    partial.rename(out_dir)
    return out_dir


def load_model(checkpoint: Path) -> PreTrainedModel:
    """The whole (unsharded) model of a checkpoint, on the CPU, in fp32."""
    hf_config = load_hf_config((checkpoint / HF_CONFIG_FILE).read_text())
    model = build_meta_model(hf_config)
    model.to_empty(device="cpu")
    retie_weights(model)
    initialize_random(model, hf_config, seed=0, buffers_only=True)  # non-persistent buffers (e.g. rotary) are not saved
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")  # "assuming the intent is to load in a single process"
        dcp.load({"app": {"model": state}}, checkpoint_id=str(checkpoint))
    model.eval()
    return model


def align_special_tokens(model: PreTrainedModel, tokenizer) -> None:
    """Make generation stop at the tokenizer's own end-of-text id. A model built from an architecture's
    defaults carries that architecture's ids (Llama's eos 2), which mean another token in another
    vocabulary (p3d's byte tokenizer ends a document with 256, and 2 is the byte 0x02). Ids the model
    already lists (a pretrained model's own, possibly several) are kept; padding takes the end id if
    nothing else is set."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return
    generation = model.generation_config
    listed = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    if eos not in listed:
        generation.eos_token_id = eos
        model.config.eos_token_id = eos
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


def checkpoint_tokenizer(checkpoint: Path):
    """The run's tokenizer as a Hugging Face tokenizer (see the module docstring)."""
    stored = OmegaConf.load(checkpoint / CONFIG_FILE)
    data_cfg = DataConfig(tokenizer=stored.data.tokenizer)
    model_cfg = ModelConfig(init=InitMode(stored.model.init), pretrained=stored.model.pretrained)
    tokenizer = build_tokenizer(data_cfg, model_cfg)
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tokenizer
    assert isinstance(tokenizer, ByteTokenizer)
    return byte_tokenizer()


def byte_tokenizer():
    """A Hugging Face tokenizer with p3d's byte-level ids: UTF-8 bytes 0-255, end-of-document 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[byte]: byte for byte in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BYTE_EOS_TOKEN, special=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=BYTE_EOS_TOKEN)
    assert tokenizer.eos_token_id == ByteTokenizer.eos_token_id and len(tokenizer) == ByteTokenizer.vocab_size
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}

