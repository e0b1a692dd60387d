"""A test-only launcher: import p3d once, then fork N ranks that run `p3d.train` on gloo.

    python tests/forkrun.py N key=value ...

torchrun starts every rank as a fresh interpreter, and each one spends ~5 s of CPU importing
torch, transformers and datasets: with 8 ranks on this machine's 2 cores that is ~20 s of every
multi-rank test. Forked ranks share the parent's imported modules, so they start at once. The
training code is the same (`p3d.train.main`); only the launcher differs, so tests that are about
torchrun itself (restarts, SIGTERM, multi-node rendezvous) keep using torchrun.

Like torchrun it sets RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, shares
its stdout/stderr with the ranks, stops the other ranks when one fails, and exits non-zero then.
The test hooks named in P3D_TEST_HOOKS (tests/hooks.py) are installed before the fork, so every
rank runs with them. Under pytest this launcher is itself a fork of tests/zygote.py, which has
already imported all of the above.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

# What a rank imports lazily, loaded before the fork so that no rank pays for it.
import datasets  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import transformers.models.opt.modeling_opt  # noqa: F401

import hooks
import p3d.train


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_launcher() -> None:
    """A rank gets SIGKILL when this launcher dies (a test's timeout kills only the launcher; orphaned
    ranks would go on computing on a shared machine). Linux only; elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_rank(rank: int, world: int, port: int, overrides: list[str]) -> int:
    die_with_launcher()
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        p3d.train.main(overrides)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def main() -> int:
    world, overrides = int(sys.argv[1]), sys.argv[2:]
    hooks.install_from_env()
    port = free_port()
    children = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = run_rank(rank, world, port, overrides)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children[pid] = rank
    worst = 0
    while children:
        pid, status = os.wait()
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and worst == 0:
            worst = code if code > 0 else 1
            print(f"forkrun: rank failed with exit code {code}; stopping the others", file=sys.stderr, flush=True)
            time.sleep(2)  # let the others report the same problem, as torchrun would
            for other in children:
                os.kill(other, signal.SIGKILL)
    return worst


if __name__ == "__main__":
    sys.exit(main())
