"""Hooks that tests install into p3d from outside: faults, sabotage and probes.

p3d carries no test code. A test launcher (tests/forkrun.py, tests/hookrun.py) calls
`install_from_env()` before `p3d.train.main`; it wraps p3d's own functions in that process only
(forked ranks inherit the wrapped modules; torchrun's workers run tests/hookrun.py). The
environment selects the hooks, so they reach every rank however it was started:

    P3D_TEST_HOOKS=name[=value],...   the hooks to install (HOOKS below)
    P3D_TEST_FAULT_RANK=r             faults fire on rank r only (default: every rank)
    P3D_TEST_REPORT=dir               probes write <dir>/rank_<r>.json when training ends

- Faults kill a rank at a chosen point. They fire only in the first attempt of a job: torchrun
  sets TORCHELASTIC_RESTART_COUNT in a restarted worker group, which then resumes and runs past
  the step instead of failing again.
- Sabotage plants a known bug (a negative control): a comparison that must detect a wrong
  result is run on it, to show that the comparison can fail.
- Probes record what happened inside the run (dtypes, recomputation, compiled calls) for a test
  to check that a feature is in effect, not merely harmless.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

HOOKS: dict[str, Callable[[str | None], None]] = {}
REPORT: dict = {}  # what the probes of this rank recorded


def hook(name: str):
    def register(install: Callable[[str | None], None]):
        HOOKS[name] = install
        return install

    return register


def install_from_env() -> list[str]:
    """Install the hooks named in P3D_TEST_HOOKS; returns their names."""
    names = []
    for item in filter(None, os.environ.get("P3D_TEST_HOOKS", "").split(",")):
        name, _, value = item.partition("=")
        if name not in HOOKS:
            raise SystemExit(f"P3D_TEST_HOOKS: unknown hook '{name}' (known: {', '.join(sorted(HOOKS))})")
        HOOKS[name](value or None)
        names.append(name)
    return names


def wrap(owner, attribute: str, make: Callable[[Callable], Callable]) -> None:
    """Replace owner.attribute (a function, method or class) by make(original)."""
    setattr(owner, attribute, make(getattr(owner, attribute)))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def armed() -> bool:
    """A fault fires on the chosen rank (or every rank), in the first attempt of a job only."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    chosen = os.environ.get("P3D_TEST_FAULT_RANK")
    return chosen is None or int(chosen) == rank()


def announce(what: str) -> None:
    print(f"test hook: {what} on rank {rank()}", file=sys.stderr, flush=True)


def after_step(step: int, action: Callable[[], None]) -> None:
    """Run `action` on an armed rank once step `step` is complete: trained, saved if due, logged."""
    from p3d.metrics import MetricsLogger

    def make(log):
        def logged(self, record: dict) -> None:
            log(self, record)
            if record.get("step") == step and armed():
                action()

        return logged

    wrap(MetricsLogger, "log", make)


# --- faults -----------------------------------------------------------------------------------


@hook("fail_after_step")
def fail_after_step(value: str | None) -> None:
    """The rank exits with code 17 after step n (after any save at step n)."""
    step = int(value)

    def fail() -> None:
        announce(f"injected failure after step {step}")
        os._exit(17)

    after_step(step, fail)


@hook("kill_in_save")
def kill_in_save(value: str | None) -> None:
    """The rank SIGKILLs itself in the save of step n: its shards are written, the marker is not."""
    from p3d.checkpoint import Checkpointer

    step = int(value)

    def make(mark_complete):
        def killed(self, path, saved_step, *args, **kwargs):
            if saved_step == step and armed():
                announce(f"injected SIGKILL in the save of step {step}")
                os.kill(os.getpid(), signal.SIGKILL)
            return mark_complete(self, path, saved_step, *args, **kwargs)

        return killed

    wrap(Checkpointer, "_mark_complete", make)


@hook("sigterm_launcher_after_step")
def sigterm_launcher_after_step(value: str | None) -> None:
    """After step n the rank sends SIGTERM to its launcher (torchrun passes it on to every worker)
    and waits until its own SIGTERM has arrived, so the job stops after step n + 1 exactly."""
    from p3d.trainer import StopOnSignal

    step = int(value)
    received = []

    def make(handle):
        def handled(self, signum, frame) -> None:
            received.append(signum)
            handle(self, signum, frame)

        return handled

    wrap(StopOnSignal, "_handle", make)

    def signal_launcher() -> None:
        announce(f"SIGTERM to the launcher after step {step}")
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)

    after_step(step, signal_launcher)


# --- sabotage (negative controls) ---------------------------------------------------------------


@hook("grad_divide_factor")
def grad_divide_factor(value: str | None) -> None:
    """FSDP2, or DDP's comm hook, divides each reduced gradient by `value` (p3d sums: the loss is already a
    global mean)."""
    import p3d.compat as compat
    import p3d.parallel.parallelize as parallelize
    from torch.distributed.fsdp import FSDPModule

    def divided(summed):
        def hook(group, bucket):
            return summed(group, bucket).then(lambda done: done.value().div_(float(value)))

        return hook

    wrap(compat, "_summed_over_ranks", divided)

    def make(apply_fsdp):
        def wrong(model, *args, **kwargs):
            apply_fsdp(model, *args, **kwargs)
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_gradient_divide_factor(float(value))

        return wrong

    wrap(parallelize, "apply_fsdp", make)


@hook("skip_tp_allreduce")
def skip_tp_allreduce(value: str | None) -> None:
    """Row-parallel layers (the DTensor styles and the local-tensor ones) return their partial sums without
    the tensor-parallel all-reduce."""
    import torch

    import p3d.parallel.tensor as tensor

    reduced_output = tensor._Rowwise._output

    def unreduced_output(self, module, output, mesh):
        if isinstance(module, torch.nn.Embedding):
            return reduced_output(self, module, output, mesh)
        return output.to_local()  # each rank's partial sum

    tensor._Rowwise._output = unreduced_output

    class Unreduced(torch.autograd.Function):  # the local-tensor row-parallel layers' all-reduce, skipped
        @staticmethod
        def forward(ctx, partial, group):
            return partial.view_as(partial)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    tensor.SumOverGroup = Unreduced


@hook("fresh_optimizer_on_resume")
def fresh_optimizer_on_resume(value: str | None) -> None:
    """A resume loads the model's weights but not the optimizer's state (it stays as built: empty).

    DCP loads in place into the tensors that the state dict it is given holds, so the optimizer
    state is left out of that state dict, not merely out of `load_state_dict`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    import p3d.checkpoint as checkpoint

    class ModelOnly(Stateful):
        def __init__(self, model):
            self.model = model

        def state_dict(self) -> dict:
            return {"model": get_model_state_dict(self.model)}

        def load_state_dict(self, state: dict) -> None:
            set_model_state_dict(self.model, state["model"])

    def make(load):
        def model_only(self, path, state: dict, *args, **kwargs):
            return load(self, path, {**state, "app": ModelOnly(state["app"].model)}, *args, **kwargs)

        return model_only

    wrap(checkpoint.Checkpointer, "load", make)


@hook("unsummed_kv_grads")
def unsummed_kv_grads(value: str | None) -> None:
    """All-gather context-parallel attention keeps its own dK/dV instead of summing them over cp."""
    from p3d.parallel.cp_attention import CPComm

    wrap(CPComm, "reduce_scatter", lambda reduce_scatter: lambda self, stacked: stacked[self.rank].clone())


@hook("load_first_shard")
def load_first_shard(value: str | None) -> None:
    """Every rank copies the first block of each weight (rank 0's shard) instead of its own."""
    import p3d.model as model

    def make(local_box):
        def first(tensor):
            return tuple(slice(0, box.stop - box.start) for box in local_box(tensor))

        return first

    wrap(model, "local_box", make)


# --- probes -------------------------------------------------------------------------------------


def on_model_built(attach: Callable) -> None:
    """Call attach(model) on the parallelised model, before training starts."""
    import p3d.train

    def make(build):
        def built(*args, **kwargs):
            model = build(*args, **kwargs)
            attach(model)
            return model

        return built

    wrap(p3d.train, "build_parallel_model", make)


AT_END: list[Callable] = []  # callbacks(trainer) run once training has ended, before the report is written


def report_at_end(callback: Callable | None = None) -> None:
    """Write <P3D_TEST_REPORT>/rank_<r>.json with REPORT once Trainer.fit has returned, after
    running `callback(trainer)` (the wrapper of fit is installed once, for every probe)."""
    from p3d.trainer import Trainer

    if callback is not None:
        AT_END.append(callback)
    if getattr(Trainer.fit, "writes_report", False):
        return
    directory = Path(os.environ["P3D_TEST_REPORT"])

    def make(fit):
        def fit_and_report(self) -> None:
            fit(self)
            for callback in AT_END:
                callback(self)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"rank_{rank()}.json").write_text(json.dumps(REPORT))

        fit_and_report.writes_report = True
        return fit_and_report

    wrap(Trainer, "fit", make)


def decoder_blocks(model) -> list:
    """The model's decoder blocks, also once FSDP2 has renamed their classes (FSDPLlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__.removeprefix("FSDP") in names]


def local(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@hook("probe_precision")
def probe_precision(value: str | None) -> None:
    """Dtypes where the mixed-precision policy shows: inside a block's forward, of the gradient
    reductions, of the gradients the optimizer steps with, of the master weights and optimizer state."""
    import torch.distributed as dist

    import p3d.trainer as trainer

    seen = defaultdict(set)
    REPORT["precision"] = seen

    def inside_forward(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["block_input"].add(dtype_name(hidden))
        seen["block_weights"].update(dtype_name(param) for param in module.parameters(recurse=True))

    on_model_built(lambda model: decoder_blocks(model)[0].register_forward_pre_hook(inside_forward, with_kwargs=True))

    def make_reduce_scatter(reduce_scatter_single):
        def recorded(output, input, *args, **kwargs):
            seen["reduce_scatter"].add(dtype_name(input))
            return reduce_scatter_single(output, input, *args, **kwargs)

        return recorded

    wrap(dist, "reduce_scatter_single", make_reduce_scatter)

    def make_clip(clip):
        def recorded(parameters, max_norm):
            parameters = list(parameters)
            seen["grads"].update(dtype_name(param.grad) for param in parameters if param.grad is not None)
            return clip(parameters, max_norm)

        return recorded

    wrap(trainer, "clip_grad_norm_", make_clip)

    def at_end(trainer) -> None:
        seen["master_weights"].update(dtype_name(local(param)) for param in trainer.model.parameters())
        for state in trainer.optimizer.state.values():
            seen["optimizer_state"].update(dtype_name(value) for key, value in state.items() if key != "step")
        for key in list(seen):
            seen[key] = sorted(seen[key])

    report_at_end(at_end)


@hook("probe_tp_linear_operands")
def probe_tp_linear_operands(value: str | None) -> None:
    """The kinds of tensor (DTensor or plain) each tensor-parallel linear of the decoder blocks computes
    with: its weight and its input, as its forward sees them (after p3d's own hooks)."""
    import torch
    from torch.distributed.tensor import DTensor

    seen = defaultdict(set)
    REPORT["tp_linear_operands"] = seen

    def record(module, args) -> None:
        seen["weight"].add("DTensor" if isinstance(module.weight, DTensor) else "Tensor")
        seen["input"].add("DTensor" if isinstance(args[0], DTensor) else "Tensor")

    def attach(model) -> None:
        for block in decoder_blocks(model):
            for module in block.modules():
                if isinstance(module, torch.nn.Linear) and isinstance(module.weight, DTensor):
                    module.register_forward_pre_hook(record)  # after p3d's hooks: sees what the layer computes with

    on_model_built(attach)

    def at_end(trainer) -> None:
        for key in list(seen):
            seen[key] = sorted(seen[key])

    report_at_end(at_end)


@hook("probe_block_calls")
def probe_block_calls(value: str | None) -> None:
    """How often each decoder block's attention ran in the first step (2: once more in backward)."""
    from p3d.trainer import Trainer

    counts: list[int] = []

    def counter(index: int):
        def count(module, args) -> None:
            counts[index] += 1

        return count

    def attach(model) -> None:
        for index, block in enumerate(decoder_blocks(model)):
            counts.append(0)
            block.self_attn.register_forward_pre_hook(counter(index))

    on_model_built(attach)

    def make(train_step):
        def recorded(self) -> dict:
            record = train_step(self)
            REPORT.setdefault("block_calls_first_step", list(counts))
            return record

        return recorded

    wrap(Trainer, "train_step", make)
    report_at_end()


@hook("probe_backward_state")
def probe_backward_state(value: str | None) -> None:
    """After each micro-batch's backward: does any parameter still hold a gradient, and did the
    weights already change (an optimizer step inside backward)?"""
    import torch

    from p3d.trainer import Trainer

    REPORT["grads_held_after_backward"] = []
    REPORT["weights_changed_in_backward"] = []

    def make(forward_backward):
        def recorded(self, *args, **kwargs):
            params = list(self.model.parameters())
            before = [local(param).detach().clone() for param in params]
            loss = forward_backward(self, *args, **kwargs)
            REPORT["grads_held_after_backward"].append(any(param.grad is not None for param in params))
            REPORT["weights_changed_in_backward"].append(
                any(not torch.equal(old, local(param).detach()) for old, param in zip(before, params))
            )
            return loss

        return recorded

    wrap(Trainer, "_forward_backward", make)
    report_at_end()


@hook("probe_compiled_calls")
def probe_compiled_calls(value: str | None) -> None:
    """torch.compile's backend wrapped: how many graphs it compiled, and how often they ran."""
    import torch
    import torch._dynamo

    REPORT.update(compiled_graphs=0, compiled_graph_calls=0)

    counting_backends: dict = {}  # one per backend: torch.compile recompiles for a new backend object

    def counting(name: str):
        backend = torch._dynamo.lookup_backend(name)

        def compile_graph(graph_module, example_inputs, **kwargs):
            compiled = backend(graph_module, example_inputs, **kwargs)
            REPORT["compiled_graphs"] += 1

            def run(*args):
                REPORT["compiled_graph_calls"] += 1
                return compiled(*args)

            return run

        return counting_backends.setdefault(name, compile_graph)

    def make(compile_):
        def compiled(model=None, *, backend="inductor", **kwargs):
            return compile_(model, backend=counting_backends.get(backend) or counting(backend), **kwargs)

        return compiled

    wrap(torch, "compile", make)
    report_at_end()


@hook("probe_gradient_reductions")
def probe_gradient_reductions(value: str | None) -> None:
    """Per training step: the element counts of the all-reduces and reduce-scatters (FSDP2's
    gradient collectives) and of the all-gathers (FSDP2's weights) larger than `value` elements
    (default 16: more than any scalar all-reduce of the loop)."""
    import torch.distributed as dist

    from p3d.trainer import Trainer

    smallest = int(value or 16)
    steps: list[dict] = []
    REPORT["gradient_reductions"] = steps

    def recording(kind: str, numel_of: Callable):
        def make(collective):
            def recorded(*args, **kwargs):
                numel = numel_of(*args, **kwargs)
                if steps and numel > smallest:
                    steps[-1][kind].append(numel)
                return collective(*args, **kwargs)

            return recorded

        return make

    wrap(dist, "all_reduce", recording("all_reduce", lambda tensor, *args, **kwargs: tensor.numel()))
    wrap(dist, "reduce_scatter_single", recording("reduce_scatter", lambda *args, **kwargs: kwargs.get("input", args[1] if len(args) > 1 else None).numel()))
    wrap(dist, "all_gather_single", recording("all_gather", lambda output, *args, **kwargs: output.numel()))

    def make(train_step):
        def recorded(self) -> dict:
            steps.append({"all_reduce": [], "reduce_scatter": [], "all_gather": []})
            return train_step(self)

        return recorded

    wrap(Trainer, "train_step", make)
    report_at_end()


def read_reports(directory: Path, ranks: int) -> list[dict]:
    """Every rank's report, in rank order (there must be one per rank)."""
    files = sorted(directory.glob("rank_*.json"), key=lambda path: int(path.stem.split("_")[1]))
    assert [path.name for path in files] == [f"rank_{rank}.json" for rank in range(ranks)], files
    return [json.loads(path.read_text()) for path in files]
