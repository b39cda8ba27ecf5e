"""Small ``torch.distributed`` helpers with a single-process fallback.

Without an initialised process group everything behaves as a world of one: rank 0,
size 1, collectives return their own input; the API's entry points first refuse that
when the environment names a multi-process launch (``require_group``). Each function
says who must call it:

=========================  ==========================================================
function                   who calls it
=========================  ==========================================================
``rank``, ``world_size``,  anyone, any time (not collective)
``global_rank``,
``require_group``
``barrier``                every rank of ``group`` (collective)
``all_gather_object``      every rank of ``group`` (collective)
``gather_object``          every rank of ``group`` (collective); only ``dst`` gets a list
``scatter_object``         every rank of ``group`` (collective); each gets its own item
``broadcast_object``       every rank of ``group`` (collective)
``all_reduce_max``         every rank of ``group`` (collective)
``agree``, ``agree_on``     every rank of ``group`` (collective), including failed ones
``new_gloo_group``         every rank of the default group, once (collective)
=========================  ==========================================================

Collectives on one group must be called in the same order on every rank; the async
saver therefore uses its own gloo group, so its collectives never interleave with the
training loop's.

Traffic: ``gather_object`` and ``scatter_object`` are point-to-point (a length, then the
pickled bytes), so a rank other than the root sends or receives only its own item; torch's
object gather all-gathers every rank's size first, which costs every rank O(world size).
``agree`` all-reduces one failure count and gathers error texts only when something failed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pickle

import torch
import torch.distributed as dist

from resumable import errors
from resumable.errors import SaveError

Group = Any  # torch.distributed.ProcessGroup | None (None = the default group)


def initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


#: What torchrun (and launchers like it) set in each process of a job.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def require_group(what: str) -> None:
    """Refuse to act alone when the environment says this process is one of several ranks.

    Under ``torchrun`` without ``init_process_group`` every rank would act as a world of
    one: all of them save as rank 0 of the same folder (the second meets the first's lock:
    ``LockedError``). Not collective.

    Raises:
        ConfigError: ``WORLD_SIZE`` above 1 or ``RANK`` above 0 and no process group, naming
            ``what`` (the API called) and the variables seen.
    """
    if initialized():
        return
    seen = {name: os.environ[name] for name in LAUNCH_ENV if name in os.environ}
    world, me = seen.get("WORLD_SIZE", "1"), seen.get("RANK", "0")
    if (world.isdigit() and int(world) > 1) or (me.isdigit() and int(me) > 0):
        variables = ", ".join(f"{name}={value}" for name, value in seen.items())
        raise errors.ConfigError(
            f"{what}: this process is one rank of a multi-process job ({variables} in the environment, as "
            "torchrun sets them) but torch.distributed has no process group: call "
            "torch.distributed.init_process_group() in every process first (backend \"gloo\" on CPU, \"nccl\" on "
            "GPUs), so that the ranks save and load one checkpoint together")


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


def _send(obj: Any, dst: int, group: Group) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=global_rank(group, dst), group=group)
    if data:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=global_rank(group, dst), group=group)


def _recv(src: int, group: Group) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src=global_rank(group, src), group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src=global_rank(group, src), group=group)
    return pickle.loads(data.numpy().tobytes())


def gather_object(obj: Any, dst: int = 0, group: Group = None) -> list[Any] | None:
    """Every rank's ``obj`` on group rank ``dst`` (None elsewhere). Collective.

    Point to point: a rank other than ``dst`` sends its own item and receives nothing.
    """
    n = world_size(group)
    if n == 1:
        return [obj]
    me = rank(group)
    if me != dst:
        _send(obj, dst, group)
        return None
    return [obj if r == dst else _recv(r, group) for r in range(n)]


def scatter_object(items: list[Any] | None, src: int = 0, group: Group = None) -> Any:
    """Item ``r`` of ``src``'s ``items`` on group rank ``r``. Collective.

    Point to point: each rank other than ``src`` receives only its own item. ``items``
    matters on ``src`` only (one per group rank).
    """
    n = world_size(group)
    if n == 1:
        assert items is not None
        return items[0]
    me = rank(group)
    if me != src:
        return _recv(src, group)
    assert items is not None and len(items) == n, "scatter_object: one item per rank on the source"
    for r in range(n):
        if r != src:
            _send(items[r], r, group)
    return items[src]


def all_reduce_max(values: list[int], group: Group = None) -> list[int]:
    """Element-wise maximum of every rank's ``values`` (int64). Collective: every rank of ``group``."""
    if world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


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
    if all_reduce_max([error is not None], group)[0] == 0:
        return
    texts = all_gather_object(error, group)  # only when a rank failed
    failed = [(global_rank(group, r), e) for r, e in enumerate(texts) if e is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise SaveError(f"{what} failed on {len(failed)} rank(s), nothing was committed: {detail}")


def agree_on(error: BaseException | None, group: Group, *, all_used: bool = True) -> bool:
    """Every rank learns every rank's failure; all raise if any failed.

    The failing rank re-raises its own exception; the others raise the same error type
    with the failing rank's message, so no rank is left waiting in a later collective.

    Returns:
        True when some rank passed ``all_used`` (its state uses every saved tensor, so
        none is left unused); the same on every rank. The flag rides in the same 8 bytes.

    Collective: every rank of ``group`` calls it, failed or not, at the same step.
    """
    top = all_reduce_max([2 if error is not None else int(all_used)], group)[0]
    if top < 2:
        return bool(top)  # the common case costs one 8-byte all-reduce, whatever the world size
    payload = None if error is None else (type(error).__name__, str(error))
    gathered = all_gather_object(payload, group)
    if error is not None:
        raise error
    for r, item in enumerate(gathered):
        if item is not None:
            kind, message = item
            cls = getattr(errors, kind, None)
            if not (isinstance(cls, type) and issubclass(cls, errors.CheckpointError)):
                cls = errors.CheckpointError
            raise cls(f"rank {global_rank(group, r)} failed: {message}")


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
