"""Two plain processes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test): after p3d's
`shutdown`, can a gloo thread still touch Python while the interpreter is torn down?

This reproduces, deterministically, the abort that ring-CP runs hit at random at exit
("terminate called without an active exception", SIGABRT). Rank 0 leaves with a collective still
held by a gloo worker thread: an all-reduce on a mesh's group (the mesh kept alive by DTensor's
caches, as in a run) that rank 1 joins only a second after the shutdown barrier. When the worker
drops the finished collective, freeing its tensor takes the GIL (torch 2.13 releases a tensor's
Python object when the last other C++ reference goes). If that worker outlived `shutdown`, the
exit handler below keeps the GIL while rank 1 joins, as the main thread of a finishing run may;
the worker then waits for the GIL until the interpreter is finalizing, Python ends it with
pthread_exit, and the unwinding through a C++ destructor calls std::terminate. With the groups
destroyed inside `shutdown`, rank 0 waits there for the collective, the worker frees the tensor
while the interpreter is whole, and rank 0 exits 0.

Rank 0 prints "gloo threads after shutdown: N" (Linux thread names).
"""

from __future__ import annotations

import atexit
import os
import sys
import time

JOIN_DELAY_S = 1.0  # rank 1 joins the pending all-reduce this long after the barrier


def hold_the_gil_until_finalization(seconds: float = 3 * JOIN_DELAY_S) -> None:
    """Registered before any other exit handler, so it runs last, right before finalization begins."""
    sys.setswitchinterval(60)  # a thread waiting for the GIL gets it only once this one blocks
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


class SlowFinalization:
    """Released while the interpreter finalizes; sleeping there hands the GIL to a waiting thread."""

    def __del__(self, sleep=time.sleep, seconds=JOIN_DELAY_S):  # module globals may be gone by now
        sleep(seconds)


if os.environ.get("RANK") == "0":
    atexit.register(hold_the_gil_until_finalization)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.distributed.tensor import Replicate, distribute_tensor  # noqa: E402

from p3d.config.schema import DistConfig  # noqa: E402
from p3d.distributed.env import init_distributed, shutdown  # noqa: E402

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def gloo_threads() -> int:
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    return sum(name in GLOO_THREADS for name in names)


def main() -> None:
    env = init_distributed(DistConfig(device="cpu"))
    group = dist.new_group(backend="gloo")  # a group of its own, not the default one the barrier runs on
    mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("ranks",))
    distribute_tensor(torch.ones(2), mesh, [Replicate()]) * 2  # DTensor's caches now keep the mesh alive
    if env.rank == 0:
        dist.all_reduce(torch.ones(1024), group=group, async_op=True)  # completes once rank 1 joins
        del group
        shutdown(mesh)
        print(f"gloo threads after shutdown: {gloo_threads()}", flush=True)
        globals()["slow"] = SlowFinalization()
        return
    dist.barrier()  # rank 0's shutdown barrier
    time.sleep(JOIN_DELAY_S)
    group.allreduce([torch.ones(1024)]).wait()  # by the group object: rank 1 has not left the group
    sys.stdout.flush()
    os._exit(0)  # rank 1's own exit is not under test


if __name__ == "__main__":
    main()
