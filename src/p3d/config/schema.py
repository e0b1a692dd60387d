"""Typed schema of every p3d config key.

Each group of `conf/` merges into one dataclass below; Hydra's ConfigStore holds them, so an
unknown key or a value of the wrong type fails when the config is composed. The one-line
comment after each field is its documentation (docs/config.md is generated from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional


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


class Packing(Enum):
    stream = "stream"
    documents = "documents"


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
    dp: int = -1  # data-parallel degree (FSDP2 shards over dp*cp); -1 infers it as world_size / (cp*tp)
    cp: int = 1  # context-parallel degree: the sequence is split over this many ranks
    tp: int = 1  # tensor-parallel degree (innermost mesh dimension)
    cp_layout: CPLayout = CPLayout.balanced  # sequence sharding under CP: balanced (rank i holds chunks i and 2cp-1-i) or contiguous
    cp_impl: CPImpl = CPImpl.auto  # CP attention: ring (p2p K/V rotation, any backend), allgather, torch (PyTorch's, CUDA only), auto (torch on CUDA, else ring)
    sequence_parallel: bool = False  # with tp > 1: norms and residuals between TP regions hold 1/tp of the sequence (llama and opt)


@dataclass
class DataConfig:
    path: Optional[str] = None  # local file/dir (.txt, .json, .jsonl, .parquet) or hub dataset id; null: the built-in corpus
    name: Optional[str] = None  # hub dataset configuration name (with a hub id in data.path)
    split: str = "train"  # dataset split to read
    text_field: str = "text"  # column holding the text
    seq_len: int = 128  # tokens per training sequence
    tokenizer: str = "auto"  # auto: the model's own tokenizer if model.pretrained has one, else byte; byte; or a local dir / hub id
    packing: Packing = Packing.stream  # stream: windows cut from one token stream, attention crosses documents; documents: attention and positions stay inside each document


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.1  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    in_backward: bool = False  # step each weight as soon as its gradient is ready and free it (saves gradient memory; needs grad_clip=0, no accumulation)
    warmup_steps: int = 2  # linear warmup steps before the cosine decay
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of optim.lr


@dataclass
class TrainConfig:
    steps: int = 20  # optimizer steps to train (the run stops at this step)
    seed: int = 0  # seed for model init and the data order (the same on every rank)
    global_batch_size: int = 8  # sequences per optimizer step, whole job
    micro_batch_size: int = 2  # sequences per dp rank per forward; accumulation = global / (micro * dp)
    dtype: DType = DType.fp32  # compute dtype; bf16 keeps fp32 master weights, optimizer state and gradient reduction
    activation_checkpointing: ACMode = ACMode.none  # recompute block activations in backward: none, full (every block) or selective
    ac_every: int = 2  # with activation_checkpointing=selective: checkpoint every n-th block (blocks 0, n, 2n, ...)
    compile: bool = False  # torch.compile each decoder block (after TP and activation checkpointing, before FSDP)


@dataclass
class CheckpointConfig:
    every: int = 10  # save a DCP checkpoint every this many steps; 0: no periodic saves
    at_end: bool = True  # save after the last step
    resume: bool = True  # resume from the newest complete checkpoint in run.dir if there is one
    load_from: Optional[str] = None  # a complete checkpoint directory to start from (another run's, or one kept elsewhere); run.dir's own newer checkpoints take precedence
    keep_last: int = 0  # keep only the newest k complete checkpoints, deleting older ones once a newer one is complete; 0 keeps all
    async_mode: AsyncMode = AsyncMode.disabled  # disabled: training waits for each save; thread: copy the state in memory and write it from a background thread while training goes on


@dataclass
class LoggingConfig:
    every: int = 1  # print a console line every this many steps when not on a terminal (metrics.jsonl gets every step)
    progress: bool = True  # a progress bar with ETA when stdout is a terminal (plain lines otherwise)
    tensorboard: bool = False  # write TensorBoard event files to <run.dir>/tensorboard
    wandb: bool = False  # log to Weights & Biases (needs the wandb extra)
    wandb_project: str = "p3d"  # W&B project name
    wandb_mode: WandbMode = WandbMode.offline  # offline: files under <run.dir>/wandb, no network or key (sync later); online
    peak_tflops: Optional[float] = None  # peak TFLOP/s of one device for MFU; null: looked up from the GPU name (bf16 dense), no MFU on CPU
    attention_timing: bool = False  # time p3d's CP attention per rank into summary.json: tile math (CPU: thread CPU time) and total wall time; adds syncs on GPUs


@dataclass
class RunConfig:
    dir: Optional[str] = None  # where every output of the run goes; null: <run.root>/<model.name>-<id of the overrides>
    root: str = "runs"  # parent directory of derived run directories


@dataclass
class DistConfig:
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, xpu or hpu
    backend: str = "auto"  # auto picks from the device: cuda nccl, cpu gloo, xpu xccl, hpu hccl
    timeout_s: int = 600  # collective timeout in seconds


@dataclass
class P3DConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
