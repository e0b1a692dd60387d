"""Per-step metrics: one JSON object per step in <run.dir>/metrics.jsonl, a console line on rank 0."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory: max allocated on an accelerator, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, print_every: int, total_steps: int):
        self.path = run_dir / "metrics.jsonl"
        self.is_main = is_main
        self.print_every = print_every
        self.total_steps = total_steps

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        step = record["step"]
        if step % self.print_every == 0 or step == self.total_steps:
            print(self.format(record), file=sys.stdout, flush=True)

    def format(self, record: dict) -> str:
        return (
            f"step {record['step']:>5}/{self.total_steps} | loss {record['loss']:.4f} | grad_norm {record['grad_norm']:.3f} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | peak mem {record['peak_mem_gb']:.2f} GB"
        )

    def summary(self, record: dict) -> None:
        if self.is_main:
            (self.path.parent / "summary.json").write_text(json.dumps(record, indent=1) + "\n")

    def forget_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be trained again)."""
        if not self.is_main or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def info(self, message: str) -> None:
        if self.is_main:
            print(f"p3d: {message}", flush=True)
