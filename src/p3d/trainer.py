"""The train loop: micro-batches -> forward/backward (loss over the global token count) -> clip -> step."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from p3d import rng
from p3d.checkpoint import Checkpointer, ModelAndOptimizer, TrainState, read_marker, rng_file
from p3d.config.schema import P3DConfig
from p3d.data import IGNORE_INDEX, BatchPrefetcher, DataParallelSampler, TokenBatch
from p3d.distributed.mesh import Meshes
from p3d.errors import RunError
from p3d.metrics import ExpertLoad, MetricsLogger, peak_memory_gb
from p3d.models import experts_modules
from p3d.optim import OptimizerInBackward, apply_hyperparameters, build_scheduler, clip_grad_norm_
from p3d.parallel.context import ContextParallel
from p3d.parallel.fsdp import gradient_sync_switch, syncs_every_micro_batch
from p3d.parallel.vocab import VocabularySharding, vocab_parallel_head
from p3d.resume import ResumePlan


class StopOnSignal:
    """SIGTERM (preemption, torchrun shutting its workers down) asks the loop to save and stop.

    The handler only sets a flag; the loop finishes the current step, every rank learns of the
    request through the step's control all-reduce, and all of them save and stop together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The token cross-entropy summed over this rank's tokens, in fp32 (the step divides it by the
    step's valid-token count over all ranks; `p3d plan` runs it on the meta device)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sums(head: VocabularySharding | None, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed token loss to run the backward from, its part over this rank's own tokens, detached).
    They differ with a vocabulary-parallel head (`vocab_parallel_head(model)`), whose loss covers every
    dp x cp rank's tokens."""
    if head is not None:
        return head.token_loss_sums(logits, labels)
    loss = summed_token_loss(logits, labels)
    return loss, loss.detach()


@dataclass
class Trainer:
    config: P3DConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: DataParallelSampler
    meshes: Meshes
    context_parallel: ContextParallel | None
    device: torch.device
    metrics: MetricsLogger
    checkpointer: Checkpointer

    flops_per_token: float = 0.0
    peak_tflops: float | None = None
    eval_sampler: DataParallelSampler | None = None  # the held-out batches, with eval.every > 0

    def __post_init__(self):
        self.vocabulary = vocab_parallel_head(self.model)  # fixed once the model is built: not looked up per micro-batch
        self.state = TrainState()
        self.expert_load = ExpertLoad([module for _, module in experts_modules(self.model)])
        self.load_s: float | None = None  # seconds the checkpoint load took, when resumed
        self.eval_s = 0.0  # seconds spent in validation passes this run (not counted in tokens/s)
        self.last_eval: dict = {}
        self.in_backward = OptimizerInBackward(self.model, self.optimizer) if self.config.optim.in_backward else None
        every_micro_batch = syncs_every_micro_batch(self.config.parallel.grad_sync, self.meshes.dims)
        self.gradient_sync = gradient_sync_switch(self.model, every_micro_batch)
        self.batches = BatchPrefetcher(self.sampler)

    def checkpoint_state(self) -> dict:
        return {"app": ModelAndOptimizer(self.model, self.optimizer), "train": self.state}

    def resume(self, plan: ResumePlan) -> None:
        """Load the planned checkpoint, if any; otherwise seed this rank's generators for a fresh run."""
        for notice in plan.notices:
            self.metrics.info(notice)
        if plan.path is None:
            rng.seed_all(self.config.train.seed, 0, dist.get_rank())
            return
        started = time.perf_counter()
        self.checkpointer.load(plan.path, self.checkpoint_state())
        self.load_s = time.perf_counter() - started
        apply_hyperparameters(self.optimizer, self.config.optim)
        self.scheduler = build_scheduler(self.optimizer, self.config.optim, self.config.train.steps, self.state.step)
        self._restore_rng(plan.path)
        self.metrics.forget_after(self.state.step)
        for change in plan.changes:
            self.metrics.info(f"config change since {plan.path.name}: {change}")
        self.metrics.info(
            f"resumed from {plan.path} (step {self.state.step}, {self.state.consumed_samples} samples consumed) "
            f"in {self.load_s:.2f} s"
        )

    def _restore_rng(self, path) -> None:
        """Per-rank states map 1:1 only onto the layout that saved them; other layouts re-seed."""
        saved_layout = read_marker(path)["layout"]
        dims = self.meshes.dims
        own_file = rng_file(path, dist.get_rank())
        same_layout = saved_layout == {"dp": dims.dp, "cp": dims.cp, "tp": dims.tp}
        found = torch.tensor(float(same_layout and own_file.is_file()), device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)  # all ranks restore, or all re-seed
        if found.item():
            rng.restore(rng.load(own_file))
            return
        rng.seed_all(self.config.train.seed, self.state.step, dist.get_rank())
        layout = " ".join(f"{key}={value}" for key, value in saved_layout.items())
        reason = "are missing for some rank" if same_layout else f"were saved under {layout} and restore only on that layout"
        self.metrics.info(
            f"the checkpoint's random-number states {reason}: re-seeded every rank from train.seed, the step and the "
            f"rank (dropout masks differ from an uninterrupted run)"
        )

    def fit(self) -> None:
        steps = self.config.train.steps
        if self.state.step >= steps:
            self.metrics.info(f"nothing to do: already trained to step {self.state.step} (train.steps={steps})")
            self._write_summary({"step": self.state.step, "loss": None, "tokens": 0}, 0, 0.0, stopped=False)
            return
        started, first_step = time.perf_counter(), self.state.step
        self.metrics.start(first_step)
        stopping = False
        try:
            with StopOnSignal() as stop:
                while self.state.step < steps and not stopping:
                    record, stopping = self.run_step(stop.requested)
                self.checkpointer.wait()
        finally:
            self.batches.close()
            self.metrics.close()
        if stopping:
            self.metrics.info(
                f"stopped by SIGTERM after step {self.state.step}: checkpoint {self.checkpointer.path_for(self.state.step)} "
                f"is complete; rerun the same command to resume"
            )
        self._write_summary(record, self.state.step - first_step, time.perf_counter() - started, stopped=stopping)

    def run_step(self, stop_requested: bool) -> tuple[dict, bool]:
        """One step of fit(): train, agree with every rank (a stop request, the pending save, peak memory),
        validate and save when due, log. Returns the step's record and whether the run stops after it."""
        record = self.train_step()
        stopping, save_status, record["peak_mem_gb"] = self._agree(stop_requested)
        if not stopping and self._should_evaluate():
            record.update(self.evaluate())
        blocked = self.checkpointer.poll(save_status)
        if stopping or self._should_save():
            blocked += self.checkpointer.save(self.state.step, self.checkpoint_state(), sync=stopping)
        if blocked:
            record["checkpoint_blocked_s"] = round(blocked, 4)
        self.metrics.log(record)
        return record, stopping

    def _agree(self, stop_requested: bool) -> tuple[bool, int, float]:
        """One small all-reduce per step: did any rank get SIGTERM, where is the pending save, and the
        highest peak memory of any rank (GB)."""
        local = [float(stop_requested), float(self.checkpointer.local_status()), peak_memory_gb(self.device)]
        flags = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), int(flags[1].item()), flags[2].item()

    def _write_summary(self, last: dict, steps_run: int, seconds: float, stopped: bool) -> None:
        """<run.dir>/summary.json and the console's last line: the last step, the last validation, throughput
        (over the time outside validation passes), every rank's peak memory, the newest complete checkpoint."""
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, round(peak_memory_gb(self.device), 4))
        latest = self.checkpointer.latest()
        training_s = seconds - self.eval_s
        self.metrics.summary(
            {
                "step": last["step"],
                "loss": last["loss"],
                **self.last_eval,
                "steps_run": steps_run,
                "seconds": round(seconds, 3),
                "eval_s": round(self.eval_s, 3),
                "tokens_per_s": round(steps_run * last["tokens"] / training_s, 1) if steps_run else None,
                "peak_mem_gb_per_rank": peaks,
                "checkpoint": None if latest is None else str(latest),
                "layout": self.meshes.dims.describe(),
                "stopped_by_sigterm": stopped,
                "resume_load_s": None if self.load_s is None else round(self.load_s, 3),
                **self._attention_times(),
            },
            write_file=steps_run > 0,  # a run that had nothing to do keeps the summary of the one that trained
        )

    def _attention_times(self) -> dict:
        """With logging.attention_timing: every rank's seconds in CP attention (tile math, and in all)."""
        cp = self.context_parallel
        if cp is None or not cp.timer.enabled:
            return {}
        times = [None] * dist.get_world_size()
        dist.all_gather_object(times, (round(cp.timer.compute_s, 4), round(cp.timer.total_s, 4)))
        return {
            "attention_compute_s_per_rank": [compute for compute, _ in times],
            "attention_total_s_per_rank": [total for _, total in times],
        }

    def _should_evaluate(self) -> bool:
        every, step = self.config.eval.every, self.state.step
        return self.eval_sampler is not None and every > 0 and (step % every == 0 or step == self.config.train.steps)

    def evaluate(self) -> dict:
        """One validation pass: the mean token cross-entropy over the held-out batches (val_loss, over every
        valid label token of the pass, as the training loss is over a step's) and its exponential (val_ppl).
        No gradients, and the model in eval mode (no dropout), so every pass is a function of the weights."""
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        self.model.eval()
        try:
            with torch.no_grad():
                for index in range(self.config.eval.steps):
                    for batch in self.eval_sampler.micro_batches(index * self.config.train.global_batch_size):
                        tokens += batch.valid_label_count()
                        with self._attending(batch) as local:
                            loss_sum += self._token_loss_sums(local)[1]
        finally:
            self.model.train()
        dist.all_reduce(loss_sum, group=self.meshes.dp_cp.get_group())
        count = torch.tensor(float(tokens), device=self.device)
        dist.all_reduce(count, group=self.meshes.dp.get_group())
        val_loss = (loss_sum / count.clamp(min=1.0)).item()
        seconds = time.perf_counter() - started
        self.eval_s += seconds
        self.last_eval = {"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf")}
        return {**self.last_eval, "eval_s": seconds}

    def _should_save(self) -> bool:
        every, step = self.config.checkpoint.every, self.state.step
        return (every > 0 and step % every == 0) or (self.config.checkpoint.at_end and step == self.config.train.steps)

    def train_step(self) -> dict:
        started = time.perf_counter()
        data = self.batches.take(self.state.consumed_samples)
        if self.state.step + 1 < self.config.train.steps:
            self.batches.prefetch(self.state.consumed_samples + self.config.train.global_batch_size)
        batches = data.micro_batches
        data_wait = time.perf_counter() - started
        global_tokens = self._global_valid_tokens(batches)
        loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            self.gradient_sync(index == len(batches) - 1)
            loss += self._forward_backward(batch, global_tokens)
        summed = dist.all_reduce(loss, group=self.meshes.dp_cp.get_group(), async_op=True)  # overlaps the norm
        if self.in_backward is not None:
            grad_norm = self.in_backward.take_grad_norm()  # the weights are already updated
        else:
            grad_norm = clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        summed.wait()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.in_backward is None:
            self.optimizer.step()
        # One host sync per step, after the update is queued: a step whose loss or norm is not finite stops
        # the run before anything of it is saved.
        loss_value, norm_value, label_tokens = torch.stack([loss, grad_norm.to(loss.device), global_tokens.total()]).tolist()
        self._check_finite(loss_value, norm_value)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.consumed_samples += self.config.train.global_batch_size
        elapsed = time.perf_counter() - started
        tokens = self.config.train.global_batch_size * self.config.data.seq_len
        tokens_per_s = tokens / elapsed
        devices = dist.get_world_size()
        mfu = None
        if self.peak_tflops is not None:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * devices)
        record = {
            "step": self.state.step,
            "loss": loss_value,
            "grad_norm": norm_value,
            "lr": lr,
            "tokens": tokens,
            "label_tokens": int(label_tokens),
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / devices,
            "mfu": mfu,
            "step_time_s": elapsed,
            "data_wait_frac": data_wait / elapsed,
            "peak_mem_gb": None,  # the highest of all ranks, filled in by fit() with the per-step agreement
            **self.expert_load.take(self.meshes.dp_cp.get_group()),
        }
        if data.samples_per_source is not None:
            record["samples_per_source"] = data.samples_per_source
        return record

    def _global_valid_tokens(self, batches: list[TokenBatch]) -> "_GlobalCount":
        """Valid label tokens of the whole step over all dp ranks (each dp group holds whole sequences),
        summed while the first micro-batch runs its forward."""
        count = sum(batch.valid_label_count() for batch in batches)
        return _GlobalCount(torch.tensor(float(count), device=self.device), self.meshes.dp.get_group())

    def _forward_backward(self, batch: TokenBatch, global_tokens: "_GlobalCount") -> torch.Tensor:
        with self._attending(batch) as local:
            loss, own = self._token_loss_sums(local)
            divisor = global_tokens.value()
            (loss / divisor).backward()
        return own / divisor

    def _attending(self, batch: TokenBatch):
        """This rank's part of the batch (its CP chunks, attention across the cp ranks set up), or the batch."""
        if self.context_parallel is None:
            return contextlib.nullcontext(batch)
        return self.context_parallel.attending(batch, self.device)

    def _token_loss_sums(self, local: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=local.input_ids.to(self.device), position_ids=local.position_ids.to(self.device), use_cache=False).logits
        return token_loss_sums(self.vocabulary, logits, local.labels.to(self.device))

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise RunError(
                f"step {self.state.step + 1}: loss {loss} / grad norm {grad_norm} is not finite; "
                f"lower optim.lr or raise optim.warmup_steps (no checkpoint was written for this step)"
            )


class _GlobalCount:
    """A count summed over a process group by an all-reduce started now and waited for at first use."""

    def __init__(self, local: torch.Tensor, group):
        self._total = local
        self._divisor: torch.Tensor | None = None
        self._pending = dist.all_reduce(local, group=group, async_op=True)

    def total(self) -> torch.Tensor:
        """The sum over the group."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            self._divisor = self._total.clamp(min=1.0)
        return self._total

    def value(self) -> torch.Tensor:
        """The sum as a divisor: at least 1 (a step whose every label is masked has a zero loss)."""
        self.total()
        return self._divisor
