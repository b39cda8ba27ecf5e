"""Asynchronous save: stage into reusable CPU buffers, write and commit in a background thread.

Timeline of one ``AsyncSaver.save`` (every rank calls it together)::

    training thread                              background thread ("resumable-async-save")
    1 wait for the previous save (re-raise
      its error)
    2 plan_save       (collective, gloo group)
    3 stage: copy my chunks into CPU buffers
      allocated once and reused (pinned on CUDA)
    4 return the handle: training continues  ->  5 prepare temp folder (collective, gloo group)
                                                 6 write + fsync my files
                                                 7 agree + rank 0 commit (collective, gloo group)

All of the saver's collectives run on its own gloo group, created once when the saver
is built, so they can never interleave with the training loop's collectives on the
default group (which may be NCCL). Only one save is in flight per saver: the next
save waits for the previous one. A thread is enough: writing and checksumming release
the GIL (``os.write`` and xxhash work on buffers without holding it).

Hazard: the state is copied during ``save`` (step 3); mutating its tensors from another
thread *before* ``save`` returns corrupts the checkpoint. Mutating them afterwards is safe.
Call ``wait()`` (or ``CheckpointManager.close()``) before ``destroy_process_group``.

Exit: a save still in flight when the interpreter exits (``main`` returned, ``sys.exit``,
an uncaught exception) is finished first, by a hook that runs before ``concurrent.futures``
stops accepting work (the writer's thread pools need it); if it fails, its error is logged
and the process exits with status 1 instead of 0. :func:`finish_pending` does the same on
demand (the trainer calls it on its way out, before destroying the process group).
"""

from __future__ import annotations

import atexit
# Imported before our exit hook is registered: threading runs its exit hooks last-registered
# first, so ours (below) finishes pending saves before this module's hook stops the thread pools.
import concurrent.futures.thread  # noqa: F401
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from resumable import commit, dist
from resumable.errors import ConfigError
from resumable.save import (SavePlan, error_text, finish_save, plan_save, prepare_temp, record_metrics, timed,
                            write_files)

log = logging.getLogger(__name__)


class AsyncSaveHandle:
    """A save running in the background. ``wait()`` returns its folder or raises its error."""

    def __init__(self, final: Path) -> None:
        self.path = final
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        """True once the background work ended (committed or failed). Not collective."""
        return self._done.is_set()

    def wait(self) -> Path:
        """Block until the save is committed on every rank; return its folder.

        Raises:
            SaveError: the save failed on some rank (nothing was committed).
        """
        if self._thread is not None:
            self._thread.join()
        self._done.wait()
        untrack(self)
        if self._error is not None:
            raise self._error
        return self.path


class StagingBuffers:
    """CPU copies of tensors in buffers allocated once per key and reused by later copies.

    Pinned when CUDA is available, so device-to-host copies run at full speed. A key whose
    tensor changed shape or dtype gets a new buffer; :meth:`release_unused` frees the
    buffers no copy asked for since the previous call (the state's layout changed).
    """

    def __init__(self) -> None:
        self._buffers: dict[Any, torch.Tensor] = {}
        self._used: set[Any] = set()
        self._pin = torch.cuda.is_available()
        self._pending_cuda = False

    def copy(self, key: Any, src: torch.Tensor) -> torch.Tensor:
        """``src`` copied into the buffer of ``key``; call :meth:`release_unused` before using it."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = self._buffers[key] = torch.empty(src.shape, dtype=src.dtype, pin_memory=self._pin)
        self._used.add(key)
        self._pending_cuda |= src.is_cuda
        with torch.no_grad():
            buf.copy_(src.detach(), non_blocking=self._pin and src.is_cuda)
        return buf

    def release_unused(self) -> None:
        """Finish the copies (device-to-host ones are asynchronous) and free unused buffers."""
        if self._pending_cuda:
            torch.cuda.synchronize()  # the copies must be complete before training resumes
        for key in [k for k in self._buffers if k not in self._used]:
            del self._buffers[key]
        self._used, self._pending_cuda = set(), False


class Stager:
    """CPU copies of the chunks a rank writes (:class:`StagingBuffers` keyed by tensor name and box)."""

    def __init__(self) -> None:
        self._buffers = StagingBuffers()

    def stage(self, plan: SavePlan) -> None:
        """Copy every chunk this rank writes into its buffer and point the plan at the copies."""
        for _, items in plan.files.values():
            for item in items:
                item.tensor = self._buffers.copy((item.name, item.box), item.tensor)
        self._buffers.release_unused()


class AsyncSaver:
    """Runs saves in a background thread, one at a time, committing through its own gloo group.

    Args:
        process_group: the ranks that save together (default: all). The saver builds a
            gloo group over the same ranks.
        timeout: seconds one collective of that group may wait for a peer before it fails
            (a rank that died or hangs mid-save becomes a ``SaveError`` from ``wait()``
            instead of a hang). Default: ``RESUMABLE_COLLECTIVE_TIMEOUT`` seconds when set,
            else 30 minutes (a slow shared file system must not fail healthy saves).

    Who calls it: every rank of the default group constructs it at the same point (the
    group creation is collective), then every rank calls ``save`` / ``wait`` together.
    Concurrency: one saver per job; not thread safe (call it from the training thread).
    """

    def __init__(self, process_group: Any = None, timeout: float | None = None) -> None:
        ranks = None
        if dist.initialized() and process_group is not None:
            ranks = torch.distributed.get_process_group_ranks(process_group)
        self._group = (torch.distributed.new_group(ranks=ranks, backend="gloo",
                                                   timeout=collective_timeout(timeout))
                       if dist.initialized() else None)
        self._stager = Stager()
        self._inflight: AsyncSaveHandle | None = None

    def save(self, state: Mapping[str, Any], directory: str | os.PathLike[str], iteration: int, *,
             prefix: str = "CKP", save_optimizer: bool = True, remove_redundancy: bool = False,
             layout_info: Any = None, on_commit: Callable[[SavePlan], None] | None = None,
             metrics: Mapping[str, float] | None = None) -> AsyncSaveHandle:
        """Stage ``state`` and start writing it; returns once training may continue (``metrics``: as
        :func:`resumable.save`'s).

        Raises:
            SaveError: the *previous* save failed, or planning failed on some rank.

        Collective (on the saver's gloo group): every rank calls it together.
        """
        self.wait()
        started = time.perf_counter()
        plan = plan_save(state, directory, iteration, prefix=prefix, save_optimizer=save_optimizer,
                         remove_redundancy=remove_redundancy, group=self._group, layout_info=layout_info)
        plan.started = started
        record_metrics(plan, metrics)
        plan.seconds["plan"] = time.perf_counter() - started
        error = None
        try:
            timed(plan, "stage", self._stager.stage)
        except Exception as exc:  # still enter the background collectives, so peers learn it
            error = error_text(exc)
        commit.fault_point("staged")
        plan.seconds["blocked"] = time.perf_counter() - started  # training continues from here
        handle = AsyncSaveHandle(plan.final)
        handle._thread = threading.Thread(target=_run, args=(plan, error, on_commit, handle),
                                          name="resumable-async-save", daemon=False)
        self._inflight = handle
        track(handle)
        handle._thread.start()
        return handle

    def wait(self) -> Path | None:
        """Wait for the save in flight; return its folder (None if none), re-raising its error once."""
        handle, self._inflight = self._inflight, None
        return handle.wait() if handle is not None else None


#: Environment variable: seconds an async save's collective waits for a peer (see AsyncSaver).
TIMEOUT_ENV = "RESUMABLE_COLLECTIVE_TIMEOUT"


def collective_timeout(seconds: float | None = None) -> timedelta:
    """The bound of the async commit group's collectives: ``seconds``, else ``$RESUMABLE_COLLECTIVE_TIMEOUT``, else 30 min.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    if seconds is None:
        return env_seconds(TIMEOUT_ENV, timedelta(minutes=30))
    if not seconds > 0:
        raise ConfigError(f"collective timeout must be a positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


def env_seconds(name: str, default: timedelta) -> timedelta:
    """The duration environment variable ``name`` gives in seconds, ``default`` when unset or empty.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{name}={raw!r}: expected a positive number of seconds, e.g. 600")
    return timedelta(seconds=seconds)


def _run(plan: SavePlan, error: str | None, on_commit: Callable[[SavePlan], None] | None,
         handle: AsyncSaveHandle) -> None:
    """Background thread body: prepare, write, agree, commit. Never raises: errors go to the handle."""
    try:
        timed(plan, "plan", prepare_temp)
        written = None
        if error is None:
            try:
                written = timed(plan, "write", write_files)
            except Exception as exc:
                error = error_text(exc)
        finish_save(plan, written, error, on_commit)
    except BaseException as exc:  # re-raised in the training thread by wait()
        handle._error = exc
    finally:
        handle._done.set()


#: Background saves not yet waited for (AsyncSaveHandle, legacy BackgroundLegacySaves).
_PENDING: set[Any] = set()
_FAILED_AT_EXIT: list[str] = []
_DEFAULT: dict[Any, AsyncSaver] = {}


def track(pending: Any) -> None:
    """Finish ``pending`` (a background save: anything with ``wait()``) before the process exits."""
    _PENDING.add(pending)


def untrack(pending: Any) -> None:
    """``pending`` was waited for: the exit no longer needs to."""
    _PENDING.discard(pending)


def finish_pending() -> tuple[list[Path], list[str]]:
    """Wait for every background save of this process not yet waited for.

    Returns:
        The folders (legacy: files) committed, and the errors of the saves that failed.

    Not collective by itself, but each save's commit is: every rank must finish its saves
    (call this, or exit). Bounded by each saver's collective timeout.
    """
    committed, failures = [], []
    while _PENDING:
        try:
            path = _PENDING.pop().wait()
        except Exception as exc:  # one failed save must not leave the others unfinished
            failures.append(str(exc))
        else:
            if path is not None:
                committed.append(path)
    return committed, failures


def _finish_at_exit() -> None:
    """Threading's exit hook: runs before non-daemon threads are joined and before
    ``concurrent.futures`` refuses new work, which a plain ``atexit`` hook runs after."""
    for text in finish_pending()[1]:
        log.error("an asynchronous checkpoint save still running at exit failed (the process exits "
                  "with status 1): %s", text)
        _FAILED_AT_EXIT.append(text)


# Private but stable since Python 3.9: the only hook that runs early enough (see above).
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]


@atexit.register
def _fail_exit_status() -> None:
    """Make a save that failed at exit fail the process: the interpreter's status is fixed
    before exit hooks run, so leave with status 1 (logs and stdio flushed first)."""
    if _FAILED_AT_EXIT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def async_save(state: Mapping[str, Any], directory: str | os.PathLike[str], iteration: int, *,
               prefix: str = "CKP", save_optimizer: bool = True, remove_redundancy: bool = False,
               process_group: Any = None, layout_info: Any = None) -> AsyncSaveHandle:
    """Like :func:`resumable.save`, but returns as soon as the state is copied to CPU.

    The first call builds a process-wide :class:`AsyncSaver` (and its gloo group) for
    ``process_group``; later calls reuse it, so staging buffers are allocated once.

    Args:
        state, directory, iteration, prefix, save_optimizer, remove_redundancy,
        process_group, layout_info: as for :func:`resumable.save`.

    Returns:
        An :class:`AsyncSaveHandle`; ``handle.wait()`` returns the committed folder.

    Raises:
        SaveError: the previous asynchronous save failed, or planning failed on a rank.
            Errors of this save surface from ``handle.wait()`` or the next ``async_save``.

    Example:
        >>> h = async_save({"model": model.state_dict()}, "ckpt", 100)
        >>> train_more()          # safe: the state was staged
        >>> h.wait()

    Hazard: mutating the state's tensors from another thread before this call returns
    corrupts the checkpoint. Collective: every rank of ``process_group`` calls it.
    """
    dist.require_group("resumable.async_save")
    key = id(process_group) if process_group is not None else None
    saver = _DEFAULT.get(key)
    if saver is None:
        saver = _DEFAULT[key] = AsyncSaver(process_group)
    return saver.save(state, directory, iteration, prefix=prefix, save_optimizer=save_optimizer,
                      remove_redundancy=remove_redundancy, layout_info=layout_info)
