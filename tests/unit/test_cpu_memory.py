"""dist.cpu_return_freed_memory: freed buffers leave the process at once (Linux, glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p3d.distributed.env import glibc_mallopt

# Frees 200 MiB of 1 MiB tensors after a 16 MiB one has raised glibc's dynamic mmap threshold (so by
# default the 1 MiB blocks come from the heap and stay there), then prints how much RSS went back.
PROGRAM = """
import sys, torch
from p3d.distributed.env import return_freed_memory_at_once
def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "returned":
    return_freed_memory_at_once()
big = torch.ones(4 * 2**20); del big  # 16 MiB, freed: the threshold rises to it
blocks = [torch.ones(2**18) for _ in range(200)]  # 1 MiB each, written
pin = torch.ones(2**16)  # a block after them (256 KiB, also from the heap) keeps the heap from trimming its top
before = rss_mib()
del blocks
print(before - rss_mib())
"""


@pytest.mark.skipif(glibc_mallopt() is None, reason="needs glibc")
@pytest.mark.parametrize("mode, returned_at_least, returned_at_most", [("default", 0, 50), ("returned", 190, 1000)])
def test_freed_buffers_go_back_to_the_os_only_when_asked(mode, returned_at_least, returned_at_most):
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    returned_mib = float(done.stdout.strip())
    assert returned_at_least <= returned_mib <= returned_at_most, returned_mib
