"""Find and signal a whole process tree (a torchrun launcher and its workers); bind a
process's life to its launcher's.

torchrun starts its workers in sessions of their own, so killing the launcher's
process group leaves them running; a crash test or demo must signal every
descendant. Linux only (reads /proc; ``prctl``).

Launch chain of ``resumable train`` on N processes: the wrapper (``resumable`` CLI) →
torchrun (``resumable.train.launch``) → N workers. Each link calls :func:`bind_to_launcher`
first thing, so the kernel kills it when the process above it ends, however that one
ended (SIGKILL included): no worker outlives its job waiting for a dead rendezvous.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

#: Environment variable: the pid of the process that launched this one (each link sets its own).
PARENT_ENV = "RESUMABLE_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: The signals that ask a job to stop (terminal, ``kill``, container runtimes, schedulers):
#: ``resumable train`` forwards each to its torchrun, which forwards it to every worker.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children."""
    found, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        found.extend(kids)
        frontier = kids
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid`` and all its descendants at once (a whole job dies as a node would)."""
    victims = descendants(pid) + [pid]
    for p in victims:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return victims


def die_with_parent(expected_parent: int | None, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends (``PR_SET_PDEATHSIG``).

    The parent may have ended before the call (this process was then re-parented and
    would never get the signal): when ``expected_parent`` is given and is no longer the
    parent after the call, this process sends itself ``sig`` at once. Not inherited by
    children; kept across ``exec``. Returns False where prctl is not available (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)  # the launcher is already gone
    return True


def bind_to_launcher() -> None:
    """Die (SIGKILL) with the process that launched this one, and let this one's children do the same.

    The launcher is named by ``$RESUMABLE_PARENT_PID`` (set by ``resumable train`` and by
    its torchrun, each to its own pid) or, under a torchrun of the user's, is that torchrun
    (``TORCHELASTIC_RUN_ID`` set; its pid is unknown, so a launcher that died before this
    call goes unnoticed). A process started any other way (a shell) is left alone:
    closing a terminal must not SIGKILL a ``nohup`` run. A second call in the same process
    (the variable then names this process: an in-process trainer run after another) binds nothing:
    taken as the launcher's pid, it would make the process kill itself at once.
    """
    parent = os.environ.get(PARENT_ENV)
    if parent == str(os.getpid()):
        return
    if parent is not None and parent.isdigit():
        die_with_parent(int(parent))
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(None)
    os.environ[PARENT_ENV] = str(os.getpid())


def run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str], stop_timeout: float,
                           to_workers: frozenset[int] = frozenset(), kept_status: int | None = None) -> int:
    """Run ``cmd`` (a launcher) and pass it every stop signal this process gets; its exit status.

    The command runs in a session of its own, so a terminal's Ctrl-C reaches it once, from
    us, not twice; it learns our pid (``$RESUMABLE_PARENT_PID``) to die with us. After the
    first signal it has ``stop_timeout`` seconds to exit; then, or at a second signal, its
    whole tree is SIGKILLed. Returns 128 + the first signal's number when one was received
    (130 for SIGINT, 143 for SIGTERM), else the command's own status (128 + n if a signal n
    killed it). Main thread only (it installs signal handlers, restored on return).

    ``to_workers``: signals sent to the launcher's children (the workers) instead of the
    launcher, so that torchrun does not stop them itself (a preemption: they save, agree and
    exit); ``kept_status``: the command's own status returned as it is even after a signal
    (the preempted job's 75).
    """
    job = subprocess.Popen(list(cmd), env={**env, PARENT_ENV: str(os.getpid())}, start_new_session=True)
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum: int, _frame: object) -> None:
        if received:  # a second signal: stop at once
            print(f"resumable: second signal ({signal.Signals(signum).name}): killing the job", file=sys.stderr)
            kill_tree(job.pid)
        else:  # silent: the caller says how the job ended, in one line
            for pid in (children(job.pid) or [job.pid]) if signum in to_workers else [job.pid]:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass  # it ended meanwhile; its status is read below
        received.append((signum, time.monotonic()))

    # A signal before the handlers are installed ends us by its default action: the
    # job then dies with us (PR_SET_PDEATHSIG), so no window leaves it running.
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        status = None
        while status is None:
            try:
                status = job.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if received and time.monotonic() > received[0][1] + stop_timeout:
                    print(f"resumable: the job did not stop within {stop_timeout:g} s: killing it", file=sys.stderr)
                    kill_tree(job.pid)
                    status = job.wait()
    finally:
        if job.poll() is None:  # we are failing ourselves: take the job along
            kill_tree(job.pid)
            job.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received and status != kept_status:
        return 128 + received[0][0]
    return 128 - status if status < 0 else status

