"""One structured event per save and load: a JSON line and a one-line console summary.

An event is a plain dict (the keys below, JSON-able) so that a caller's callback and the
JSON-lines file see the same thing::

    {"kind": "save", "iteration": 20, "mode": "sync", "ranks": 2, "bytes": 4600000,
     "seconds": {"plan": 0.01, "write": 0.15, "commit": 0.03}, "total_s": 0.21,
     "blocked_s": 0.21, "gib_per_s": 0.02, "path": ".../iteration_00000020", "time": 1764600000.0}

A save's ``bytes`` are every rank's files (rank 0 learns their sizes at the commit); a load's
are ``bytes_rank0``, what rank 0 read (the ranks' counts are not gathered: no extra collective).
``seconds`` holds the phases that ran (save: plan (including the temp folder), stage (async
only), write, commit; load: plan, read); their sum is at most ``total_s``, the rest being the
agreements between ranks. ``blocked_s`` is the training time the call held up (a sync save or
a load: all of it; an async save: planning and staging).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from resumable import storage

log = logging.getLogger(__name__)

Event = dict[str, Any]
Callback = Callable[[Event], None]


def make_event(kind: str, iteration: int, mode: str, ranks: int, nbytes: int, seconds: dict[str, float],
               total: float, blocked: float, path: Path, bytes_key: str = "bytes") -> Event:
    """The event of one save or load (``bytes_key``: ``bytes``, or ``bytes_rank0`` when only rank 0's are known)."""
    return {"kind": kind, "iteration": iteration, "mode": mode, "ranks": ranks, bytes_key: nbytes,
            "seconds": {k: round(v, 6) for k, v in seconds.items()}, "total_s": round(total, 6),
            "blocked_s": round(blocked, 6), "gib_per_s": round(nbytes / 2**30 / total, 6) if total > 0 else 0.0,
            "path": str(path), "time": time.time()}


def summary(event: Event) -> str:
    """The console line: ``saved iteration 20: 4.6 MB in 0.21 s (plan 0.01, ...; 0.02 GiB/s), training blocked 0.21 s``."""
    verb = "saved" if event["kind"] == "save" else "loaded"
    nbytes = event.get("bytes", event.get("bytes_rank0", 0))
    whose = "" if "bytes" in event else " (rank 0)"
    phases = ", ".join(f"{k} {v:.2f}" for k, v in event["seconds"].items())
    inside = f"{phases}; " if phases else ""
    mode = " async" if event["mode"] == "async" else ""
    return (f"{verb}{mode} iteration {event['iteration']}: {nbytes / 1e6:.1f} MB{whose} in {event['total_s']:.2f} s "
            f"({inside}{event['gib_per_s']:.2f} GiB/s), training blocked {event['blocked_s']:.2f} s")


class EventLog:
    """Where rank 0 sends the events: ``path`` (appended, one JSON line each), ``callback``, and the log.

    A failure to write the file is logged, never raised: the save itself succeeded.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, callback: Callback | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.callback = callback

    def emit(self, event: Event) -> None:
        log.info("%s", summary(event))
        if self.path is not None:
            try:
                with storage.local.open_append(self.path) as f:
                    f.write(json.dumps(event, separators=(",", ":")) + "\n")
            except OSError as exc:
                log.warning("could not append the %s event to %s: %s", event["kind"], self.path, exc)
        if self.callback is not None:
            self.callback(event)
