"""Where a rank's peak memory happens: p3d.train with RSS sampled per phase of the step.

    torchrun --nproc_per_node=N benchmarks/memory_phases.py OUT_DIR key=value ...

Runs the ordinary `p3d.train` entry point; hooks label what the rank is doing (build, data,
forward or backward of each FSDP unit, loss, clip, optimizer step) and a thread samples the
process's resident memory every millisecond, keeping the highest value seen under each label.
Each rank writes OUT_DIR/rank_NNNNN.json: its peak, the phase it happened in, the peak of every
phase and the RSS at each phase change of the last step. benchmarks/memory.py reads these.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * PAGE


class PhaseSampler:
    """Highest RSS seen under each phase label (sampled every `interval_s` by a thread)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.phase = "imports"
        self.peaks: dict[str, int] = {}
        self.transitions: list[tuple[str, int]] = []
        self.modules: dict[str, int] = {}  # modules imported by the end of each phase
        self.recording_transitions = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        value = rss_bytes()
        phase = self.phase
        if value > self.peaks.get(phase, 0):
            self.peaks[phase] = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def enter(self, phase: str) -> None:
        self._sample()  # what the previous phase ended with
        self.modules[self.phase] = len(sys.modules)
        self.phase = phase
        self._sample()
        if self.recording_transitions:
            self.transitions.append((phase, rss_bytes()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def install(sampler: PhaseSampler) -> None:
    """Label p3d's phases by wrapping a few of its functions (nothing in p3d changes)."""
    import torch

    import p3d.train
    import p3d.trainer

    def labelled(function, phase):
        def wrapper(*args, **kwargs):
            sampler.enter(phase)
            return function(*args, **kwargs)

        return wrapper

    build = p3d.train.build_parallel_model

    def build_and_hook(*args, **kwargs):
        sampler.enter("build")
        model = build(*args, **kwargs)
        units = {"embedding": model.get_input_embeddings(), "head": model.get_output_embeddings()}
        block_classes = set(getattr(model, "_no_split_modules", None) or ())  # FSDP2 subclasses them (FSDPLlamaDecoderLayer)
        blocks = [m for m in model.modules() if any(cls.__name__ in block_classes for cls in type(m).__mro__)]
        units.update({f"block {index}": block for index, block in enumerate(blocks)})
        for name, module in units.items():
            if module is None:
                continue
            module.register_forward_pre_hook(lambda *_, name=name: sampler.enter(f"forward {name}"))
            module.register_full_backward_pre_hook(lambda *_, name=name: sampler.enter(f"backward {name}"))
            module.register_full_backward_hook(lambda *_, name=name: sampler.enter(f"after backward {name}"))
        model.register_forward_hook(lambda *_: sampler.enter("loss"))
        sampler.enter("after build")
        return model

    p3d.train.build_parallel_model = build_and_hook
    p3d.train.build_sampler = labelled(p3d.train.build_sampler, "data")
    p3d.train.build_optimizer = labelled(p3d.train.build_optimizer, "optimizer build")
    p3d.train.Checkpointer = labelled(p3d.train.Checkpointer, "checkpointer")
    p3d.trainer.Trainer.resume = labelled(p3d.trainer.Trainer.resume, "resume")
    p3d.trainer.clip_grad_norm_ = labelled(p3d.trainer.clip_grad_norm_, "clip")

    step = p3d.trainer.Trainer.train_step

    def train_step(self):
        sampler.recording_transitions = self.state.step + 1 == self.config.train.steps
        sampler.transitions.clear()
        sampler.enter("step start")
        optimizer_step = self.optimizer.step
        self.optimizer.step = labelled(optimizer_step, "optimizer step")
        try:
            record = step(self)
        finally:
            del self.optimizer.step
        sampler.enter("after step")
        return record

    p3d.trainer.Trainer.train_step = train_step
    torch.set_num_threads(1)


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    sampler = PhaseSampler()
    sys.setswitchinterval(0.0005)  # let the sampling thread in often while the main thread runs Python
    install(sampler)
    import p3d.train

    try:
        p3d.train.main(overrides)
    finally:
        sampler.stop()
        rank = int(os.environ.get("RANK", "0"))
        peak_phase = max(sampler.peaks, key=sampler.peaks.get)
        gb = lambda value: round(value / 2**30, 4)  # noqa: E731 (GiB, as p3d reports peak memory)
        report = {
            "rank": rank,
            "peak_gb": gb(sampler.peaks[peak_phase]),
            "peak_phase": peak_phase,
            "phase_peaks_gb": {phase: gb(value) for phase, value in sampler.peaks.items()},
            "modules_imported_by_phase_end": sampler.modules,
            "last_step_transitions_gb": [(phase, gb(value)) for phase, value in sampler.transitions],
            "finished_at": time.time(),
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank_{rank:05d}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
