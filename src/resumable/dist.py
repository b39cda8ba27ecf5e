"""Small ``torch.distributed`` helpers with a single-process fallback.

Without an initialised process group everything behaves as a world of one: rank 0,
size 1, collectives return their own input. Each function says who must call it:

=========================  ==========================================================
function                   who calls it
=========================  ==========================================================
``rank``, ``world_size``,  anyone, any time (not collective)
``global_rank``
``barrier``                every rank of ``group`` (collective)
``all_gather_object``      every rank of ``group`` (collective)
``gather_object``          every rank of ``group`` (collective); only ``dst`` gets a list
``broadcast_object``       every rank of ``group`` (collective)
``agree``                  every rank of ``group`` (collective), including failed ones
``new_gloo_group``         every rank of the default group, once (collective)
=========================  ==========================================================

Collectives on one group must be called in the same order on every rank; the async
saver therefore uses its own gloo group, so its collectives never interleave with the
training loop's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from resumable.errors import SaveError

Group = Any  # torch.distributed.ProcessGroup | None (None = the default group)


def initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 without a process group). Not collective."""
    return dist.get_rank(group) if initialized() else 0


def world_size(group: Group = None) -> int:
    """Number of ranks in ``group`` (1 without a process group). Not collective."""
    return dist.get_world_size(group) if initialized() else 1


def global_rank(group: Group, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (identity without a group). Not collective."""
    if not initialized() or group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def barrier(group: Group = None) -> None:
    """Wait for every rank of ``group``. Collective: every rank of ``group`` calls it."""
    if world_size(group) > 1:
        dist.barrier(group=group)


def all_gather_object(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's ``obj``, indexed by group rank. Collective: every rank of ``group`` calls it."""
    n = world_size(group)
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, dst: int = 0, group: Group = None) -> list[Any] | None:
    """Every rank's ``obj`` on group rank ``dst`` (None elsewhere). Collective.

    ``dst`` is a rank within ``group``.
    """
    n = world_size(group)
    if n == 1:
        return [obj]
    me = rank(group)
    out: list[Any] | None = [None] * n if me == dst else None
    dist.gather_object(obj, out, dst=global_rank(group, dst), group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Group = None) -> Any:
    """``obj`` of group rank ``src``, on every rank. Collective: every rank of ``group`` calls it."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=global_rank(group, src), group=group)
    return box[0]


def agree(error: str | None, what: str, group: Group = None) -> None:
    """Make every rank learn every failure; raise ``SaveError`` on all ranks if any failed.

    Each rank passes None (it succeeded) or the text of its error. The texts are
    all-gathered, so a failing rank cannot leave the others waiting in a later
    collective: everyone leaves this call knowing the same thing.

    Args:
        error: None, or this rank's error message.
        what: the step, for the message ("writing iteration_00000100").
        group: the process group.

    Raises:
        SaveError: on every rank, naming each failing (global) rank and its message.

    Collective: every rank of ``group`` calls it, failed or not.
    """
    errors = all_gather_object(error, group)
    failed = [(global_rank(group, r), e) for r, e in enumerate(errors) if e is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise SaveError(f"{what} failed on {len(failed)} rank(s), nothing was committed: {detail}")


def new_gloo_group(timeout: timedelta | None = None) -> Group:
    """A new gloo group over all ranks (None without a process group).

    Collective: every rank of the default group calls it, once, in the same order
    relative to other ``new_group`` calls.
    """
    if not initialized():
        return None
    kwargs: dict[str, Any] = {"backend": "gloo"}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return dist.new_group(**kwargs)
