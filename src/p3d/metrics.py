"""Per-step metrics and where they go: console, metrics.jsonl, TensorBoard, Weights & Biases.

Rank 0 alone writes. Every step appends one JSON object to <run.dir>/metrics.jsonl (with val_loss,
val_ppl and eval_s on the steps that ran a validation pass, which the console also prints); the console
shows a progress bar with ETA on a terminal and a plain line every `logging.every` steps
otherwise (CI logs, files); TensorBoard and W&B are opt-in.
"""

from __future__ import annotations

import json
import netrc
import os
import resource
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from p3d.compat import in_backward
from p3d.config.schema import LoggingConfig, WandbMode

# Dense bf16 peak TFLOP/s of one device (datasheet figures, without sparsity). MFU is reported
# against these; on CPU, or an accelerator not listed, set logging.peak_tflops.
PEAK_TFLOPS_BY_DEVICE_NAME = {
    "H200": 989.5,
    "H100 PCIe": 756.0,
    "H100": 989.5,
    "GH200": 989.5,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "MI300X": 1307.0,
}

SCALARS = (
    "loss", "grad_norm", "lr", "label_tokens", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "data_wait_frac", "step_time_s",
    "expert_tokens_min", "expert_tokens_max", "expert_imbalance",
)
# A validation pass's fields of a step's record, and their names in TensorBoard and W&B.
VALIDATION_SCALARS = {"val_loss": "val/loss", "val_ppl": "val/ppl"}


def scalars(record: dict) -> dict[str, float]:
    """The record's values for TensorBoard and W&B: train/<key>, val/loss and val/ppl on evaluated steps,
    and data/samples_<source> for a mixture."""
    values = {f"train/{key}": record[key] for key in SCALARS if record.get(key) is not None}
    values.update({name: record[key] for key, name in VALIDATION_SCALARS.items() if record.get(key) is not None})
    values.update({f"data/samples_{label}": count for label, count in record.get("samples_per_source", {}).items()})
    return values


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory: max allocated on an accelerator, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Peak TFLOP/s of one device: the configured figure, else looked up from the GPU's name."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS_BY_DEVICE_NAME.items():  # longest, most specific names first
        if key in name:
            return value
    return None


def matmul_params(model: nn.Module) -> float:
    """Parameters that take part in a token's matmuls: all but embedding lookups (a tied output head counts);
    of a mixture-of-experts layer's experts only the share a token is routed to (k of E)."""
    unique = {id(p): p for p in model.parameters()}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        lookups.discard(id(output.weight))
    active = {}
    if hasattr(model, "config"):
        from p3d.models import architecture

        share = architecture(model.config).active_expert_share(model.config)
        active = {id(p): share for _, module in architecture(model.config).experts_modules(model) for p in module.parameters(recurse=False)}
    return sum(p.numel() * active.get(key, 1.0) for key, p in unique.items() if key not in lookups)


def flops_per_token(model: nn.Module, hf_config, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter, plus causal attention's 12·L·H·S."""
    text = hf_config.get_text_config()
    layers, hidden = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if not isinstance(layers, int):  # configs that name it otherwise (BLT's patch encoder, global and decoder stacks)
        from p3d.models import decoder_blocks

        layers = len(decoder_blocks(model))
    if not isinstance(hidden, int):
        hidden = model.get_input_embeddings().embedding_dim
    return 6 * matmul_params(model) + 12 * layers * hidden * seq_len


class ConsoleSink:
    """A tqdm progress bar with ETA on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, cfg: LoggingConfig, total_steps: int, first_step: int):
        self.every = cfg.every
        self.total_steps = total_steps
        self.bar = None
        if cfg.progress and sys.stdout.isatty():
            from tqdm import tqdm

            # tqdm hides its bar on a terminal that reports no size (0 x 0): fall back to 100 x 24.
            size = shutil.get_terminal_size((100, 24))
            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", ncols=size.columns or 100, nrows=size.lines or 24, file=sys.stdout)

    def write(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s | mem {record['peak_mem_gb']:.2f} GB", refresh=False)
            self.bar.update(1)
        elif record["step"] % self.every == 0 or record["step"] == self.total_steps:
            print(format_line(record, self.total_steps), flush=True)
        if record.get("val_loss") is not None:
            self.message(format_validation_line(record, self.total_steps))

    def message(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_line(record: dict, total_steps: int) -> str:
    mfu = f" | mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    return (
        f"step {record['step']:>5}/{total_steps} | loss {record['loss']:.4f} | grad_norm {record['grad_norm']:.3f} | "
        f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s{mfu} | peak mem {record['peak_mem_gb']:.2f} GB"
    )


def format_validation_line(record: dict, total_steps: int) -> str:
    return f"eval {record['step']:>5}/{total_steps} | val_loss {record['val_loss']:.4f} | val_ppl {record['val_ppl']:.2f} | {record['eval_s']:.2f} s"


def format_summary(record: dict, run_dir: Path) -> str:
    """One line: steps, final loss, mean tokens/s of this run, the lowest and highest peak memory of
    any rank (and their sum), the run directory and the newest complete checkpoint."""
    peaks = record["peak_mem_gb_per_rank"]
    low, high = min(peaks), max(peaks)
    memory = f"{high:.2f} GB" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f} GB"
    if len(peaks) > 1:
        memory += f" ({sum(peaks):.2f} GB summed over {len(peaks)} ranks)"
    stopped = " (stopped by SIGTERM)" if record.get("stopped_by_sigterm") else ""
    loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
    if record.get("val_loss") is not None:
        loss += f" | val_loss {record['val_loss']:.4f}"
    throughput = "n/a" if record["tokens_per_s"] is None else f"{record['tokens_per_s']:,.0f}"
    return (
        f"done: step {record['step']}{stopped}, {record['steps_run']} steps this run | final loss {loss} | "
        f"{throughput} tok/s | peak mem per rank {memory} | run dir {run_dir} | checkpoint {record['checkpoint'] or 'none'}"
    )


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.writer.close()


def wandb_credentials_problem(cfg: LoggingConfig) -> str | None:
    """W&B online needs an API key, found where wandb.init looks: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
    or the netrc entry that `wandb login` writes. Without one, wandb.init would fail after the model is built."""
    if not cfg.wandb or cfg.wandb_mode is not WandbMode.online:
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    if _netrc_has_login(host):
        return None
    return (
        f"logging.wandb_mode=online: no W&B API key for {host} (WANDB_API_KEY is unset and no `wandb login` entry is in "
        f"~/.netrc); set one, or use logging.wandb_mode=offline and `wandb sync` later"
    )


def _netrc_has_login(host: str) -> bool:
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return True
        except (netrc.NetrcParseError, OSError):
            continue
    return False


class WandbSink:
    """Weights & Biases; offline mode writes under <run.dir>/wandb and needs no network or key."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, resolved_config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=cfg.wandb_project,
            name=run_dir.name,
            id=run_dir.name,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.wandb_mode.value,
            config=resolved_config,
        )

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class ExpertLoad:
    """Tokens routed to each expert of each mixture-of-experts layer, summed over a step and all ranks.

    Each experts module is called with the router's choice (`top_k_index`, global expert ids) on this
    rank's tokens; ranks of one tp group see the same tokens, so the counts are summed over dp x cp only.
    Per step: the fewest and most (token, expert) pairs any expert of any layer got, and the imbalance:
    the highest ratio of a layer's busiest expert to its mean (1.0: perfectly even).
    """

    def __init__(self, experts: list[nn.Module]):
        self.counts = torch.zeros((len(experts), max((_global_expert_count(m) for m in experts), default=0)), dtype=torch.float64)
        self.experts = [_global_expert_count(module) for module in experts]
        for layer, module in enumerate(experts):
            module.register_forward_pre_hook(self._counter(layer))

    def _counter(self, layer: int):
        def count(module, args):
            if in_backward():
                return  # a block recomputed for backward (activation checkpointing) routes the same tokens again
            chosen = args[1].detach().reshape(-1).to("cpu")  # top_k_index: global expert ids
            self.counts[layer, : self.experts[layer]] += torch.bincount(chosen, minlength=self.experts[layer]).to(torch.float64)

        return count

    def take(self, group) -> dict:
        """The step's record fields (none for a dense model); resets the counts. Collective over `group`."""
        if not self.experts:
            return {}
        counts = self.counts.clone()
        self.counts.zero_()
        torch.distributed.all_reduce(counts, group=group)
        per_layer = [counts[layer, :experts] for layer, experts in enumerate(self.experts)]
        imbalance = max(row.max().item() / max(row.mean().item(), 1e-9) for row in per_layer)
        return {
            "expert_tokens_min": int(min(row.min().item() for row in per_layer)),
            "expert_tokens_max": int(max(row.max().item() for row in per_layer)),
            "expert_imbalance": round(imbalance, 4),
        }


def _global_expert_count(module: nn.Module) -> int:
    from p3d.parallel.expert import expert_count

    return expert_count(module)


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, cfg: LoggingConfig, total_steps: int, resolved_config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.is_main = is_main
        self.cfg = cfg
        self.total_steps = total_steps
        self.resolved_config = resolved_config or {}
        self.sinks: list = []

    def start(self, first_step: int) -> None:
        """Open the sinks once the first step to train is known (after a resume)."""
        if not self.is_main:
            return
        self.console = ConsoleSink(self.cfg, self.total_steps, first_step)
        self.sinks = [self.console]
        if self.cfg.tensorboard:
            self.sinks.append(TensorBoardSink(self.path.parent))
        if self.cfg.wandb:
            self.sinks.append(WandbSink(self.cfg, self.path.parent, self.resolved_config))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def summary(self, record: dict, write_file: bool = True) -> None:
        """summary.json (unless `write_file` is false), and the one line that ends the run on the console."""
        if not self.is_main:
            return
        if write_file:
            (self.path.parent / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
        self.info(format_summary(record, self.path.parent))

    def forget_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be trained again)."""
        if not self.is_main or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def info(self, message: str) -> None:
        if not self.is_main:
            return
        text = f"p3d: {message}"
        if self.sinks:
            self.console.message(text)
        else:
            print(text, flush=True)
