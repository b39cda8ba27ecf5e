"""One job per checkpoint folder: an exclusive ``flock`` on ``<directory>/.lock``.

Two jobs saving into one folder destroy each other's work: the second one's start-up
removes the first one's temp folder of a save in progress (``commit.clean_leftovers``),
both move the tracker, both apply retention. So the process that saves (rank 0 of the
job) takes an exclusive, non-blocking ``fcntl.flock`` on ``<directory>/.lock`` when the
``CheckpointManager`` (or the legacy monitor) is built, and keeps it for the job's
lifetime. A second job fails at once with :class:`~resumable.errors.LockedError` naming
the holder (host, pid, start time), which the holder writes into the file.

Why ``flock`` and not "the file exists": the kernel drops the lock when the holder's
last file descriptor closes, which includes any death (SIGKILL, OOM, a crashed node's
reboot). A crashed job therefore never leaves the folder stuck, and no one has to delete
a stale lock file by hand: the file stays, unlocked, and the next job takes it.

Caveats:

- NFS: Linux clients implement ``flock`` on NFS (v4, or v3 with ``lockd``) as a whole-file
  POSIX lock held by the server, so it works across nodes; a mount with ``local_lock=flock``
  or ``local_lock=all`` (or ``nolock``) makes the lock local to one node, and then two jobs
  on two nodes are *not* kept apart. A client that loses its lease (network partition)
  loses the lock silently. Lustre needs ``-o flock`` (``localflock`` is node-local).
- The holder text is advisory (for the message); only the ``flock`` decides.
- Within one process two ``DirectoryLock`` objects on one folder also exclude each other
  (``flock`` belongs to the open file description), so a test can show the refusal.

Example::

    lock = DirectoryLock("output/checkpoint")
    lock.acquire()          # LockedError if another job holds it
    ...                     # save checkpoints
    lock.release()          # or let the process end: the kernel releases it
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from resumable import commit, dist
from resumable.errors import CheckpointError, LockedError
from resumable.formats.jsonfile import parse_json

__all__ = ["LOCK_FILE", "DirectoryLock", "lock_for_job"]

#: The lock file's name inside the checkpoint folder (hidden: not a checkpoint, never cleaned).
LOCK_FILE = ".lock"


class DirectoryLock:
    """An exclusive, crash-safe lock on a checkpoint folder, held by one process.

    Args:
        directory: the checkpoint folder; created when missing.

    Not thread safe; not inherited by child processes (``O_CLOEXEC``).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting, and record this process as its holder.

        Raises:
            LockedError: another process holds it; the message names the holder.
            OSError: the folder cannot be created or the file opened.
        """
        if self._fd is not None:
            return
        commit.make_dirs(self.directory)  # often the first save's folder: its creation must be durable
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(
                f"{self.directory} is in use by another job ({holder}); two jobs must not save into one "
                f"checkpoint folder: stop the other job, or give this one another output_dir / "
                f"callbacks.0.directory. The lock is {self.path}; it is released when its holder exits, "
                "even by a crash, so never delete it by hand") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder text is for the message of the next job that finds the folder locked.
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (the file stays, unlocked). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The holder recorded in the lock file, as words (best effort: it is only for the message)."""
    try:
        # Bounded depth: 4096 bytes of "[" would make json.loads raise RecursionError; this is a ValueError.
        doc = parse_json(os.pread(fd, 4096, 0) or b"{}", "lock file")
        return f"host {doc['host']}, pid {doc['pid']}, since {doc['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # CorruptCheckpointError is a ValueError
        return "holder unknown"


def lock_for_job(directory: str | os.PathLike[str], group: dist.Group = None) -> DirectoryLock | None:
    """Rank 0 of ``group`` takes the folder's lock; every rank learns whether it got it.

    Returns:
        The held lock on rank 0, None on the other ranks.

    Raises:
        LockedError: on every rank, when another job holds the folder (holder named).
        CheckpointError: on every rank but 0 (which raises its own ``OSError``) when the
            folder cannot be created or the lock file opened.

    Collective: every rank of ``group`` calls it (one broadcast).
    """
    lock, error = None, None
    if dist.rank(group) == 0:
        lock = DirectoryLock(directory)
        try:
            lock.acquire()
        except (LockedError, OSError) as exc:
            lock, error = None, exc
    told = dist.broadcast_object(None if error is None else (isinstance(error, LockedError), str(error)), 0, group)
    if error is not None:
        raise error
    if told is not None:
        locked, message = told
        raise LockedError(message) if locked else CheckpointError(f"rank 0 failed to lock {directory}: {message}")
    return lock
