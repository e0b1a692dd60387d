"""Steps every rank takes together, failing together: a problem on one rank is an error on all of
them (one line from rank 0), never some ranks waiting in a collective for one that has left."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from p3d.errors import P3DError, RunError

T = TypeVar("T")


def on_every_rank(step: Callable[[], T], what: str) -> list[T]:
    """Run `step` on every rank and return every rank's result (in rank order).

    If it raises on any rank, every rank raises: the failing rank its own exception, the others
    the same P3DError (same class and lines), or, for an unexpected exception, a one-line error
    that names the rank and `what` it was doing (its traceback is on that rank's stderr)."""
    failure = None
    try:
        outcome = ("ok", step())
    except P3DError as error:
        failure, outcome = error, ("error", (type(error), error.problems))
    except Exception as error:
        failure, outcome = error, ("crash", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    failed = next((rank for rank, (kind, _) in enumerate(outcomes) if kind != "ok"), None)
    if failed is None:
        return [value for _, value in outcomes]
    if failure is not None:
        raise failure
    kind, detail = outcomes[failed]
    if kind == "error":
        error_type, problems = detail
        raise error_type(problems)
    raise RunError(f"rank {failed} failed while {what}: {detail} (its traceback is in its output)")
