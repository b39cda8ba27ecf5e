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

On an object store (``s3://``) there is no flock: :class:`LeaseLock` writes a lease
object ``<prefix>/.lock`` (owner, host, pid, expiry) with a conditional write
(``If-None-Match: *``), renews it every third of its term with ``If-Match`` its own
version, and deletes it on release. A second job finds it held and is refused, naming the
holder and the expiry. A lease is taken over when it expired (``RESUMABLE_LEASE_SECONDS``,
default 60, after the last renewal: a crashed job on another node) or when its holder ran
on this host and is gone (the identical command restarted after a crash, at once).

Example::

    lock = DirectoryLock("output/checkpoint")
    lock.acquire()          # LockedError if another job holds it
    ...                     # save checkpoints
    lock.release()          # or let the process end: the kernel releases it
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from resumable import commit, dist, storage
from resumable.errors import CheckpointError, LockedError
from resumable.formats.jsonfile import parse_json
from resumable.storage import Conflict, ObjectPath

__all__ = ["LOCK_FILE", "DirectoryLock", "LeaseLock", "lock_for_job"]

log = logging.getLogger(__name__)

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


def _lease_seconds() -> float:
    return float(os.environ.get("RESUMABLE_LEASE_SECONDS", "60"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class LeaseLock:
    """One job per object-store prefix: a lease object written and renewed with conditional writes.

    Args:
        directory: the checkpoint prefix (``s3://bucket/run/checkpoint``).
        seconds: the lease's term (default ``RESUMABLE_LEASE_SECONDS`` or 60); renewed every third of it.
    """

    def __init__(self, directory: ObjectPath, seconds: float | None = None) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self.seconds = _lease_seconds() if seconds is None else seconds
        self.owner = uuid.uuid4().hex
        self._version: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False

    @property
    def held(self) -> bool:
        return self._version is not None and not self.lost

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S"), "expires": now + self.seconds}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LockedError` naming its holder and its expiry."""
        if self._version is not None:
            return
        backend = storage.backend(self.path)
        for _ in range(3):  # the holder may release or renew between our two requests
            try:
                self._version = backend.write_if(self.path, self._body(), None)
                break
            except Conflict:
                pass
            data, version = backend.read_versioned(self.path, "lock", 4096)
            if data is None:
                continue
            doc = _lease_doc(data)
            why = self._stale(doc)
            if why is None:
                raise LockedError(
                    f"{self.directory} is in use by another job ({_holder(doc)}); two jobs must not save into one "
                    "checkpoint folder: stop the other job, or give this one another output_dir / "
                    f"callbacks.0.directory. The lease {self.path} expires {_expiry(doc)} unless renewed; if "
                    "that job is dead, wait until then (or delete the lease object)")
            try:
                self._version = backend.write_if(self.path, self._body(), version)
                log.warning("took over the lease %s of %s: %s", self.path, _holder(doc), why)
                break
            except Conflict:
                continue
        if self._version is None:
            raise LockedError(f"{self.directory}: the lease {self.path} keeps changing hands; another job is "
                              "starting on this folder: stop it")
        self._renewer = threading.Thread(target=self._renew, name="resumable-lease", daemon=True)
        self._renewer.start()

    def _stale(self, doc: dict[str, Any]) -> str | None:
        """Why the lease ``doc`` may be taken over, or None when its holder may still be alive."""
        expires = doc.get("expires")
        if not isinstance(expires, (int, float)) or expires < time.time():
            return "it expired"
        pid = doc.get("pid")
        if doc.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return f"its holder, pid {pid} on this host, is gone"
        return None

    def _renew(self) -> None:
        backend = storage.backend(self.path)
        while not self._stop.wait(self.seconds / 3):
            try:
                self._version = backend.write_if(self.path, self._body(), self._version)
            except Conflict:
                self.lost = True
                log.error("the lease %s was taken by another job; this job no longer owns %s and its next "
                          "tracker update will be refused", self.path, self.directory)
                return
            except CheckpointError as exc:  # the store is failing: try again at the next renewal
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Safe to call twice."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._renewer = None
        version, self._version = self._version, None
        if version is None or self.lost:
            return
        try:
            _, now = storage.backend(self.path).read_versioned(self.path, "lock", 4096)
            if now == version:
                storage.remove(self.path)
        except CheckpointError as exc:  # it expires by itself
            log.warning("could not release the lease %s (it expires in %.0f s): %s", self.path, self.seconds, exc)

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lease_doc(data: bytes) -> dict[str, Any]:
    try:
        doc = parse_json(data, "lease")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _holder(doc: dict[str, Any]) -> str:
    return f"host {doc.get('host', '?')}, pid {doc.get('pid', '?')}, since {doc.get('since', '?')}"


def _expiry(doc: dict[str, Any]) -> str:
    expires = doc.get("expires")
    if not isinstance(expires, (int, float)):
        return "now"
    return f"at {time.strftime('%H:%M:%S', time.localtime(expires))} (in {max(0, expires - time.time()):.0f} s)"


def lock_for_job(directory: str | os.PathLike[str] | ObjectPath,
                 group: dist.Group = None) -> "DirectoryLock | LeaseLock | None":
    """Rank 0 of ``group`` takes the folder's lock; every rank learns whether it got it.

    Returns:
        The held lock on rank 0, None on the other ranks.

    Raises:
        LockedError: on every rank, when another job holds the folder (holder named).
        CheckpointError: on every rank but 0 (which raises its own ``OSError``) when the
            folder cannot be created or the lock file opened.

    Collective: every rank of ``group`` calls it (one broadcast).
    """
    lock: DirectoryLock | LeaseLock | None = None
    error = None
    if dist.rank(group) == 0:
        where = storage.as_path(directory)
        lock = LeaseLock(where) if isinstance(where, ObjectPath) else DirectoryLock(where)
        try:
            lock.acquire()
        except (LockedError, OSError, CheckpointError) as exc:
            lock, error = None, exc
    told = dist.broadcast_object(None if error is None else (isinstance(error, LockedError), str(error)), 0, group)
    if error is not None:
        raise error
    if told is not None:
        locked, message = told
        raise LockedError(message) if locked else CheckpointError(f"rank 0 failed to lock {directory}: {message}")
    return lock
