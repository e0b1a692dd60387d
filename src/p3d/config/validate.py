"""One validation pass before any process group exists: every problem is one line naming its keys."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from p3d.config.schema import CPImpl, CPLayout, DType, P3DConfig, Packing, bounds_of, range_problem
from p3d.data import build_tokenizer, check_data_source, check_eval_source
from p3d.distributed.env import NEEDS_GLIBC, accelerate_problems, backend_problems, glibc_mallopt, resolve_device_type
from p3d.distributed.mesh import ParallelDims
from p3d.errors import ConfigError
from p3d.metrics import wandb_credentials_problem
from p3d.model import build_checked_meta_model, build_hf_config
from p3d.models import architecture, tiny
from p3d.optim import optimizer_problems, schedule_problems
from p3d.parallel.context import resolve_cp_impl, uses_p3d_attention
from p3d.parallel.sequence import sequence_parallel_problems
from p3d.parallel.tensor import resolve_plan
from p3d.parallel.vocab import vocab_parallel_problems


@dataclass(frozen=True)
class ValidatedSetup:
    """What validation established, handed on to the run so nothing is derived twice."""

    dims: ParallelDims
    hf_config: PretrainedConfig
    tp_plan: dict[str, str]
    cp_impl: CPImpl  # resolved: never auto
    plan_source: str = "model.tp_plan"  # where tp_plan comes from: model.tp_plan, p3d, transformers or inferred


def validate(config: P3DConfig, world_size: int) -> ValidatedSetup:
    """Check the whole config against the world size; raise one ConfigError listing every problem."""
    problems = _check_ranges(config)
    if problems:
        raise ConfigError(problems)  # every check below assumes its numbers are in range
    parallel = config.parallel
    dims = _collect(problems, lambda: ParallelDims.resolve(parallel.dp, parallel.cp, parallel.tp, world_size, parallel.ep, parallel.dp_replicate, parallel.dp_shard))
    problems += _check_options(config)
    dp = dims.dp if dims else max(config.parallel.dp, 1)
    problems += _check_batch(config, dp)
    problems += optimizer_problems(config.optim, config.train.master_dtype)
    problems += schedule_problems(config.optim, config.train.steps)
    problems += _check_sequence(config)
    problems += check_data_source(config.data)
    problems += check_eval_source(config.data, config.eval.every)
    problems += _check_run_dir(config.run.dir)
    device_type = _collect(problems, lambda: resolve_device_type(config.dist.device))
    if device_type is not None:
        problems += backend_problems(config.dist.backend, device_type)
    problems += accelerate_problems()
    cp_impl = resolve_cp_impl(config.parallel.cp_impl, device_type or "cpu", config.data.packing)
    problems += _check_cp_impl(config, cp_impl, device_type)
    hf_config = _collect(problems, lambda: build_hf_config(config.model))
    tp_plan: dict[str, str] = {}
    plan_source = "model.tp_plan"
    meta_model = None
    if hf_config is not None:
        problems += _check_vocab(config, hf_config)
        meta_model = _collect(problems, lambda: build_checked_meta_model(hf_config))
    if meta_model is not None:
        arch = architecture(hf_config)
        problems += arch.position_problems(hf_config, config.data.seq_len)
        problems += _check_attention_for_cp(hf_config, config, cp_impl)
        choice = arch.plan(meta_model)
        plan_source = choice.source if config.model.tp_plan == "auto" else "model.tp_plan"
        tp_plan = _collect(problems, lambda: resolve_plan(config.model.tp_plan, choice.plan)) or {}
        problems += arch.tensor_parallel_problems(meta_model, choice, tp_plan, config.parallel.tp)
        problems += arch.expert_parallel_problems(meta_model, config.parallel.ep)
        problems += _check_router_loss(hf_config)
        if config.parallel.vocab_parallel:
            problems += vocab_parallel_problems(meta_model, config.parallel.dp_replicate)
        if config.parallel.sequence_parallel:
            local_seq_len = config.data.seq_len // config.parallel.cp
            problems += sequence_parallel_problems(hf_config, meta_model, tp_plan, config.parallel.tp, local_seq_len)
    if problems:
        raise ConfigError(problems)
    return ValidatedSetup(dims=dims, hf_config=hf_config, tp_plan=tp_plan, cp_impl=cp_impl, plan_source=plan_source)


def _collect(problems: list[str], make):
    try:
        return make()
    except ConfigError as error:
        problems.extend(error.problems)
        return None


def _check_ranges(config: P3DConfig) -> list[str]:
    """Every number against its range in the schema (and finite): one line per key out of range."""
    problems = []
    for section in dataclasses.fields(config):
        group = getattr(config, section.name)
        for item in dataclasses.fields(group):
            problem = range_problem(f"{section.name}.{item.name}", getattr(group, item.name), bounds_of(item))
            if problem:
                problems.append(problem)
    return problems


def _check_options(config: P3DConfig) -> list[str]:
    problems = _check_logging_packages(config)
    wandb_problem = wandb_credentials_problem(config.logging)
    if wandb_problem and not problems:  # without the package, installing it comes first
        problems.append(wandb_problem)
    if config.dist.cpu_return_freed_memory and glibc_mallopt() is None:
        problems.append(NEEDS_GLIBC)
    if config.train.master_dtype is DType.bf16 and config.train.dtype is not DType.bf16:
        problems.append("train.master_dtype=bf16 stores bf16 weights, which compute in bf16: set train.dtype=bf16 (or train.master_dtype=fp32)")
    if config.optim.in_backward and config.optim.grad_clip > 0:
        problems.append("optim.in_backward=true has no global gradient norm before the updates: set optim.grad_clip=0")
    return problems


def _check_run_dir(run_dir: str | None) -> list[str]:
    """run.dir must be a directory, or creatable, on storage that takes new files (tried, so that it also
    holds for root, whom permission bits do not stop, on read-only or special filesystems)."""
    if run_dir is None:
        return []
    path = Path(run_dir).expanduser().absolute()
    existing = path
    while not os.path.exists(existing):  # False also where a parent cannot be searched: the probe below tells
        existing = existing.parent
    if not existing.is_dir():
        what = "is an existing file" if existing == path else f"cannot be created: {existing} is a file"
        return [f"run.dir={run_dir}: {what}, not a directory; choose another run.dir"]
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".p3d-write-test-", dir=existing))
    except OSError as error:
        return [f"run.dir={run_dir}: cannot write in {existing} ({error.strerror}); choose a run.dir on writable storage"]
    return []


def _check_logging_packages(config: P3DConfig) -> list[str]:
    import importlib.util

    needed = {"logging.tensorboard": ("tensorboard", config.logging.tensorboard), "logging.wandb": ("wandb", config.logging.wandb)}
    return [
        f"{key}=true needs the {package} package: pip install {package}"
        for key, (package, enabled) in needed.items()
        if enabled and importlib.util.find_spec(package) is None
    ]


def _check_batch(config: P3DConfig, dp: int) -> list[str]:
    train = config.train
    if train.global_batch_size < 1 or train.micro_batch_size < 1:
        return []
    if train.global_batch_size % (train.micro_batch_size * dp):
        return [
            f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size*dp = "
            f"{train.micro_batch_size}*{dp}: make it a multiple of {train.micro_batch_size * dp}"
        ]
    if config.optim.in_backward and train.global_batch_size != train.micro_batch_size * dp:
        return [
            f"optim.in_backward=true updates weights during backward, so it cannot accumulate gradients: set "
            f"train.micro_batch_size={train.global_batch_size // dp} (= train.global_batch_size / dp)"
        ]
    return []


def _check_sequence(config: P3DConfig) -> list[str]:
    cp, seq_len = config.parallel.cp, config.data.seq_len
    chunks = 2 * cp if config.parallel.cp_layout is CPLayout.balanced else cp
    if cp > 1 and seq_len % chunks:
        return [
            f"data.seq_len={seq_len} is not divisible by {chunks} (parallel.cp={cp} with parallel.cp_layout="
            f"{config.parallel.cp_layout.value} splits it into {chunks} chunks): use a multiple of {chunks}"
        ]
    return []


def _check_cp_impl(config: P3DConfig, cp_impl: CPImpl, device_type: str | None) -> list[str]:
    """PyTorch's CP attention runs CUDA flash / efficient SDPA kernels, plain causal only."""
    if cp_impl is not CPImpl.torch or not uses_p3d_attention(config.parallel.cp, config.data.packing):
        return []
    if config.data.packing is Packing.documents:
        return ["parallel.cp_impl=torch: PyTorch's CP attention is plain causal and cannot keep packed documents apart (data.packing=documents); use parallel.cp_impl=ring"]
    if device_type is not None and device_type != "cuda":
        return [f"parallel.cp_impl=torch needs CUDA (its flash / efficient SDPA kernels have no {device_type} version); use parallel.cp_impl=ring or auto"]
    return []


def _check_attention_for_cp(hf_config: PretrainedConfig, config: P3DConfig, cp_impl: CPImpl) -> list[str]:
    """p3d's attention (CP, packed documents) must give the model's own results: the models seam probes it."""
    cp, packing = config.parallel.cp, config.data.packing
    if not uses_p3d_attention(cp, packing):
        return []
    why = f"parallel.cp={cp}" if cp > 1 else f"data.packing={packing.value}"
    fix = "use parallel.cp=1" if cp > 1 else "use data.packing=stream"
    arch = architecture(hf_config)
    problems = arch.context_parallel_problems(hf_config, why, fix, packing is Packing.documents)
    if not problems and cp_impl is CPImpl.torch and not arch.attention_is_plain_causal(hf_config):
        problems.append(f"parallel.cp_impl=torch runs plain causal attention; model.arch={hf_config.model_type} uses sliding windows, softcapping or sinks: use parallel.cp_impl=ring")
    return problems


def _check_router_loss(hf_config: PretrainedConfig) -> list[str]:
    """p3d computes the loss from the logits itself; the model's load-balancing loss is not added (yet)."""
    if getattr(hf_config.get_text_config(), "output_router_logits", False):
        return ["model.config.output_router_logits=true: p3d does not add the model's load-balancing (auxiliary) loss; set it to false"]
    return []


def _check_vocab(config: P3DConfig, hf_config: PretrainedConfig) -> list[str]:
    tokenizer = _collect(problems := [], lambda: build_tokenizer(config.data, config.model))
    if tokenizer is None:
        return problems
    vocab = getattr(tiny.text_config(hf_config), "vocab_size", None)  # a composite config with several text parts (MusicGen) has none
    if isinstance(vocab, int) and tokenizer.vocab_size > vocab:
        return [
            f"model.config.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"(data.tokenizer={config.data.tokenizer}): raise model.config.vocab_size"
        ]
    return []
