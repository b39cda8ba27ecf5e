"""Asynchronous Checkpoint 1.0 saves: snapshot the state into reused CPU buffers, save it in a thread.

The training thread copies every tensor of the state (a DTensor's local shard, its
placements kept) into CPU buffers allocated once per name and reused by later saves,
then returns; a background thread runs :meth:`LegacySaver.save` on the copy. The saver's
collectives run on a gloo group of its own (built by the caller, once), so they never
interleave with the training loop's. One save is in flight at a time: the next one, and
:meth:`BackgroundLegacySaves.wait`, wait for it and re-raise its error.

Hazard: the state is read while :meth:`BackgroundLegacySaves.save` runs; mutating it
from another thread meanwhile stores a mix of old and new values. Afterwards it is safe.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.distributed.tensor import DTensor

from resumable import commit
from resumable.async_save import StagingBuffers, track, untrack
from resumable.legacy.save import LegacySaver
from resumable.retention import check_metrics

__all__ = ["BackgroundLegacySaves"]


class BackgroundLegacySaves:
    """Runs the saves of ``saver`` in a background thread, one at a time.

    Collective: every rank calls :meth:`save` and :meth:`wait` together (the saver's own
    collectives run in the background thread, on the saver's group).
    """

    def __init__(self, saver: LegacySaver) -> None:
        self.saver = saver
        self._buffers = StagingBuffers()
        self._thread: threading.Thread | None = None
        self._result: Path | None = None
        self._error: BaseException | None = None

    def save(self, state: Mapping[str, Any], epoch: int, step: int, *,
             metrics: Mapping[str, float] | None = None) -> None:
        """Wait for the save in flight (re-raising its error), snapshot ``state``, start saving it.

        ``metrics``: recorded with the file, as :meth:`LegacySaver.save` takes them (checked here, in the caller).

        Raises:
            ConfigError: ``metrics`` as :meth:`LegacySaver.save` refuses them (nothing started).
            SaveError: the previous save failed (nothing of it was recorded in meta.json).
        """
        metrics = check_metrics(metrics, self.saver.retention)
        self.wait()
        snapshot = self._snapshot(state, "")
        self._buffers.release_unused()
        commit.fault_point("staged")
        self._thread = threading.Thread(target=self._run, args=(snapshot, epoch, step, metrics),
                                        name="resumable-legacy-save", daemon=False)
        track(self)  # finished before the interpreter exits (resumable.async_save's exit hook)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the save in flight is recorded on every rank; its file (None if none).

        Raises:
            SaveError: it failed on some rank.
        """
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        untrack(self)
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._result

    def _run(self, snapshot: Mapping[str, Any], epoch: int, step: int, metrics: Mapping[str, float] | None) -> None:
        try:
            self._result = self.saver.save(snapshot, epoch, step, metrics=metrics)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def _snapshot(self, value: Any, name: str) -> Any:
        """``value`` with every tensor replaced by its copy in this saver's reused buffers."""
        if isinstance(value, torch.Tensor):
            buf = self._buffers.copy(name, value.to_local() if isinstance(value, DTensor) else value)
            if isinstance(value, DTensor):
                return DTensor.from_local(buf, value.device_mesh, value.placements, run_check=False,
                                          shape=value.shape, stride=value.stride())
            return buf
        if isinstance(value, Mapping):
            return {k: self._snapshot(v, f"{name}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self._snapshot(v, f"{name}.{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self._snapshot(v, f"{name}.{i}") for i, v in enumerate(value))
        return copy.deepcopy(value)
