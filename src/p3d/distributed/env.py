"""Process group, device and seeds: everything that is per process and set up once."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from p3d import compat
from p3d.config.schema import DistConfig
from p3d.errors import ConfigError

BACKEND_FOR_DEVICE = {"cuda": "nccl", "cpu": "gloo", "xpu": "xccl", "hpu": "hccl"}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def launch_example(processes: int) -> str:
    """How to start `processes` ranks, in the words of the launcher that started this one."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by every `accelerate launch`
        # Without --multi_gpu, accelerate starts one plain process whatever --num_processes says.
        return f"accelerate launch --multi_gpu --num_processes={processes} ... (--multi_gpu on CPU too)"
    return f"torchrun --nproc_per_node={processes}"


# What `accelerate launch` asks of the script it starts (environment variable, value meaning "off",
# its flag, p3d's own key for it): p3d does not read accelerate's settings, so none may be set.
ACCELERATE_SETTINGS = (
    ("ACCELERATE_MIXED_PRECISION", "no", "--mixed_precision", "train.dtype=bf16"),
    ("ACCELERATE_DYNAMO_BACKEND", "NO", "--dynamo_backend", "train.compile=true"),
    ("ACCELERATE_USE_FSDP", "false", "--use_fsdp", "parallel.dp (p3d shards with FSDP2 itself)"),
    ("ACCELERATE_USE_DEEPSPEED", "false", "--use_deepspeed", "parallel.dp (p3d shards with FSDP2 itself)"),
)


def accelerate_problems() -> list[str]:
    """`accelerate launch` settings that p3d would otherwise silently ignore (from flags or `accelerate config`)."""
    problems = []
    for variable, off, flag, own_key in ACCELERATE_SETTINGS:
        value = os.environ.get(variable, off)
        if value.lower() != off.lower():
            shown = "" if value.lower() == "true" else f" {value}"
            problems.append(f"accelerate launch {flag}{shown}: p3d does not use accelerate's settings; drop it (or set it off in `accelerate config`) and use {own_key}")
    return problems


def resolve_device_type(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in BACKEND_FOR_DEVICE:
        raise ConfigError(f"dist.device={requested}: unknown device (use auto, {', '.join(BACKEND_FOR_DEVICE)})")
    available = requested == "cpu" or (hasattr(torch, requested) and getattr(torch, requested).is_available())
    if not available:
        raise ConfigError(f"dist.device={requested}: no {requested} device is available here (use dist.device=cpu or auto)")
    return requested


def backend_problems(requested: str, device_type: str) -> list[str]:
    """dist.backend: every backend it names is built into this PyTorch and handles the device's tensors.

    `requested` is auto, one backend (gloo) or one per device (cpu:gloo,cuda:nccl)."""
    if requested == "auto":
        return []
    available = [name for name in dist.Backend.backend_list if name not in ("undefined", "fake") and dist.is_backend_available(name)]
    per_device = dict(part.split(":", 1) if ":" in part else (None, part) for part in requested.split(","))
    for name in per_device.values():
        if not dist.is_backend_available(name):
            return [f"dist.backend={requested}: this PyTorch build has no {name} backend (it has {', '.join(available)}); use dist.backend=auto"]
    backend = per_device.get(device_type, per_device.get(None))
    devices = dist.Backend.backend_capability.get(backend, [])
    if backend is None or device_type not in devices:
        return [f"dist.backend={requested}: no backend for {device_type} tensors (dist.device={device_type}); use dist.backend=auto"]
    return []


def resolve_backend(requested: str, device_type: str) -> str:
    if requested != "auto":
        return requested
    backend = BACKEND_FOR_DEVICE[device_type]
    # CPU tensors (checkpoint metadata, small counters) need gloo beside an accelerator's backend.
    return backend if device_type == "cpu" else f"cpu:gloo,{device_type}:{backend}"


# glibc's mallopt parameter for the size from which a block is its own mapping (unmapped when freed).
M_MMAP_THRESHOLD = -3
RETURNED_BLOCK_BYTES = 64 * 2**10
NEEDS_GLIBC = "dist.cpu_return_freed_memory=true needs Linux with glibc (its mallopt); set dist.cpu_return_freed_memory=false"


def glibc_mallopt():
    """glibc's `mallopt`, or None where the C library is not glibc (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return getattr(libc, "mallopt", None)


def return_freed_memory_at_once() -> None:
    """dist.cpu_return_freed_memory: every block over 64 KiB gets its own mapping, returned when freed.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB) and keeps freed
    blocks below it in its heaps: a CPU rank's RSS then exceeds its live tensors by 0.5-2 GB
    (docs/results/plan_accuracy.md). Fixing the threshold ends that, at the cost of a page fault per
    fresh page of every large allocation."""
    mallopt = glibc_mallopt()
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, RETURNED_BLOCK_BYTES) != 1:
        raise ConfigError(NEEDS_GLIBC)


def init_distributed(cfg: DistConfig) -> DistEnv:
    """Join the process group (torchrun's env vars, or a one-process group when launched plainly)."""
    device_type = resolve_device_type(cfg.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cpu":
        device = torch.device("cpu")
        if cfg.cpu_return_freed_memory:
            return_freed_memory_at_once()
    else:
        device = torch.device(device_type, local_rank)
        getattr(torch, device_type).set_device(device)
    timeout = timedelta(seconds=cfg.timeout_s)
    backend = resolve_backend(cfg.backend, device_type)
    compat.import_dynamo()  # before the group exists, so that shutdown() can release it
    if "RANK" in os.environ:
        _warn_about_shared_store_on_restart()
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device_type != "cpu" else None)
    else:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)  # port 0: the OS picks a free one
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)


def _warn_about_shared_store_on_restart() -> None:
    """torchrun's shared rendezvous store keeps a failed attempt's addresses (pytorch/pytorch#135712)."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and rank_from_env() == 0:
        print(
            "p3d: warning: torchrun restarted this group with its shared rendezvous store; if the process group cannot "
            "connect, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (p3d train does)",
            file=sys.stderr,
            flush=True,
        )


def shutdown(mesh: DeviceMesh | None = None) -> None:
    """Leave the process group after a run that succeeded, so that no communication thread outlives it.

    `destroy_process_group()` alone does not stop gloo: its backend has no shutdown, and each group's
    worker threads live as long as the group object, which the DeviceMesh (kept alive by DTensor's
    caches) and the model's FSDP state hold until the interpreter exits. A worker that drops its last
    finished collective then (with the Python tensors it held) must take the GIL of an interpreter
    being torn down; Python ends such a thread with pthread_exit, whose unwinding through a C++
    destructor calls std::terminate ("terminate called without an active exception", SIGABRT).
    So every group is destroyed here, while the interpreter is whole: all ranks are done (barrier),
    the groups leave c10d's registries and the mesh's, and collecting the run's objects drops the last
    references; each group's destructor, which torch runs without the GIL, joins its threads.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    if mesh is not None:
        compat.release_mesh_process_groups(mesh)
    gc.collect()


def abandon() -> None:
    """Leave the process group after a failure: at once, since the other ranks may never arrive."""
    if dist.is_initialized():
        dist.destroy_process_group()
