"""One validation pass before any process group exists: every problem is one line naming its keys."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from p3d.config.schema import CPLayout, P3DConfig
from p3d.data import build_tokenizer, check_data_source
from p3d.distributed.mesh import ParallelDims
from p3d.errors import ConfigError
from p3d.model import build_hf_config, build_meta_model
from p3d.parallel.tensor import check_plan, resolve_plan


@dataclass(frozen=True)
class ValidatedSetup:
    """What validation established, handed on to the run so nothing is derived twice."""

    dims: ParallelDims
    hf_config: PretrainedConfig
    tp_plan: dict[str, str]


def validate(config: P3DConfig, world_size: int) -> ValidatedSetup:
    """Check the whole config against the world size; raise one ConfigError listing every problem."""
    problems: list[str] = []
    dims = _collect(problems, lambda: ParallelDims.resolve(config.parallel.dp, config.parallel.cp, config.parallel.tp, world_size))
    problems += _check_positive(config)
    dp = dims.dp if dims else max(config.parallel.dp, 1)
    problems += _check_batch(config, dp)
    problems += _check_sequence(config)
    problems += check_data_source(config.data)
    hf_config = _collect(problems, lambda: build_hf_config(config.model))
    tp_plan: dict[str, str] = {}
    if hf_config is not None:
        problems += _check_heads(hf_config, config.parallel.tp)
        problems += _check_positions(hf_config, config)
        problems += _check_attention_for_cp(hf_config, config.parallel.cp)
        meta_model = build_meta_model(hf_config)
        tp_plan = _collect(problems, lambda: resolve_plan(config.model.tp_plan, meta_model)) or {}
        problems += check_plan(tp_plan, meta_model, config.parallel.tp)
        problems += _check_vocab(config, hf_config)
    if problems:
        raise ConfigError(problems)
    return ValidatedSetup(dims=dims, hf_config=hf_config, tp_plan=tp_plan)


def _collect(problems: list[str], make):
    try:
        return make()
    except ConfigError as error:
        problems.extend(error.problems)
        return None


def _check_positive(config: P3DConfig) -> list[str]:
    values = {
        "train.steps": config.train.steps,
        "train.global_batch_size": config.train.global_batch_size,
        "train.micro_batch_size": config.train.micro_batch_size,
        "data.seq_len": config.data.seq_len,
        "logging.every": config.logging.every,
        "train.ac_every": config.train.ac_every,
    }
    problems = [f"{key}={value}: must be >= 1" for key, value in values.items() if value < 1]
    if config.logging.peak_tflops is not None and config.logging.peak_tflops <= 0:
        problems.append(f"logging.peak_tflops={config.logging.peak_tflops}: must be > 0 (or null)")
    if config.checkpoint.every < 0:
        problems.append(f"checkpoint.every={config.checkpoint.every}: must be >= 0 (0 disables periodic saves)")
    if config.checkpoint.keep_last < 0:
        problems.append(f"checkpoint.keep_last={config.checkpoint.keep_last}: must be >= 0 (0 keeps every checkpoint)")
    if config.optim.lr <= 0:
        problems.append(f"optim.lr={config.optim.lr}: must be > 0")
    problems += _check_logging_packages(config)
    if config.train.compile and config.parallel.tp > 1:
        # Measured with torch 2.13 on CPU: compiled TP blocks fail in DTensor's backward without
        # FSDP, and give losses that differ from one process with it.
        problems.append("train.compile=true does not work with tensor parallelism on this PyTorch (2.13): use parallel.tp=1 or train.compile=false")
    if config.optim.in_backward and config.optim.grad_clip > 0:
        problems.append("optim.in_backward=true has no global gradient norm before the updates: set optim.grad_clip=0")
    return problems


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


def _check_heads(hf_config: PretrainedConfig, tp: int) -> list[str]:
    text = hf_config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    problems = []
    if heads and heads % tp:
        problems.append(f"parallel.tp={tp} does not divide model.config.num_attention_heads={heads}: choose a tp that divides it")
    if kv_heads and kv_heads != heads and kv_heads % tp:
        problems.append(f"parallel.tp={tp} does not divide model.config.num_key_value_heads={kv_heads}: choose a tp that divides it")
    return problems


def _check_positions(hf_config: PretrainedConfig, config: P3DConfig) -> list[str]:
    limit = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if limit and config.data.seq_len > limit:
        return [f"data.seq_len={config.data.seq_len} exceeds model.config.max_position_embeddings={limit}"]
    return []


def _check_attention_for_cp(hf_config: PretrainedConfig, cp: int) -> list[str]:
    """CP attention here is plain causal: refuse models whose attention is not."""
    if cp == 1:
        return []
    text = hf_config.get_text_config()
    layer_types = set(getattr(text, "layer_types", None) or ())
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    if sliding or (layer_types - {"full_attention"}):
        return [f"parallel.cp={cp}: {type(hf_config).__name__} uses sliding-window or non-causal attention, which p3d's context parallelism does not support; use parallel.cp=1"]
    if getattr(text, "is_decoder", True) is False and not getattr(text, "is_causal", True):
        return [f"parallel.cp={cp}: {type(hf_config).__name__} is not a causal decoder; use parallel.cp=1"]
    return []


def _check_vocab(config: P3DConfig, hf_config: PretrainedConfig) -> list[str]:
    tokenizer = _collect(problems := [], lambda: build_tokenizer(config.data, config.model))
    if tokenizer is None:
        return problems
    vocab = hf_config.get_text_config().vocab_size
    if tokenizer.vocab_size > vocab:
        return [
            f"model.config.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens "
            f"(data.tokenizer={config.data.tokenizer}): raise model.config.vocab_size"
        ]
    return []
