"""Test-only fault injection, driven by environment variables (never by the config).

    P3D_FAIL_AFTER_STEP=n   the rank exits with code 17 after step n (after any save at step n)
    P3D_KILL_IN_SAVE=n      the rank SIGKILLs itself inside the save of step n, after writing its
                            shards and before the completion marker
    P3D_FAIL_RANK=r         only rank r does it (default: every rank)

Faults fire only in the first attempt of a job: torchrun sets TORCHELASTIC_RESTART_COUNT in a
restarted worker group, which then resumes and runs past step n instead of dying again.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist


def _armed(variable: str, step: int) -> bool:
    value = os.environ.get(variable)
    if value is None or int(value) != step:
        return False
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    rank = os.environ.get("P3D_FAIL_RANK")
    return rank is None or int(rank) == dist.get_rank()


def fail_after_step(step: int) -> None:
    if _armed("P3D_FAIL_AFTER_STEP", step):
        print(f"p3d: injected failure after step {step} on rank {dist.get_rank()}", file=sys.stderr, flush=True)
        os._exit(17)


def kill_in_save(step: int) -> None:
    if _armed("P3D_KILL_IN_SAVE", step):
        print(f"p3d: injected SIGKILL in the save of step {step} on rank {dist.get_rank()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
