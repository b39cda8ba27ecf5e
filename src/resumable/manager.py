"""CheckpointManager: when to save, how (sync or async), and how many checkpoints to keep.

Concurrency contract: multi-process safe (every rank builds the manager and calls
``save`` / ``wait`` / ``close`` together, in the same order); not thread safe (call it
from the training thread only); one job per checkpoint directory: rank 0 holds an
exclusive lock on ``<directory>/.lock`` (:mod:`resumable.lock`) from construction to
``close()``, so a second job pointed at the same folder fails with ``LockedError``
before it removes anything (construction removes leftover temp folders of earlier runs).

Example (single process or under ``torchrun``)::

    mgr = CheckpointManager("output/checkpoint", keep_checkpoint_max=3, async_save=True)
    for step in range(1, steps + 1):
        train_step()
        if mgr.should_save(step, last_step=steps):
            mgr.save({"model": model_sd, "optimizer": optim_sd, "global_step": step}, step)
    mgr.close()   # waits for the last save to be committed
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from resumable import commit, dist, storage
from resumable.async_save import AsyncSaveHandle, AsyncSaver
from resumable.errors import CheckpointError, ConfigError, NewerCheckpointsError, describe_os_error
from resumable.events import Callback, EventLog, make_event
from resumable.formats import v2
from resumable.formats.schema import listed
from resumable.lock import DirectoryLock, lock_for_job
from resumable.preemption import DEFAULT_SIGNALS, Preemption
from resumable.retention import KeepBest, Metric, Missing, Policy, check_metrics
from resumable.load import LoadResult
from resumable.save import SavePlan, save as sync_save

log = logging.getLogger(__name__)


class CheckpointManager:
    """Saves Checkpoint 2.0 checkpoints every N steps and keeps the newest ``keep_checkpoint_max``.

    Args:
        directory: the checkpoint folder (``<output_dir>/checkpoint``).
        prefix: file name prefix (``CKP``).
        save_checkpoint_steps: save every this many steps (``should_save``).
        keep_checkpoint_max: the newest committed checkpoints to keep (None: all). The tracker's
            target and ``protected`` iterations are never deleted.
        keep_every_n_steps: also keep, forever, every iteration divisible by this.
        keep_best: also keep the best N by a metric each save records (``save(..., metrics=)``):
            ``KeepBest(3, metric="loss", mode="min")``. An iteration is kept when any policy
            keeps it (:mod:`resumable.retention`).
        async_save: stage and write in the background (training continues after staging).
        save_optimizer: store the optimizer state (``-opt-`` files).
        remove_redundancy: store each replicated chunk once.
        checkpoint_format: ``safetensors``; ``ckpt`` is accepted with a warning and
            saved as safetensors (Checkpoint 2.0 has no .ckpt variant).
        process_group: the ranks that save together (default: all).
        preemption: take over the preemption signals (True: SIGTERM and SIGUSR1, or a list of
            names) so that :meth:`preemption_requested` sees them (:mod:`resumable.preemption`).
        layout_info: recorded in metadata.json (see :func:`resumable.save`).

        events_path: a JSON-lines file rank 0 appends one event to per save and load
            (:mod:`resumable.events`); each is also logged as a one-line summary.
        on_event: called on rank 0 with each event (a dict), beside ``events_path``.
        collective_timeout: bound on each collective of an async save's gloo group (a rank
            that died or hangs becomes a ``SaveError`` after it); default
            ``RESUMABLE_COLLECTIVE_TIMEOUT`` seconds, else 30 minutes (see
            :class:`~resumable.async_save.AsyncSaver`).

    Raises:
        ConfigError: a value out of range, naming the YAML key; a process of a multi-process launch
            (``RANK``/``WORLD_SIZE`` set) without ``init_process_group`` (``dist.require_group``; as
            ``save``, ``async_save``, ``load`` and ``load_async``).
        LockedError: on every rank, when another job holds the folder's lock.

    Who calls it: every rank constructs it at the same point (collective: rank 0 takes
    the lock and cleans leftovers while the others wait; an async manager also creates
    its gloo group).
    """

    def __init__(self, directory: str | os.PathLike[str], *, prefix: str = "CKP", save_checkpoint_steps: int = 1,
                 keep_checkpoint_max: int | None = 5, keep_every_n_steps: int | None = None,
                 keep_best: KeepBest | None = None, async_save: bool = False, save_optimizer: bool = True,
                 remove_redundancy: bool = False, checkpoint_format: str = "safetensors",
                 process_group: Any = None, layout_info: Any = None,
                 collective_timeout: float | None = None, events_path: str | os.PathLike[str] | None = None,
                 on_event: Callback | None = None, preemption: bool | Iterable[str] = False) -> None:
        dist.require_group("CheckpointManager")
        if save_checkpoint_steps < 1:
            raise ConfigError(f"save_checkpoint_steps must be at least 1, got {save_checkpoint_steps}")
        self.retention = Policy(keep_checkpoint_max, keep_every_n_steps, keep_best)
        if checkpoint_format not in ("safetensors", "ckpt"):
            raise ConfigError(f"checkpoint_format must be 'safetensors' or 'ckpt', got {checkpoint_format!r}")
        if checkpoint_format == "ckpt":
            log.warning("checkpoint_format 'ckpt' is not available in Checkpoint 2.0; saving safetensors")
        self.directory = storage.as_path(directory)
        self.prefix = prefix
        self.save_checkpoint_steps = save_checkpoint_steps
        self._metrics: dict[int, Metric] = {}  # iteration → its keep_best metric, read once per folder
        self.save_optimizer = save_optimizer
        self.remove_redundancy = remove_redundancy
        self.layout_info = layout_info
        self.protected: set[int] = set()  # iterations retention must keep (e.g. the one loaded)
        self._group = process_group
        self._preemption = None if preemption is False else Preemption(
            DEFAULT_SIGNALS if preemption is True else preemption).install()  # type: ignore[arg-type]
        self._events = EventLog(events_path, on_event) if dist.rank(process_group) == 0 else None
        # Lock before cleaning: the leftovers of a live job are its saves in progress.
        self._lock: DirectoryLock | None = lock_for_job(self.directory, process_group)
        if self._lock is not None:  # rank 0
            for path in commit.clean_leftovers(self.directory):
                log.info("cleaned leftover %s", path)
        dist.barrier(process_group)  # nobody saves while rank 0 is still cleaning
        self._async = AsyncSaver(process_group, timeout=collective_timeout) if async_save else None

    def start_from(self, iteration: int, *, discard_newer: bool = False, skipped: Iterable[str] = ()) -> list[int]:
        """Declare the iteration this job starts from (0: fresh); refuse when newer ones would be overwritten.

        Training on from ``iteration`` would save over every iteration above it and move the
        tracker back below them (and retention could delete them): call this after loading,
        before the first save. Iterations above ``iteration`` in the folder (committed or
        damaged) are refused, unless ``discard_newer`` deletes them (tracker first). A
        single untracked newest folder left by a save that died between its rename and its
        tracker update (:func:`resumable.commit.interrupted_commit`) is not refused when
        ``iteration`` is the tracker's target: the resume redoes that save.

        Args:
            iteration: the step the job starts from (the loaded checkpoint's, 0 when fresh).
            discard_newer: delete the newer iterations instead of refusing (logged).
            skipped: what the resume skipped and why (named in the message: damaged iterations).

        Returns:
            The iterations deleted (``discard_newer``), oldest first.

        Raises:
            NewerCheckpointsError: on every rank, naming the newer iterations and what to do.

        Collective: every rank calls it at the same point (rank 0 decides, all learn the outcome).
        """
        outcome: list[int] | str = []
        if dist.rank(self._group) == 0:
            try:
                outcome = _start_from(self.directory, iteration, discard_newer, list(skipped))
            except (OSError, CheckpointError) as exc:  # e.g. a newer iteration it may not delete
                outcome = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        outcome = dist.broadcast_object(outcome, 0, self._group)
        if isinstance(outcome, str):
            raise NewerCheckpointsError(outcome)
        return outcome

    def should_save(self, step: int, last_step: int | None = None) -> bool:
        """True on every ``save_checkpoint_steps``-th step and on ``last_step``. Not collective."""
        return step % self.save_checkpoint_steps == 0 or (last_step is not None and step == last_step)

    def save(self, state: Mapping[str, Any], iteration: int, *,
             metrics: Mapping[str, float] | None = None) -> Path | AsyncSaveHandle:
        """Save ``state`` as ``iteration``; then apply retention.

        ``metrics`` (name → number, the same on every rank) go to common.json's ``metrics``;
        with ``keep_best`` they must include its metric.

        Returns:
            The committed folder (sync) or a handle (async; the previous async save has
            been committed or its error raised).

        Raises:
            SaveError: this save failed (sync) or the previous async save failed.
            ConfigError: ``metrics`` lacks ``keep_best``'s metric, or holds a value that is no number.

        Collective: every rank calls it together. Hazard (async): do not mutate the
        state's tensors from another thread before this call returns.
        """
        options = dict(prefix=self.prefix, save_optimizer=self.save_optimizer,
                       remove_redundancy=self.remove_redundancy, layout_info=self.layout_info,
                       on_commit=self._committed, metrics=check_metrics(metrics, self.retention))
        if self._async is not None:
            return self._async.save(state, self.directory, iteration, **options)
        return sync_save(state, self.directory, iteration, process_group=self._group, **options)

    def wait(self) -> Path | None:
        """Wait for the async save in flight (if any); return its folder, raising its error."""
        return self._async.wait() if self._async is not None else None

    def preemption_requested(self) -> int | None:
        """The preemption signal some rank received (the same answer on every rank), or None.

        Save this step (``save``), ``wait()``, then exit with
        ``resumable.preemption.PREEMPTED_EXIT``. Collective: every rank of the manager's group
        asks at the same step (one all-reduce of one integer).

        Raises:
            ConfigError: the manager was built without ``preemption=``.
        """
        if self._preemption is None:
            raise ConfigError("preemption_requested(): build the CheckpointManager with preemption=True (or the "
                              "signal names) so that it takes over the preemption signals")
        return self._preemption.requested(self._group)

    def close(self) -> None:
        """Wait for the last save to be committed, then release the folder's lock and the signals.

        Call before ``destroy_process_group``. Raises the last async save's error (the
        lock is released all the same).
        """
        try:
            self.wait()
        finally:
            if self._preemption is not None:
                self._preemption.uninstall()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_load(self, result: LoadResult, blocked: float | None = None) -> None:
        """Report a load (``resumable.load``'s result) as a ``load`` event on rank 0; not collective.

        ``blocked``: the training time the load held up, when more than the load itself
        (e.g. waiting for a ``load_async``); default ``result.seconds``.
        """
        if self._events is not None:
            self._events.emit(make_event(
                "load", result.iteration, "sync", dist.world_size(self._group), result.bytes_read, result.phases,
                result.seconds, result.seconds if blocked is None else blocked, result.path, bytes_key="bytes_rank0"))

    def _committed(self, plan: SavePlan) -> None:
        """Rank 0, after a commit: the save's event, then retention (also when a callback raised: logged)."""
        try:
            if self._events is not None:
                total = time.perf_counter() - plan.started
                mode = "async" if self._async is not None else "sync"
                seconds = {k: v for k, v in plan.seconds.items() if k != "blocked"}
                self._events.emit(make_event("save", plan.iteration, mode, dist.world_size(plan.group), plan.nbytes,
                                             seconds, total, plan.seconds.get("blocked", total), plan.final))
        finally:
            self._retain(plan)

    def _retain(self, plan: SavePlan) -> None:
        """Rank 0, after a commit: delete the committed checkpoints no policy keeps."""
        self._metrics.pop(plan.iteration, None)  # a redone save replaced that folder
        commit.apply_retention(self.directory, self.retention, {plan.iteration, *self.protected}, self._metric)

    def _metric(self, iteration: int) -> Metric:
        """``keep_best``'s metric of a committed iteration, read from its common.json once (seal checked)."""
        if iteration not in self._metrics:
            assert self.retention.best is not None
            self._metrics[iteration] = read_metric(self.directory / commit.iteration_dirname(iteration),
                                                   self.retention.best.metric)
        return self._metrics[iteration]


def read_metric(folder: Path, name: str) -> Metric:
    """The number common.json's ``metrics`` records as ``name`` in an iteration folder.

    ``Missing.NOT_RECORDED`` when the intact common.json has no such metric (a save without
    ``metrics=``); ``Missing.UNREADABLE`` when common.json is missing, damaged (its seal in
    metadata.json differs) or holds no number there: retention's ``keep_best`` then keeps
    the iteration, never deleting it on a guess (logged).
    """
    try:
        common = v2.read_common(folder)
    except (CheckpointError, OSError) as exc:
        log.warning("keep_best keeps %s: its %s cannot be read: %s", folder, name, exc)
        return Missing.UNREADABLE
    recorded = common.get("metrics")
    value = recorded.get(name) if isinstance(recorded, dict) else None
    if value is None:
        return Missing.NOT_RECORDED
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        log.warning("keep_best keeps %s: its common.json records %s = %r, not a number", folder, name, value)
        return Missing.UNREADABLE
    return float(value)


def _start_from(directory: Path, iteration: int, discard: bool, skipped: list[str]) -> list[int]:
    """Rank 0 of :meth:`CheckpointManager.start_from`: the deleted iterations, or a refusal raised."""
    if discard:
        return commit.discard_after(directory, iteration)
    newer = commit.iterations_after(directory, iteration)
    try:
        redone = commit.interrupted_commit(directory) if commit.read_tracker(directory) == iteration else None
    except CheckpointError:
        redone = None
    newer = [n for n in newer if n != redone]
    if not newer:
        return []
    names = listed([commit.iteration_dirname(n) for n in newer], f"resumable inspect {directory}")
    damage = f" This resume skipped: {'; '.join(skipped)}." if skipped else ""
    raise NewerCheckpointsError(
        f"{directory} holds {len(newer)} iteration(s) newer than step {iteration} this job starts from: {names}. "
        f"Training on would write over them (and retention could delete them).{damage} To keep them, resume from "
        f"them (repair or restore what is damaged) or save elsewhere; to discard them, set "
        f"callbacks.0.discard_newer_checkpoints: true (library: start_from(..., discard_newer=True))")
