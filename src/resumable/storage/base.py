"""The storage interface every file and object goes through; two backends implement it.

One narrow set of operations, chosen so that the commit protocol, the readers and the
writers need nothing else:

- read: :meth:`Backend.read_bounded` (a small file, capped), :meth:`Backend.open_reader`
  (byte ranges straight into a caller's memory), :meth:`Backend.stat`, :meth:`Backend.list_dir`;
- write: :meth:`Backend.write_atomic` (a small file, all or nothing),
  :meth:`Backend.write_stream` (a big file from a sequence of byte views, in parallel parts,
  checksummed while it goes out);
- delete: :meth:`Backend.remove`, :meth:`Backend.remove_tree`;
- coordinate: :meth:`Backend.read_versioned` / :meth:`Backend.write_if` (compare-and-swap,
  for the tracker and the lease lock).

A local folder and an object-store prefix differ in one respect the commit protocol must
know: only the local backend can rename (:attr:`Backend.renames`); an object store commits
by writing ``metadata.json`` last instead (:mod:`resumable.commit`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from resumable.errors import CheckpointError

__all__ = ["Backend", "Conflict", "Entry", "Reader", "StorageError"]


class StorageError(CheckpointError):
    """The store refused or failed a request (after its retries); the message names the object and the cause."""


class Conflict(CheckpointError):
    """A conditional write lost: the object changed since it was read (another job wrote it)."""


@dataclass(frozen=True)
class Entry:
    """One entry directly inside a folder (or under a key prefix)."""

    name: str
    is_dir: bool
    size: int = 0
    mtime_ns: int = 0
    #: Local only: a FIFO, a device, a socket, a dangling link (never read).
    special: bool = False
    #: Local only: a symbolic link (the other fields describe what it points at).
    link: bool = False


class Reader(Protocol):
    """Byte ranges of one file, read into the caller's memory. A context manager."""

    size: int

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill all of ``view`` from ``offset``; a file ending first is corruption (raised, named)."""

    def read(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` bytes from ``offset``."""

    def read_some(self, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset``: fewer at the end of the file (a header read whose length
        is not known yet); an object store learns the object's size from the same request."""

    def read_span(self, views: "Sequence[tuple[int, memoryview]]") -> None:
        """Fill each ``(offset, view)`` (sorted, disjoint); an object store reads them with one request."""

    def sequential(self) -> None:
        """Hint: this reader goes front to back (local: readahead); a no-op where it means nothing."""

    def random(self) -> None:
        """Hint: one lone region is read (local: no readahead); a no-op where it means nothing."""

    def close(self) -> None: ...

    def __enter__(self) -> "Reader": ...

    def __exit__(self, *exc: object) -> None: ...


#: ``late_header()`` → the header bytes to write at offset 8 once every chunk went out (or None).
LateHeader = Callable[[], "bytes | None"]


class Backend(abc.ABC):
    """One kind of storage. Paths are :class:`pathlib.Path` (local) or ``ObjectPath`` (object store)."""

    #: True where folders can be renamed atomically (local); an object store commits without rename.
    renames: bool
    #: Threads that read one rank's byte ranges at once (local disks want few, object stores many).
    read_threads: int

    @abc.abstractmethod
    def read_bounded(self, path: Any, what: str, limit: int) -> bytes:
        """The bytes of a file of at most ``limit`` bytes (CheckpointNotFoundError, UnsafeCheckpointError)."""

    @abc.abstractmethod
    def open_reader(self, path: Any, what: str = "checkpoint file") -> Reader:
        """A :class:`Reader` of ``path`` (CheckpointNotFoundError when missing)."""

    @abc.abstractmethod
    def stat(self, path: Any) -> Entry | None:
        """The entry of ``path`` (a file, or a folder: any object under the prefix), or None when absent."""

    @abc.abstractmethod
    def list_dir(self, path: Any) -> list[Entry]:
        """The entries directly inside folder ``path``, sorted by name; empty when it does not exist."""

    @abc.abstractmethod
    def write_atomic(self, path: Any, data: bytes) -> None:
        """Create or replace ``path`` with ``data``: readers see the old or the new content, never a mix."""

    @abc.abstractmethod
    def write_stream(self, path: Any, total: int, chunks: Iterable[memoryview],
                     late_header: LateHeader | None = None) -> tuple[int, str]:
        """Write a new file of ``total`` bytes from ``chunks`` (in order), durable on return.

        ``late_header``: called after the last chunk; bytes it returns replace the file's
        bytes from offset 8 (the safetensors header, whose checksums are known only then).

        Returns:
            ``(size, xxh3_64 hex)``: the checksum of the bytes as sent (before a late header).
        """

    @abc.abstractmethod
    def remove(self, path: Any) -> None:
        """Delete one file (absent: nothing to do)."""

    @abc.abstractmethod
    def remove_tree(self, path: Any) -> None:
        """Delete a folder and everything under it (absent: nothing to do)."""

    @abc.abstractmethod
    def read_versioned(self, path: Any, what: str, limit: int) -> tuple[bytes | None, str | None]:
        """``(content, version)`` of a small file, ``(None, None)`` when absent."""

    @abc.abstractmethod
    def write_if(self, path: Any, data: bytes, version: str | None, metadata: dict[str, str] | None = None) -> str:
        """Write ``path`` only if its version is still ``version`` (None: only if absent).

        ``metadata``: an object store's user metadata of the new object (a local file has none).

        Returns:
            The new version.

        Raises:
            Conflict: the file changed (or appeared) since that version was read.
        """

    def make_dirs(self, path: Any) -> None:
        """Create folder ``path`` and its parents durably (object stores have no folders: nothing)."""
