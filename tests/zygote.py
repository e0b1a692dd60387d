"""A test-only server: import p3d once, then fork a fresh child for each run a test asks for.

    python tests/zygote.py     (started by tests/conftest.py; one per test session)

Every run of `python -m p3d.train`, tests/hookrun.py or tests/forkrun.py spends ~5 s of this
machine's CPU importing torch, transformers and datasets before it trains for a second or two; the
distributed tests start a few hundred such runs. This process imports them once (as forkrun does for
its ranks) and forks per run. The child becomes the run: its own process group, stdin from
/dev/null, stdout/stderr into the files the test reads, the test's cwd and environment, the same
entry point; it leaves the request loop and ends as that script would (an exception prints its
traceback and exits 1, atexit handlers and interpreter teardown run).

The client (tests/conftest.py) only sends runs whose environment differs from this server's in
P3D_* keys, which p3d and the test hooks read at run time, never at import (and pytest's
PYTEST_CURRENT_TEST).

Protocol, one request at a time, one JSON object per line: the client writes {"argv": [...],
"cwd": ..., "env": {...}, "stdout": path, "stderr": path}; the server answers {"pid": N} at once and
{"returncode": N} when the child has ended (negative: killed by that signal, as subprocess reports).
argv is what would follow `python`: ["-m", "p3d.train", ...], [".../hookrun.py", ...] or
[".../forkrun.py", N, ...].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import forkrun  # importing it imports torch, transformers' Llama and OPT, datasets, p3d.train and the hooks
import hookrun

import p3d.train


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> dict | None:
    """Answer requests until stdin closes; in a forked child, return its request."""
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"returncode": os.waitstatus_to_exitcode(status)})
    return None


def become(request: dict) -> None:
    """Turn this forked child into the process the request describes (all but its entry point)."""
    os.setpgid(0, 0)  # the client kills the whole run (forked ranks included) on a timeout
    forkrun.die_with_launcher()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY), (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])


def run(request: dict) -> int | None:
    become(request)
    argv = request["argv"]
    if argv[:2] == ["-m", "p3d.train"]:
        sys.argv = [p3d.train.__file__, *argv[2:]]
        return p3d.train.main(argv[2:])
    script = Path(argv[0]).name
    sys.argv = list(argv)
    if script == "forkrun.py":
        return forkrun.main()
    if script == "hookrun.py":
        return hookrun.main()
    raise SystemExit(f"zygote: cannot run {argv[0]!r}")


if __name__ == "__main__":
    child_request = serve()
    if child_request is not None:
        sys.exit(run(child_request))
