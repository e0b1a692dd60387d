"""User-facing errors: one line each, naming the config key and the fix, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """One or more problems with the user's input; each is one line that names a config key."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def runtime_failure(problem: str) -> Exception:
    """A failure of the run itself (a save that did not land, storage the ranks do not share, a rank
    that crashed while the ranks agreed on something), not a problem with the user's input. It is a
    ConfigError (one line, exit 2) until p3d has an error class of its own for runtime failures:
    this is the one place to change then."""
    return ConfigError(problem)


def debug_enabled() -> bool:
    return os.environ.get("P3D_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def exits_cleanly_on_config_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn a ConfigError into `p3d: error: ...` lines on stderr (rank 0 only) and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as error:
            if debug_enabled():
                raise
            if os.environ.get("RANK", "0") == "0":
                for problem in error.problems:
                    print(f"p3d: error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
