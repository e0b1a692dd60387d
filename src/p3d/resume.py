"""Which checkpoint a run starts from, and which config changes since it was saved are allowed.

Checked on every rank before any process group exists (and by `p3d train` before it spawns
workers), so a bad checkpoint or a refused change is one line, not a failed collective.

- The run's own newest complete checkpoint in run.dir is resumed (checkpoint.resume=true).
- checkpoint.load_from names a checkpoint to start from; once run.dir has a checkpoint of its
  own at the same or a later step, that one wins, so restarts and reruns continue the run.
- Changes to the layout, step count, batch split, optimizer, logging, checkpointing and the
  like are listed and applied (a change of train.master_dtype converts the loaded weights and
  optimizer state). Changes that alter the model's parameter shapes are refused, and so are
  changes to the data (data.*, train.seed): the data position counts samples of the
  checkpoint's data order, which another dataset, tokenizer, sequence length or seed would
  silently reinterpret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import AutoConfig, PretrainedConfig

from p3d.checkpoint import CONFIG_FILE, HF_CONFIG_FILE, checkpoint_problem, complete_checkpoints, read_marker
from p3d.config.schema import P3DConfig
from p3d.errors import ConfigError
from p3d.model import build_meta_model

# Keys whose change would make the saved data position point at other samples.
DATA_POSITION_KEYS = ("data", "train.seed")
# Keys that may change what the model is; refused only when the parameter shapes change.
MODEL_KEYS = ("model.arch", "model.config", "model.init", "model.pretrained")
# Keys whose change the load itself carries out (DCP casts each stored tensor to the new dtype).
CONVERTED_ON_LOAD = {"train.master_dtype": " (the weights and optimizer state are converted to it on load)"}


@dataclass(frozen=True)
class ResumePlan:
    path: Path | None = None
    changes: tuple[str, ...] = ()  # "optim.lr: 0.001 -> 0.0005", one per changed key
    notices: tuple[str, ...] = ()


def plan_resume(config: P3DConfig, hf_config: PretrainedConfig) -> ResumePlan:
    path, notices, fresh_hint = choose_checkpoint(config)
    if path is None:
        return ResumePlan(notices=tuple(notices))
    changes = check_changes(path, config, hf_config, fresh_hint)
    return ResumePlan(path=path, changes=tuple(changes), notices=tuple(notices))


def choose_checkpoint(config: P3DConfig) -> tuple[Path | None, list[str], str]:
    """(checkpoint to load or None, notices, how to start fresh instead)."""
    ckpt = config.checkpoint
    root = Path(config.run.dir) / "checkpoints"
    own = None
    if ckpt.resume:
        found = complete_checkpoints(root)
        own = found[-1][1] if found else None
    if own is not None:
        problem = checkpoint_problem(own)
        if problem:
            raise ConfigError(
                f"checkpoint.resume: run.dir's newest checkpoint {own} cannot be used ({problem}); delete that "
                f"directory to resume from the one before it, or set checkpoint.resume=false to start fresh"
            )
    own_hint = "start fresh with another run.dir or checkpoint.resume=false"
    if ckpt.load_from is None:
        return own, [], own_hint
    explicit = Path(ckpt.load_from).expanduser()
    problem = checkpoint_problem(explicit)
    if problem:
        complete = [path.name for _, path in complete_checkpoints(explicit.parent)]
        others = f" (complete ones there: {', '.join(complete)})" if complete else ""
        raise ConfigError(f"checkpoint.load_from={ckpt.load_from}: {problem}; name a complete checkpoint directory{others}")
    load_hint = "start fresh with another run.dir and no checkpoint.load_from"
    if own is None or own.resolve() == explicit.resolve():
        return explicit, [], load_hint
    own_step, explicit_step = read_marker(own)["step"], read_marker(explicit)["step"]
    if own_step < explicit_step:
        return explicit, [], load_hint
    if explicit.resolve().parent == root.resolve():
        raise ConfigError(
            f"checkpoint.load_from={ckpt.load_from}: an older checkpoint of this run.dir, which has newer ones up to "
            f"{own.name}; to go back to step {explicit_step}, use a new run.dir with this checkpoint.load_from"
        )
    notice = f"checkpoint.load_from={ckpt.load_from} not used: run.dir has its own checkpoint {own.name} (step {own_step} >= {explicit_step})"
    return own, [notice], own_hint


def check_changes(path: Path, config: P3DConfig, hf_config: PretrainedConfig, fresh_hint: str) -> list[str]:
    """The config changes since the checkpoint, one line each; ConfigError for refused ones."""
    stored = flatten(OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE), resolve=True))
    current = flatten(OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True))
    changed = {key: (stored.get(key, "<unset>"), current.get(key, "<unset>")) for key in sorted(stored.keys() | current.keys()) if stored.get(key) != current.get(key)}
    problems = [
        f"{key}: {old} in checkpoint {path.name}, {new} now: the data position counts samples of the checkpoint's data "
        f"order; set {key}={old} to resume, or {fresh_hint}"
        for key, (old, new) in changed.items()
        if _under(key, DATA_POSITION_KEYS)
    ]
    problems += _shape_problems(path, hf_config, changed, fresh_hint)
    if problems:
        raise ConfigError(problems)
    return [f"{key}: {old} -> {new}{CONVERTED_ON_LOAD.get(key, '')}" for key, (old, new) in changed.items()]


def _shape_problems(path: Path, hf_config: PretrainedConfig, changed: dict[str, tuple], fresh_hint: str) -> list[str]:
    stored_text = (path / HF_CONFIG_FILE).read_text()
    if json.loads(stored_text) == json.loads(hf_config_json(hf_config)):
        return []
    saved, wanted = parameter_shapes(load_hf_config(stored_text)), parameter_shapes(hf_config)
    if saved == wanted:
        return []
    differing = sorted(name for name in saved.keys() | wanted.keys() if saved.get(name) != wanted.get(name))
    first = differing[0]
    detail = f"{first}: {saved.get(first, 'absent')} saved, {wanted.get(first, 'absent')} now"
    model_keys = [key for key in changed if _under(key, MODEL_KEYS)] or ["model"]
    key = next((k for k in model_keys if k.startswith("model.config.")), model_keys[0])
    old, new = changed.get(key, ("the checkpoint's model", "another"))
    return [f"{key}: {old} in checkpoint {path.name}, {new} now: that changes the model's parameter shapes ({detail}); set {key}={old} to resume, or {fresh_hint}"]


def hf_config_json(hf_config: PretrainedConfig) -> str:
    return hf_config.to_json_string(use_diff=False)


def load_hf_config(text: str) -> PretrainedConfig:
    values = json.loads(text)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def parameter_shapes(hf_config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in build_meta_model(hf_config).state_dict().items()}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)
