"""Typed schema of every p3d config key.

Each group of `conf/` merges into one dataclass below; Hydra's ConfigStore holds them, so an
unknown key or a value of the wrong type fails when the config is composed. A numeric key's
allowed range is declared with `bounded(...)` and checked first by validation (every float must
also be finite). The one-line comment after each field is its documentation (docs/config.md is
generated from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class Bounds:
    """The allowed values of a numeric key: within the given limits, or one of `also`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()

    def admits(self, value: float) -> bool:
        if value in self.also:
            return True
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """E.g. `>= 1`, `> 0`, `in [0, 1)`, `-1 or >= 1`."""
        low = "[" if self.ge is not None else "(" if self.gt is not None else None
        high = "]" if self.le is not None else ")" if self.lt is not None else None
        lower = self.ge if self.ge is not None else self.gt
        upper = self.le if self.le is not None else self.lt
        if low and high:
            text = f"in {low}{lower}, {upper}{high}"
        elif low:
            text = f"{'>=' if low == '[' else '>'} {lower}"
        else:
            text = f"{'<=' if high == ']' else '<'} {upper}"
        return " or ".join([*(str(value) for value in self.also), text])


def bounded(default: Any, **limits: Any) -> Any:
    """A numeric field with an allowed range (see Bounds), e.g. `tp: int = bounded(1, ge=1)`."""
    return field(default=default, metadata={"bounds": Bounds(**limits)})


def bounds_of(config_field) -> Bounds | None:
    return config_field.metadata.get("bounds")


def range_problem(key: str, value: Any, bounds: Bounds | None) -> str | None:
    """`key=value: must be ...` when a number is not finite or out of its range, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={value}: must be a finite number" + (f" {bounds.describe()}" if bounds else "")
    if bounds is not None and not bounds.admits(value):
        return f"{key}={value}: must be {bounds.describe()}"
    return None


class InitMode(Enum):
    random = "random"
    pretrained = "pretrained"


class DType(Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class ACMode(Enum):
    none = "none"
    full = "full"
    selective = "selective"


class WandbMode(Enum):
    offline = "offline"
    online = "online"


class AsyncMode(Enum):
    disabled = "disabled"
    thread = "thread"


class CPLayout(Enum):
    balanced = "balanced"
    contiguous = "contiguous"


class CPImpl(Enum):
    auto = "auto"
    allgather = "allgather"
    ring = "ring"
    torch = "torch"


class OptimizerName(Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    adafactor = "adafactor"
    muon = "muon"


class MuonLRAdjust(Enum):
    match_rms_adamw = "match_rms_adamw"
    original = "original"


class Schedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    wsd = "wsd"


class GradSync(Enum):
    auto = "auto"
    micro_batch = "micro_batch"
    step = "step"


class Packing(Enum):
    stream = "stream"
    documents = "documents"


class DataFormat(Enum):
    text = "text"
    chat = "chat"


@dataclass
class ModelConfig:
    name: Optional[str] = None  # preset name; names the run directory and the start-up line (null: model.arch, or model.pretrained's directory name)
    arch: Optional[str] = "llama"  # Hugging Face `model_type` to build (llama, gpt2, qwen3, ...); with init=pretrained: null (the checkpoint's) or the same
    tiny: bool = False  # shrink model.arch's default config to a tiny random model (hidden 64, 2 layers, 4 heads, vocab 264, ...); model.config still applies
    init: InitMode = InitMode.random  # random: build from the config alone (no download); pretrained: load `model.pretrained`
    pretrained: Optional[str] = None  # local directory or hub id of a Hugging Face checkpoint (used by init=pretrained; its config.json gives every size)
    config: Dict[str, Any] = field(default_factory=dict)  # overrides of Hugging Face config fields, e.g. model.config.num_hidden_layers=3 (never a pretrained checkpoint's shapes)
    tp_plan: Any = "auto"  # "auto" (p3d's plan for the model type, else transformers', else one inferred from the modules) or a map {module pattern: style}


@dataclass
class ParallelConfig:
    dp: int = bounded(-1, ge=1, also=(-1,))  # data-parallel degree, = dp_replicate * dp_shard; -1 infers it as world_size / (cp*tp) (or dp_replicate*dp_shard when dp_shard is set)
    dp_replicate: int = bounded(1, ge=1)  # data-parallel replicas: the model state is replicated over them and gradients all-reduced (with dp_shard > 1: HSDP; with dp_shard=1: DDP-style, the whole model on every rank)
    dp_shard: int = bounded(-1, ge=1, also=(-1,))  # data-parallel ranks FSDP2 shards the model state over (together with the cp ranks); -1 takes dp / dp_replicate
    reshard_after_forward: bool = True  # FSDP: free each block's gathered weights after its forward and all-gather them again in backward; false keeps them from forward to backward (one all-gather per block less, the whole TP-local model unsharded in memory)
    backward_prefetch: bool = True  # FSDP: all-gather the next unit's weights for backward while the current unit's backward runs (overlap); false gathers each when its backward begins (one unit's weights less at the peak)
    grad_sync: GradSync = GradSync.auto  # when gradients are reduced over dp: micro_batch (after every micro-batch's backward), step (after the last micro-batch only; with sharding each rank holds the unsharded gradients until then), auto (step when nothing is sharded, else micro_batch)
    cp: int = bounded(1, ge=1)  # context-parallel degree: the sequence is split over this many ranks
    tp: int = bounded(1, ge=1)  # tensor-parallel degree (innermost mesh dimension)
    ep: int = bounded(1, ge=1)  # expert-parallel degree: each mixture-of-experts layer's experts split over this many of the dp*cp ranks (must divide dp*cp), tokens sent to them by all-to-all
    cp_layout: CPLayout = CPLayout.balanced  # sequence sharding under CP: balanced (rank i holds chunks i and 2cp-1-i) or contiguous
    cp_impl: CPImpl = CPImpl.auto  # CP attention: ring (p2p K/V rotation, any backend), allgather, torch (PyTorch's, CUDA only), auto (torch on CUDA, else ring)
    sequence_parallel: bool = False  # with tp > 1: norms and residuals between TP regions hold 1/tp of the sequence (llama and opt)
    vocab_parallel: bool = False  # the input embedding and output head sharded over the vocabulary across every rank and never gathered (each micro-batch's token ids and hidden states are all-gathered instead), the loss computed over the shards: less memory and traffic for large vocabularies; needs a Linear head, a plain Embedding and dp_replicate=1 (one process: no effect)


@dataclass
class SourceConfig:
    path: Optional[str] = None  # local file/dir or hub dataset id of this source; null: the built-in corpus (the built-in chat set with data.format=chat)
    weight: float = bounded(1.0, ge=0)  # this source's share of the samples: its weight over the sum of all weights
    name: Optional[str] = None  # hub dataset configuration name; null: data.name
    split: Optional[str] = None  # dataset split to read; null: data.split
    text_field: Optional[str] = None  # column holding the text; null: data.text_field


@dataclass
class DataConfig:
    path: Optional[str] = None  # local file/dir (.txt, .json, .jsonl, .parquet, .csv) or hub dataset id; null: the built-in corpus (chat set with format=chat)
    name: Optional[str] = None  # hub dataset configuration name (with a hub id in data.path)
    split: str = "train"  # dataset split to read
    text_field: str = "text"  # column holding the text
    sources: List[SourceConfig] = field(default_factory=list)  # a weighted mixture of sources, e.g. [{path: a.jsonl, weight: 0.8}, {path: b, weight: 0.2}] (instead of data.path)
    format: DataFormat = DataFormat.text  # text: every token is a target; chat: rows hold a `messages` list (role, content), only assistant tokens are targets
    messages_field: str = "messages"  # with format=chat: the column holding each conversation's list of {role, content}
    seq_len: int = bounded(128, ge=1)  # tokens per training sequence
    tokenizer: str = "auto"  # auto: the model's own tokenizer if model.pretrained has one, else byte; byte; or a local dir / hub id
    packing: Packing = Packing.stream  # stream: windows cut from one token stream, attention crosses documents; documents: attention and positions stay inside each document
    eval_path: Optional[str] = None  # held-out documents for the validation pass (eval.every): a local file/dir or hub dataset id, read whole, tokenized and packed like data.path (its split is data.split)
    eval_fraction: float = bounded(0.0, ge=0, lt=1)  # held-out share of each training source's documents (chosen by content hash), never trained on, for the validation pass instead of data.eval_path; 0: none
    cache_dir: Optional[str] = None  # where tokenized sources are cached (shareable between runs and jobs); null: <run.root>/data-cache
    tokenize_workers: int = bounded(0, ge=0)  # processes that tokenize a source into a new cache; 0: one per available CPU core


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw  # torch.optim's adamw, adam, sgd, adafactor or muon (Muon for the hidden layers' matrices, AdamW for embeddings, head, norms and biases); docs/training.md compares them
    lr: float = bounded(1e-3, gt=0)  # peak learning rate (muon: of both its parts)
    weight_decay: float = bounded(0.1, ge=0)  # weight decay of parameters with 2+ dims (norms and biases get none): decoupled for adamw, muon and adafactor, an L2 term for adam and sgd
    beta1: Optional[float] = bounded(None, ge=0, lt=1)  # adamw, adam and muon's AdamW part: decay of the first moment (null: 0.9)
    beta2: Optional[float] = bounded(None, ge=0, lt=1)  # adamw, adam and muon's AdamW part: decay of the second moment (null: 0.95)
    eps: Optional[float] = bounded(None, gt=0)  # adamw, adam and muon's AdamW part: epsilon added to the denominator (null: 1e-8)
    momentum: Optional[float] = bounded(None, ge=0, lt=1)  # sgd (null: 0) and muon (null: 0.95): momentum factor
    nesterov: Optional[bool] = None  # sgd (null: false; true needs optim.momentum > 0) and muon (null: true): Nesterov momentum
    beta2_decay: Optional[float] = bounded(None, le=0)  # adafactor: the second moment's decay at step t is 1 - t^beta2_decay (null: -0.8)
    adjust_lr_fn: Optional[MuonLRAdjust] = None  # muon: the matrices' learning rate, match_rms_adamw (0.2 sqrt(max(rows, cols)) optim.lr: AdamW's update size, so optim.lr carries over) or original (sqrt(max(1, rows/cols)) optim.lr) (null: match_rms_adamw)
    grad_clip: float = bounded(1.0, ge=0)  # max global gradient norm; 0 disables clipping
    in_backward: bool = False  # step each weight as soon as its gradient is ready and free it (saves gradient memory; needs grad_clip=0, no accumulation)
    schedule: Schedule = Schedule.cosine  # learning rate after the warmup: cosine or linear decay to the end, constant, or wsd (warmup-stable-decay: constant, then a linear decay over the last optim.decay_ratio of the steps)
    warmup_steps: int = bounded(2, ge=0)  # linear warmup steps from optim.lr/warmup_steps up to optim.lr
    min_lr_ratio: Optional[float] = bounded(None, ge=0, le=1)  # final learning rate as a fraction of optim.lr, reached at train.steps (cosine, linear, wsd; null: 0.1); refused with schedule=constant
    decay_ratio: Optional[float] = bounded(None, gt=0, le=1)  # schedule=wsd: the final share of train.steps over which the learning rate decays (null: 0.2); refused with other schedules


@dataclass
class TrainConfig:
    steps: int = bounded(20, ge=1)  # optimizer steps to train (the run stops at this step)
    seed: int = bounded(0, ge=0, le=2**32 - 1)  # seed for model init and the data order (the same on every rank)
    global_batch_size: int = bounded(8, ge=1)  # sequences per optimizer step, whole job
    micro_batch_size: int = bounded(2, ge=1)  # sequences per dp rank per forward; accumulation = global / (micro * dp)
    dtype: DType = DType.fp32  # compute dtype (activations, gathered weights); with master_dtype=fp32 the stored weights, gradients and optimizer state stay fp32
    master_dtype: DType = DType.fp32  # dtype of the stored weights, gradients and AdamW moments; bf16 (needs train.dtype=bf16) halves them and updates weights by stochastic rounding
    activation_checkpointing: ACMode = ACMode.none  # recompute block activations in backward: none, full (every block) or selective
    ac_every: int = bounded(2, ge=1)  # with activation_checkpointing=selective: checkpoint every n-th block (blocks 0, n, 2n, ...)
    compile: bool = False  # torch.compile each decoder block (after TP and activation checkpointing, before FSDP)


@dataclass
class EvalConfig:
    every: int = bounded(0, ge=0)  # a validation pass over the held-out data (data.eval_path or data.eval_fraction) every this many steps and after the last step (val_loss, val_ppl); 0: none
    steps: int = bounded(4, ge=1)  # batches of train.global_batch_size held-out sequences per pass (the same batches every pass)


@dataclass
class CheckpointConfig:
    every: int = bounded(10, ge=0)  # save a DCP checkpoint every this many steps; 0: no periodic saves
    at_end: bool = True  # save after the last step
    resume: bool = True  # resume from the newest intact checkpoint in run.dir if there is one (a damaged newer one is named and skipped)
    load_from: Optional[str] = None  # a complete checkpoint directory to start from (another run's, or one kept elsewhere); run.dir's own newer checkpoints take precedence
    keep_last: int = bounded(0, ge=0)  # keep only the newest k complete checkpoints, deleting older ones once a newer one is complete; 0 keeps all
    async_mode: AsyncMode = AsyncMode.disabled  # disabled: training waits for each save; thread: copy the state in memory and write it from a background thread while training goes on
    checksums: bool = True  # record an xxh3 checksum of every checkpoint file (taken while it is written) and verify it before loading; false: sizes only (damage inside a file goes unseen)
    allow_data_change: bool = False  # resume even though the files behind an unchanged data.path (names, sizes, modification times) or the dataset changed since the checkpoint


@dataclass
class LoggingConfig:
    every: int = bounded(1, ge=1)  # print a console line every this many steps when not on a terminal (metrics.jsonl gets every step)
    progress: bool = True  # a progress bar with ETA when stdout is a terminal (plain lines otherwise)
    tensorboard: bool = False  # write TensorBoard event files to <run.dir>/tensorboard
    wandb: bool = False  # log to Weights & Biases (needs the wandb extra)
    wandb_project: str = "p3d"  # W&B project name
    wandb_mode: WandbMode = WandbMode.offline  # offline: files under <run.dir>/wandb, no network or key (sync later); online
    peak_tflops: Optional[float] = bounded(None, gt=0)  # peak TFLOP/s of one device for MFU; null: looked up from the GPU name (bf16 dense), no MFU on CPU
    attention_timing: bool = False  # time p3d's CP attention per rank into summary.json: tile math (CPU: thread CPU time) and total wall time; adds syncs on GPUs


@dataclass
class RunConfig:
    dir: Optional[str] = None  # where every output of the run goes; null: <run.root>/<model.name>-<id of the overrides>
    root: str = "runs"  # parent directory of derived run directories


@dataclass
class DistConfig:
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, xpu or hpu
    backend: str = "auto"  # auto picks from the device: cuda nccl, cpu gloo, xpu xccl, hpu hccl
    timeout_s: int = bounded(600, ge=1)  # collective timeout in seconds
    cpu_return_freed_memory: bool = False  # on CPU (Linux, glibc): freed buffers over 64 KiB go back to the OS at once, so a rank's peak RSS is its live tensors (what p3d plan counts), at a speed cost (about 0.75x tokens/s at hidden 1024, dp2)


@dataclass
class P3DConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
