"""Preemption: a scheduler's signal (SIGTERM; Slurm ``--signal=USR1@120``) turned into one agreed save.

A scheduler that preempts a job sends a signal, waits a grace period, then kills it. The
signal reaches one process or all of them, at different instants, so no rank may act on it
alone: :class:`Preemption` only records it, and :meth:`Preemption.requested` (collective: one
all-reduce of one integer, cheap enough for every step) tells every rank at the same step
that some rank got it. The loop then saves that step, waits for the commit and exits with
:data:`PREEMPTED_EXIT`; the identical command resumes from that save.

The same signal delivered twice within a second (a scheduler signalling every process of
the job, and ``resumable train`` forwarding it) counts once; any later signal exits at once,
status 128 + its number (what was committed stays valid).

Example::

    manager = CheckpointManager("ckpt", preemption=True)      # SIGTERM and SIGUSR1
    for step in range(start, steps):
        train_step()
        if manager.preemption_requested():                   # every rank, every step
            manager.save(state, step)
            manager.wait()
            sys.exit(PREEMPTED_EXIT)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Iterable

__all__ = ["DEFAULT_SIGNALS", "PREEMPTED_EXIT", "Preemption", "signal_numbers"]

log = logging.getLogger(__name__)

#: The exit status of a job that saved because it was preempted (``EX_TEMPFAIL``: try again).
PREEMPTED_EXIT = 75
#: What counts as preemption by default: Kubernetes' and Slurm's SIGTERM, Slurm's ``--signal=USR1``.
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
_DUPLICATE_SECONDS = 1.0


def signal_numbers(names: Iterable[str]) -> frozenset[int]:
    """``["SIGTERM", "USR1"]`` → their numbers.

    Raises:
        ValueError: a name that is no signal (the message lists what is valid).
    """
    out = set()
    for name in names:
        full = name if name.startswith("SIG") else f"SIG{name}"
        if not hasattr(signal.Signals, full) or full in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{name!r} is not a signal a job can catch; e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGHUP")
        out.add(int(signal.Signals[full]))
    return frozenset(out)


class Preemption:
    """Records the first preemption signal this process receives (main thread handlers).

    Args:
        signals: names of the signals that mean preemption (default :data:`DEFAULT_SIGNALS`).
    """

    def __init__(self, signals: Iterable[str] = DEFAULT_SIGNALS) -> None:
        self.signals = signal_numbers(signals)
        self.signum: int | None = None
        self._when = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> "Preemption":
        """Take over the signals (main thread only; elsewhere nothing is installed and nothing is seen)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.handle) for sig in self.signals}
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def handle(self, signum: int, _frame: object = None) -> bool:
        """Record ``signum``; True when it was taken as preemption (the first, or a duplicate of it).

        A second, different or later signal exits the process at once (status 128 + its number).
        """
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._when = signum, now
            log.warning("%s: preemption requested; saving at the next step boundary, then exiting with %d",
                        signal.Signals(signum).name, PREEMPTED_EXIT)
            return True
        if signum == self.signum and now - self._when < _DUPLICATE_SECONDS:
            return True  # the same signal delivered twice (scheduler and launcher)
        print(f"[rank {os.environ.get('RANK', '0')}] second signal ({signal.Signals(signum).name}) while saving for "
              "preemption: exiting now (the save in flight is left uncommitted)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def requested(self, group: Any = None) -> int | None:
        """The signal some rank of ``group`` received (the same answer on every rank), or None.

        Collective: every rank calls it at the same step (one all-reduce of one integer).
        """
        from resumable import dist  # torch: `resumable train` reads this module's names without it

        return dist.all_reduce_max([self.signum or 0], group)[0] or None
