"""Which checkpoint a run starts from, and which config changes since it was saved are allowed.

Planned by every rank of a job once the process group exists and every rank has rank 0's
run.dir (the ranks share the checksum reading and reach the same answer, so a bad checkpoint is
one line on every rank, not a failed collective); `p3d train` plans once more before it spawns
workers, with the cheap checks only (markers, file sizes, config and data changes).

- The run's own newest intact checkpoint in run.dir is resumed (checkpoint.resume=true). A
  damaged one (a file missing, of another size, or not matching its checksum) is never loaded:
  the run names it and falls back to the newest intact one, saying which steps are redone.
- checkpoint.load_from names a checkpoint to start from; once run.dir has an intact checkpoint
  of its own at the same or a later step, that one wins, so restarts and reruns continue the
  run. A damaged or incomplete one named there is an error that names the intact one to use.
- Changes to the layout, step count, batch split, optimizer hyperparameters, logging, checkpointing and the
  like are listed and applied (a change of train.master_dtype converts the loaded weights and
  optimizer state). Changes that alter the model's parameter shapes are refused, so is another
  optimizer (optim.name: its state is not the saved one),
  and so are changes to the data (data.*, train.seed, or other files behind the same data.path
  unless checkpoint.allow_data_change): the data position counts samples of the checkpoint's
  data order, which another dataset, tokenizer, sequence length or seed would silently reinterpret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from transformers import AutoConfig, PretrainedConfig

from p3d.checkpoint import CONFIG_FILE, HF_CONFIG_FILE, checkpoint_problem, complete_checkpoints, newest_intact, read_marker, verify_checkpoint
from p3d.config.schema import P3DConfig
from p3d.data import data_fingerprint, fingerprint_change
from p3d.errors import ConfigError
from p3d.model import build_meta_model

# Keys whose change would make the saved data position point at other samples.
DATA_POSITION_KEYS = ("data", "train.seed")
# Data keys that leave the training samples as they are: the held-out documents of the validation
# pass, where the token cache lives and how many processes build it.
NOT_DATA_POSITION_KEYS = ("data.eval_path", "data.cache_dir", "data.tokenize_workers")
# Keys that may change what the model is; refused only when the parameter shapes change.
MODEL_KEYS = ("model.arch", "model.config", "model.init", "model.pretrained")
# Keys whose change would leave the saved optimizer state without a reader (another optimizer's
# state names and shapes); checkpoints of a p3d without optim.name were AdamW's.
OPTIMIZER_KEYS = {"optim.name": "adamw"}
# Keys whose change the load itself carries out (DCP casts each stored tensor to the new dtype).
CONVERTED_ON_LOAD = {"train.master_dtype": " (the weights and optimizer state are converted to it on load)"}

# path -> None if the checkpoint is intact, else why not (checkpoint.verify_checkpoint, or
# checkpoint.checkpoint_problem for the cheap checks alone).
Verify = Callable[[Path], "str | None"]


@dataclass(frozen=True)
class ResumePlan:
    path: Path | None = None
    changes: tuple[str, ...] = ()  # "optim.lr: 0.001 -> 0.0005", one per changed key
    notices: tuple[str, ...] = ()


def plan_resume(config: P3DConfig, hf_config: PretrainedConfig, verify: Verify = verify_checkpoint) -> ResumePlan:
    path, notices, fresh_hint = choose_checkpoint(config, verify)
    if path is None:
        return ResumePlan(notices=tuple(notices))
    changes = check_changes(path, config, hf_config, fresh_hint)
    return ResumePlan(path=path, changes=tuple(changes), notices=tuple(notices))


def visible_checkpoints(config: P3DConfig) -> tuple:
    """What this process sees of the checkpoints a plan can choose from (ranks compare it: run.dir
    must be storage that every node shares)."""
    own = [path.name for _, path in complete_checkpoints(Path(config.run.dir) / "checkpoints")] if config.checkpoint.resume else []
    load_from = config.checkpoint.load_from
    return tuple(own), None if load_from is None else checkpoint_problem(Path(load_from).expanduser()) is None


def choose_checkpoint(config: P3DConfig, verify: Verify) -> tuple[Path | None, list[str], str]:
    """(checkpoint to load or None, notices, how to start fresh instead)."""
    ckpt = config.checkpoint
    root = Path(config.run.dir) / "checkpoints"
    own = list(reversed(complete_checkpoints(root))) if ckpt.resume else []  # newest first
    explicit = Path(ckpt.load_from).expanduser() if ckpt.load_from is not None else None
    explicit_step = None
    if explicit is not None:
        problem = checkpoint_problem(explicit)  # the cheap checks first: no checksums read for a bad path
        if problem:
            raise ConfigError(f"checkpoint.load_from={ckpt.load_from}: {problem}; {intact_hint(explicit, verify)}")
        explicit_step = read_marker(explicit)["step"]
        newer_own = [path for step, path in own if step > explicit_step]
        if newer_own and explicit.resolve().parent == root.resolve():
            raise ConfigError(
                f"checkpoint.load_from={ckpt.load_from}: an older checkpoint of this run.dir, which has newer ones up to "
                f"{newer_own[0].name}; to go back to step {explicit_step}, use a new run.dir with this checkpoint.load_from"
            )
    own_hint = "start fresh with another run.dir or checkpoint.resume=false"
    load_hint = "start fresh with another run.dir and no checkpoint.load_from"
    notices: list[str] = []
    damaged_step = None
    for step, path in own:
        if explicit_step is not None and step < explicit_step:
            break  # checkpoint.load_from is newer than what is left of the run's own
        if explicit is not None and path.resolve() == explicit.resolve():
            break  # the same checkpoint: verified below as checkpoint.load_from
        problem = verify(path)
        if problem is None:
            if damaged_step is not None:
                notices.append(_fallback_notice(path, step, damaged_step))
            if explicit is not None:
                notices.append(f"checkpoint.load_from={ckpt.load_from} not used: run.dir has its own checkpoint {path.name} (step {step} >= {explicit_step})")
            return path, notices, own_hint
        notices.append(f"checkpoint {path} is damaged and is not loaded: {problem}")
        if damaged_step is None:
            damaged_step = step
    if explicit is not None:
        problem = verify(explicit)
        if problem:
            raise ConfigError(f"checkpoint.load_from={ckpt.load_from}: {problem}; {intact_hint(explicit, verify)}")
        if damaged_step is not None:
            notices.append(_fallback_notice(explicit, explicit_step, damaged_step))
        return explicit, notices, load_hint
    if damaged_step is not None:
        raise ConfigError(
            f"checkpoint.resume: run.dir has no intact checkpoint ({notices[0]}); set checkpoint.resume=false to start "
            f"fresh (its damaged checkpoints are replaced as the new run saves), or name one with checkpoint.load_from"
        )
    return None, notices, own_hint


def _fallback_notice(path: Path, step: int, damaged_step: int) -> str:
    redone = f"step {damaged_step} is" if damaged_step == step + 1 else f"steps {step + 1}-{damaged_step} are"
    return f"resuming from the newest intact checkpoint {path} instead: {redone} trained again"


def intact_hint(checkpoint: Path, verify: Verify) -> str:
    """What to name instead of a bad checkpoint: the newest intact one beside it, if any."""
    intact = newest_intact(checkpoint.parent, other_than=checkpoint, verify=verify)
    if intact is None:
        return "name an intact checkpoint directory (there is none beside it)"
    return f"the newest intact one there is {intact.name}: set checkpoint.load_from={intact}"


def check_changes(path: Path, config: P3DConfig, hf_config: PretrainedConfig, fresh_hint: str) -> list[str]:
    """The config changes since the checkpoint, one line each; ConfigError for refused ones."""
    stored = {**OPTIMIZER_KEYS, **flatten(OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE), resolve=True))}
    current = flatten(OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True))
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(P3DConfig), resolve=True, enum_to_str=True))
    stored = {**{key: value for key, value in defaults.items() if key not in stored and key in current}, **stored}  # keys added since: their defaults
    changed = {key: (stored.get(key, "<unset>"), current.get(key, "<unset>")) for key in sorted(stored.keys() | current.keys()) if stored.get(key) != current.get(key)}
    problems = [
        f"{key}: {old} in checkpoint {path.name}, {new} now: the data position counts samples of the checkpoint's data "
        f"order; set {key}={old} to resume, or {fresh_hint}"
        for key, (old, new) in changed.items()
        if _under(key, DATA_POSITION_KEYS) and not _under(key, NOT_DATA_POSITION_KEYS)
    ]
    problems += [
        f"{key}: {old} in checkpoint {path.name}, {new} now: the checkpoint holds {old}'s optimizer state, which {new} cannot "
        f"continue from; set {key}={old} to resume, or {fresh_hint}"
        for key, (old, new) in changed.items()
        if key in OPTIMIZER_KEYS
    ]
    data_change = None if problems else data_source_change(path, config)
    if data_change is not None and not config.checkpoint.allow_data_change:
        problems.append(
            f"data.path={config.data.path}: the data changed since checkpoint {path.name} ({data_change}), so the saved data "
            f"position would count other samples; set checkpoint.allow_data_change=true to resume on the new data anyway, "
            f"or {fresh_hint}"
        )
    problems += _shape_problems(path, hf_config, changed, fresh_hint)
    if problems:
        raise ConfigError(problems)
    accepted = [f"the data behind data.path={config.data.path}: {data_change} (checkpoint.allow_data_change=true)"] if data_change else []
    return [f"{key}: {old} -> {new}{CONVERTED_ON_LOAD.get(key, '')}" for key, (old, new) in changed.items()] + accepted


def data_source_change(path: Path, config: P3DConfig) -> str | None:
    """The same data.path, but other data behind it (replaced or edited files, another dataset revision)."""
    saved = read_marker(path).get("data")
    return None if saved is None else fingerprint_change(saved, data_fingerprint(config.data))


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
