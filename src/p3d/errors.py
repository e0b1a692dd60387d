"""User-facing errors by kind: one line each, naming the config key and the fix, never a traceback.

    ConfigError   exit 2   the input is wrong (a key, a value, a file it names): fix it and rerun
    RunError      exit 3   a valid run failed while running (the loss diverged, a checkpoint save
                           failed, nodes disagree about the storage): read the line, then resume

docs/troubleshooting.md lists the exit codes; `p3d train` passes a worker's code through.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

CONFIG_ERROR_EXIT = 2
RUN_ERROR_EXIT = 3


class P3DError(Exception):
    """A problem p3d explains itself: one line per problem, exit code by kind."""

    exit_code = 1

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(P3DError):
    """One or more problems with the user's input; each is one line that names a config key."""

    exit_code = CONFIG_ERROR_EXIT


class RunError(P3DError):
    """A run that was validly configured failed at run time; the line names what to look at."""

    exit_code = RUN_ERROR_EXIT


def debug_enabled() -> bool:
    return os.environ.get("P3D_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def exits_cleanly(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn a P3DError into `p3d: error: ...` lines on stderr (rank 0 only) and its kind's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except P3DError as error:
            if debug_enabled():
                raise
            if os.environ.get("RANK", "0") == "0":
                for problem in error.problems:
                    print(f"p3d: error: {problem}", file=sys.stderr, flush=True)
            sys.exit(error.exit_code)

    return wrapper
