"""Build a Hugging Face causal LM on the meta device and materialise only this rank's shards.

The model code stays plain transformers. p3d builds it on the meta device (no memory), the
parallel/ modules shard it, and only then does each rank allocate and fill its own shards:
- random init: every module is initialised at full size, one module at a time, with a seed
  derived from its name and `train.seed`, by the model's own `_init_weights`; each rank keeps
  only its slice. The full value of every parameter is thus the same on any layout.
- pretrained: each rank reads only its slice of every tensor from the checkpoint files
  (safetensors slicing, or memory-mapped torch files).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from p3d.config.schema import InitMode, ModelConfig
from p3d.errors import ConfigError
from p3d.compat import local_box
from p3d.models import architecture, tiny

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


# Sizes every decoder has under these standard names (transformers maps a model's own names, such as
# GPT-2's n_layer, onto them with `attribute_map`): a model.config override of one must be >= 1.
SIZE_FIELDS = (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "head_dim",
)


def build_hf_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """The Hugging Face config: the checkpoint's (init=pretrained) or `model.arch`'s defaults (shrunk with
    `model.tiny`), then `model.config` on top."""
    overrides = dict(model_cfg.config)
    if model_cfg.init is InitMode.pretrained:
        return _pretrained_with_overrides(model_cfg, overrides)
    if not model_cfg.arch:
        raise ConfigError("model.arch: set a Hugging Face model type (llama, gpt2, qwen3, ...) or model.init=pretrained with model.pretrained=<dir>")
    try:
        defaults = AutoConfig.for_model(model_cfg.arch)
    except ValueError as error:
        if "Unrecognized model identifier" not in str(error):
            raise ConfigError(f"model.arch={model_cfg.arch}: transformers cannot build its default config ({_last_line(error)})") from None
        raise ConfigError(f"model.arch={model_cfg.arch}: not a Hugging Face model type (e.g. llama, opt, mistral, qwen2)") from None
    except Exception as error:  # strict-dataclass validation of the defaults themselves
        raise ConfigError(f"model.arch={model_cfg.arch}: transformers cannot build its default config ({_last_line(error)})") from None
    _refuse_unknown_fields(defaults, overrides, model_cfg)
    _refuse_bad_numbers(defaults, overrides)
    layers = next((overrides[name] for name in tiny.LAYER_COUNT_FIELDS if isinstance(overrides.get(name), int)), None)
    values = {**(tiny.shrink(defaults, layers=layers) if model_cfg.tiny else {}), **overrides}
    # Passed to the constructor, not set afterwards, so that derived fields (Llama's head_dim from
    # hidden_size and num_attention_heads) follow the given sizes instead of the defaults'.
    try:
        config = AutoConfig.for_model(model_cfg.arch, **_without_stray_token_ids(defaults, values, overrides))
    except Exception as error:  # transformers validates configs with its own (strict-dataclass) errors
        named = [key for key in overrides if f"'{key}'" in str(error)] or list(overrides)  # the fields the error names, if any
        given = " ".join(f"model.config.{key}={overrides[key]}" for key in named) or f"model.arch={model_cfg.arch}"
        raise ConfigError(f"{given}: {type(defaults).__name__} refuses these values ({_last_line(error)})") from None
    _refuse_stray_token_ids(config, overrides)
    return config


def _without_stray_token_ids(defaults: PretrainedConfig, values: dict, overrides: dict) -> dict:
    """The architecture's default special-token ids (Phi-3's pad id 32000) mean nothing in a smaller
    vocabulary (and an out-of-range pad id breaks the embedding): dropped unless the user gave them."""
    vocab = values.get("vocab_size")
    if not isinstance(vocab, int):
        return values
    probe = copy.copy(defaults)
    probe.vocab_size = vocab
    stray = {key: None for key in tiny.out_of_vocabulary_token_ids(probe) if key not in overrides and key not in values}
    return {**values, **stray}


def _refuse_stray_token_ids(config: PretrainedConfig, overrides: dict) -> None:
    stray = tiny.out_of_vocabulary_token_ids(config)
    if stray:
        vocab = tiny.text_config(config).vocab_size
        given = ", ".join(f"model.config.{key}={value}" for key, value in stray.items())
        raise ConfigError(f"{given}: not below model.config.vocab_size={vocab}; set it to a smaller id or null")


def _pretrained_with_overrides(model_cfg: ModelConfig, overrides: dict) -> PretrainedConfig:
    """The checkpoint's config.json; `model.config` may change fields, never the checkpoint's shapes."""
    config = _pretrained_config(model_cfg.pretrained)
    if model_cfg.arch and model_cfg.arch != config.model_type:
        raise ConfigError(
            f"model.arch={model_cfg.arch}: model.pretrained={model_cfg.pretrained} is a '{config.model_type}' checkpoint; "
            f"use model=hf (which takes the architecture from the checkpoint) or model.arch={config.model_type}"
        )
    _refuse_unknown_fields(config, overrides, model_cfg)
    _refuse_bad_numbers(config, overrides)
    changed = copy.deepcopy(config)
    for key, value in overrides.items():  # these change dropout, rope scaling, ...
        setattr(changed, key, value)
    conflicts = _shape_changing_keys(config, overrides) if overrides else []
    if conflicts:
        given = ", ".join(f"model.config.{key}={overrides[key]} (config.json: {getattr(config, key, None)})" for key in conflicts)
        raise ConfigError(
            f"{given}: would change the shapes of model.pretrained={model_cfg.pretrained}'s weights; drop "
            f"{'it' if len(conflicts) == 1 else 'them'} (model=hf takes every size from the checkpoint)"
        )
    return changed


def _parameter_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in build_meta_model(config).named_parameters()}


def _shape_changing_keys(config: PretrainedConfig, overrides: dict) -> list[str]:
    original = _parameter_shapes(config)
    conflicts = []
    for key, value in overrides.items():
        if getattr(config, key, None) == value:
            continue
        changed = copy.deepcopy(config)
        setattr(changed, key, value)
        try:
            if _parameter_shapes(changed) != original:
                conflicts.append(key)
        except Exception:  # a value the model cannot even be built with changes its shapes too
            conflicts.append(key)
    return conflicts


def _refuse_bad_numbers(config: PretrainedConfig, overrides: dict) -> None:
    """Sizes (SIZE_FIELDS, under the model's own names too) must be whole numbers >= 1; floats finite."""
    standard_name = {own: standard for standard, own in getattr(config, "attribute_map", {}).items()}
    problems = []
    for key, value in overrides.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if standard_name.get(key, key) in SIZE_FIELDS and value is not None and not (isinstance(value, int) and is_number and value >= 1):
            problems.append(f"model.config.{key}={value}: must be a whole number >= 1")
        elif is_number and not math.isfinite(value):
            problems.append(f"model.config.{key}={value}: must be a finite number")
    if problems:
        raise ConfigError(problems)


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _refuse_unknown_fields(config: PretrainedConfig, overrides: dict, model_cfg: ModelConfig) -> None:
    extra = architecture(config).extra_config_fields
    unknown = sorted(key for key in overrides if not hasattr(config, key) and key not in extra)
    if unknown:
        hint = ""
        if model_cfg.name and not model_cfg.tiny and model_cfg.init is InitMode.random:
            hint = f"; if the preset model={model_cfg.name} is for another architecture, use model=tiny model.arch={config.model_type}"
        raise ConfigError(
            f"model.config.{unknown[0]}: not a field of {type(config).__name__}"
            + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
            + hint
        )


def _pretrained_config(source: str | None) -> PretrainedConfig:
    if not source:
        raise ConfigError("model.init=pretrained: set model.pretrained=<local directory or hub id>")
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise ConfigError(f"model.pretrained={source}: no such directory")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(source))
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"model.pretrained={source}: cannot read its config ({reason}); point it at a local copy") from None


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).exists()


def build_meta_model(hf_config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The whole model on the meta device: shapes and structure, no memory.

    Each model gets its own copy of the config: transformers writes the attention
    implementation into it, and context parallelism changes that per model. `dtype` is the
    parameters' (transformers keeps buffers such as rotary frequencies in fp32).
    """
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation="sdpa", dtype=dtype)
        except ValueError as error:  # models without an SDPA path (Mamba, older encoders) run their eager one
            if "attention implementation" not in str(error) and "scaled_dot_product_attention" not in str(error):
                raise
            return AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation="eager", dtype=dtype)


def build_checked_meta_model(hf_config: PretrainedConfig) -> PreTrainedModel:
    """build_meta_model for validation: a model transformers cannot build, or one with an empty weight
    (a size of 0 somewhere in model.config), is a ConfigError naming model.config."""
    name = type(hf_config).__name__
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # reported below as the error
            model = build_meta_model(hf_config)
    except Exception as error:  # the model's own code fails on sizes its config accepted
        raise ConfigError(f"model.config: transformers cannot build {name}'s model (model.arch={hf_config.model_type}) from this config ({type(error).__name__}: {_last_line(error)[:200]}); check the model.config values") from None
    empty = next(((key, tuple(param.shape)) for key, param in model.named_parameters() if param.numel() == 0), None)
    if empty is not None:
        raise ConfigError(f"model.config: {empty[0]} has shape {empty[1]} with no elements; a size in model.config is 0, give it a value >= 1")
    return model


def retie_weights(model: PreTrainedModel) -> None:
    """Re-point every tied weight at one parameter again, as transformers tied them when it built the model.

    Sharding (TP, FSDP) and `to_empty` replace parameter objects, which unties what shared one.
    Transformers' own mapping (target -> source, from each sub-model's config) says what to tie; the
    text config's `tie_word_embeddings` alone is not enough: a composite model (MOSS-Transcribe-Diarize's
    language model inside an audio model) ties its head by its top-level config. Where tensor
    parallelism sharded only one of a pair (BERT's decoder bias, tied to a bias of a module no TP
    style touches), the sharded one is kept for both."""
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        kept, replaced = model.get_parameter(source), target
        if isinstance(model.get_parameter(target), DTensor) and not isinstance(kept, DTensor):
            kept, replaced = model.get_parameter(target), source
        parent_name, _, leaf = replaced.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, kept)


@dataclass
class _Target:
    """Where a full tensor of the reference model lands in the (sharded) training model."""

    tensor: torch.Tensor

    def write(self, full: torch.Tensor) -> None:
        """Keep this rank's slice of the full tensor."""
        self.write_local(full[local_box(self.tensor)])

    def write_local(self, values: torch.Tensor) -> None:
        """Fill this rank's shard with values already sliced to it."""
        local = self.tensor.to_local() if isinstance(self.tensor, DTensor) else self.tensor
        local.copy_(values)


def _targets(model: nn.Module) -> dict[str, _Target]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {name: _Target(tensor) for name, tensor in named.items()}


def _module_seed(seed: int, module_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_owner(reference: PreTrainedModel, module_name: str) -> PreTrainedModel:
    """The innermost PreTrainedModel containing the module (composite models init per sub-model)."""
    owner, owner_name = reference, ""
    for name, module in reference.named_modules():
        if isinstance(module, PreTrainedModel) and len(name) > len(owner_name) and (module_name + ".").startswith(name + "."):
            owner, owner_name = module, name
    return owner


@torch.no_grad()
def initialize_random(model: nn.Module, hf_config: PretrainedConfig, seed: int, buffers_only: bool = False) -> None:
    """Fill `model` (already sharded and materialised) with a layout-independent random init."""
    reference = build_meta_model(hf_config)
    targets = _targets(model)
    written: set[int] = set()  # a tied weight is filled once, by the first module that owns it
    for module_name, ref_module in reference.named_modules():
        names = [name for name, _ in ref_module.named_buffers(recurse=False)]
        if not buffers_only:
            names += [name for name, _ in ref_module.named_parameters(recurse=False)]
        destinations = {}
        for name in names:
            target = targets.get(f"{module_name}.{name}" if module_name else name)
            if target is not None and id(target.tensor) not in written:
                destinations[name] = target
        if not destinations:
            continue
        ref_module.to_empty(device="cpu", recurse=False)
        full = dict(ref_module.named_buffers(recurse=False)) | dict(ref_module.named_parameters(recurse=False))
        for tensor in full.values():  # a sentinel: what _init_weights leaves untouched is still NaN after it
            if tensor.is_floating_point():
                tensor.detach().fill_(float("nan"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_module_seed(seed, module_name))
            _init_owner(reference, module_name)._init_weights(ref_module)
        for name, target in destinations.items():
            if full[name].is_floating_point() and full[name].numel() and torch.isnan(full[name]).all():
                continue  # not this module's to initialise (a tied weight another owner initialises)
            target.write(full[name])
            written.add(id(target.tensor))
        ref_module.to_empty(device="meta", recurse=False)
    _zero_what_no_init_set(targets, written, buffers_only)


@torch.no_grad()
def _zero_what_no_init_set(targets: dict[str, "_Target"], written: set[int], buffers_only: bool) -> None:
    """A parameter no module's `_init_weights` sets (Data2VecText's tied LM-head bias: transformers zeroes it in
    the constructor, which a meta-device build skips) starts at zero, not at uninitialised memory."""
    for name, target in targets.items():
        if id(target.tensor) in written or (buffers_only and isinstance(target.tensor, nn.Parameter)):
            continue
        if target.tensor.is_floating_point():
            target.write_local(torch.zeros_like(target.tensor.to_local() if isinstance(target.tensor, DTensor) else target.tensor))
            written.add(id(target.tensor))


def materialize(model: PreTrainedModel, model_cfg: ModelConfig, hf_config: PretrainedConfig, seed: int, device: torch.device) -> None:
    """Allocate this rank's shards on `device` and fill them (random init or the checkpoint)."""
    model.to_empty(device=device)
    retie_weights(model)
    if model_cfg.init is InitMode.pretrained:
        initialize_random(model, hf_config, seed, buffers_only=True)
        load_pretrained_shards(model, resolve_pretrained_dir(model_cfg.pretrained))
    else:
        initialize_random(model, hf_config, seed)


def resolve_pretrained_dir(source: str) -> Path:
    """A local directory holding the checkpoint (downloaded from the hub if `source` is a hub id)."""
    local = Path(os.path.expanduser(source))
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many types; all mean "not reachable here"
        raise ConfigError(f"model.pretrained={source}: not a local directory and the hub is unreachable ({type(error).__name__}); use a local copy") from None


class _CheckpointReader:
    """Reads slices of named tensors from a Hugging Face checkpoint directory without loading it whole."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.key_to_file = self._index(directory)
        self._stack = ExitStack()
        self._open: dict[str, object] = {}

    @staticmethod
    def _index(directory: Path) -> dict[str, str]:
        for name in WEIGHT_FILES:
            path = directory / name
            if not path.exists():
                continue
            if name.endswith(".index.json"):
                return dict(json.loads(path.read_text())["weight_map"])
            return {key: name for key in _keys_of(path)}
        raise ConfigError(f"model.pretrained={directory}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")

    def read(self, key: str, box: tuple[slice, ...]) -> torch.Tensor:
        handle = self._handle(self.key_to_file[key])
        if isinstance(handle, dict):
            return handle[key][box]
        return handle.get_slice(key)[box]

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self.key_to_file[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def _handle(self, file_name: str):
        if file_name not in self._open:
            path = self.directory / file_name
            if file_name.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file_name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            else:
                self._open[file_name] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file_name]

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key


@torch.no_grad()
def load_pretrained_shards(model: PreTrainedModel, directory: Path) -> None:
    """Copy each parameter's local slice from the checkpoint; missing or unexpected keys are an error."""
    reader = _CheckpointReader(directory)
    prefix = model.base_model_prefix
    by_normalised = {_strip_prefix(key, prefix): key for key in reader.key_to_file}
    used: set[str] = set()
    missing: list[str] = []
    try:
        for name, param in model.named_parameters():  # remove_duplicate: a tied weight once
            key = by_normalised.get(_strip_prefix(name, prefix))
            if key is None:
                missing.append(name)
                continue
            if reader.shape(key) != tuple(param.shape):
                raise ConfigError(
                    f"model.pretrained={directory}: '{key}' has shape {reader.shape(key)} but the model expects "
                    f"{tuple(param.shape)} (do model.config overrides change the shape?)"
                )
            _Target(param).write_local(reader.read(key, local_box(param)))
            used.add(key)
    finally:
        reader.close()
    arch = architecture(model.config)
    unexpected = sorted(k for k in reader.key_to_file if k not in used and not arch.is_recomputed_checkpoint_key(k))
    problems = []
    if missing:
        problems.append(f"model.pretrained={directory}: checkpoint lacks {len(missing)} weights: {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"model.pretrained={directory}: checkpoint has {len(unexpected)} unexpected weights: {', '.join(unexpected[:8])}")
    if problems:
        raise ConfigError(problems)

