"""The local file system backend: ``O_DIRECT`` and ``pwrite`` writers, ``preadv`` readers, fsync.

Writes (:meth:`LocalBackend.write_stream`): a file's bytes come as a sequence of views
(the header, then each tensor's bytes, straight from memory). Every block's place in the
file is known, so ``WRITE_THREADS`` threads ``os.pwrite`` the blocks of a view in
parallel (copying into the page cache is what bounds a durable write on a fast disk, and
it is CPU work that threads spread over cores; ``os.pwrite`` releases the GIL) and ask the
kernel to start writing each block back at once (``sync_file_range``), so that the final
``fsync`` waits for the tail only. Files of ``DIRECT_MIN_BYTES`` and more go the other way
where the file system allows it (:func:`_write_direct`): their space is allocated first,
then ``DIRECT_THREADS`` threads copy 8 MiB blocks into aligned buffers of their own and
write them with ``O_DIRECT``, so the device reads the buffers itself: no page-cache copy,
no writeback left for the ``fsync``, and no page cache evicted from under the training
job. The xxh3-64 of the file is computed by the calling thread from the same blocks, in
file order, as they go out, never by reading the file back.

Reads: :func:`open_regular` refuses anything that is not a regular file (a FIFO, a
character device such as ``/dev/zero``, a socket, a folder) *before* opening it, and
checks the opened descriptor again (``fstat``), so that a path swapped in between cannot
make a reader block forever or read an endless stream. :class:`LocalReader` fills a
caller's memory with ``os.preadv``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import tempfile
import stat
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import xxhash

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.storage.base import Backend, Conflict, Entry, LateHeader

__all__ = ["LocalBackend", "LocalReader", "atomic_write", "check_regular", "fsync_dir", "fsync_file",
           "create_text", "fsync_tree", "last_byte", "make_dirs", "mkdir",
           "open_append", "open_regular", "temp_path", "write_durable"]

#: Bytes handed to one write call: large enough to amortise syscalls, small enough that
#: the checksum and the write overlap well in the page cache.
BLOCK_BYTES = 8 << 20
#: Threads writing the blocks of one file (the calling thread checksums meanwhile).
WRITE_THREADS = 2
#: Threads writing one file with ``O_DIRECT`` (they wait on the device, not on a lock).
DIRECT_THREADS = 4
#: Files smaller than this are written through the page cache only.
DIRECT_MIN_BYTES = 4 << 20
ALIGN = 4096  # offsets, lengths and buffers of O_DIRECT writes are multiples of this

#: Test seam: called after each block is written with (path, bytes written so far).
#: The crash tests set it in a child process to stop a real writer mid-file; it is
#: None in production and costs one comparison per block.
after_block_hook: Callable[[Path, int], None] | None = None

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(path: Path, what: str, mode: int) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{what} {path} is {_kind(mode)}, not a regular file; refusing to read it (reading it could block "
        "forever or never end): replace it with the real file or remove it")


def check_regular(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """The ``stat`` of ``path`` (links followed), refusing anything that is not a regular file.

    For files handed to a library that opens them by path (``torch.load``); our own
    readers use :func:`open_regular`, which also checks the opened descriptor.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: a FIFO, device, socket or folder.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, what, st.st_mode)
    return st


def open_regular(path: str | os.PathLike[str], what: str = "file") -> int:
    """A read-only descriptor of ``path``, which must be a regular file (checked before and after opening).

    ``O_NONBLOCK`` makes the open itself return at once should a FIFO be swapped in after
    the ``stat``; the ``fstat`` of the descriptor then refuses it. The caller closes it.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: a FIFO, device, socket or folder.
    """
    path = Path(path)
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} {path} does not exist") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, what, mode)
    return fd


class LocalReader:
    """A read-only descriptor of one regular file; ``readinto`` is ``os.preadv`` into the caller's memory."""

    def __init__(self, path: Path, what: str = "checkpoint file") -> None:
        self.path = path
        self.fd = open_regular(path, what)
        self.size = os.fstat(self.fd).st_size

    def readinto(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise CorruptCheckpointError(
                    f"{self.path}: file ends at byte {offset}, before the data metadata.json records; the file "
                    "is truncated: restore it or re-save the checkpoint")
            view, offset = view[n:], offset + n

    def read(self, offset: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def read_some(self, offset: int, nbytes: int) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def read_span(self, views: "list[tuple[int, memoryview]]") -> None:
        for offset, view in views:
            self.readinto(view, offset)

    def sequential(self) -> None:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def random(self) -> None:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around a lone region

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "LocalReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and creations inside it survive a power loss."""
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync one file's data."""
    _fsync_path(path, os.O_RDONLY)


def _fsync_path(path: str | os.PathLike[str], flags: int) -> None:
    """Open ``path`` with ``flags`` and fsync it; an fsync error names the path (the kernel's does not)."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:  # e.g. EIO or ENOSPC from write-back: "[Errno 28] No space left on device" says not where
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh hidden name beside ``path`` (``.{name}.tmp-{pid}-{hex}``) for a file written before its rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike[str], data: bytes, fault: Callable[[], None] | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    Writes a temp file in the same folder, fsyncs it, renames it over ``path`` and fsyncs
    the folder. On any error the temp file is removed and ``path`` is untouched.
    ``fault``: the crash-test seam, called between the fsync and the rename.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            if exc.filename is None:  # name the file: "No space left on device" alone says not where
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        finally:
            os.close(fd)
        if fault is not None:
            fault()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_durable(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, fsynced: a file of a folder renamed into place later."""
    write_through(path, lambda f: f.write(data))


class _HashingWriter:
    """A write-only binary file over a descriptor that hashes what passes through it (for ``torch.save``)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.hasher, self.size = fd, xxhash.xxh3_64(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.hasher.update(view)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += n
        return n

    def flush(self) -> None:
        """Nothing buffered."""


def write_through(path: str | os.PathLike[str], serialize: Callable[[Any], None]) -> tuple[int, str]:
    """Create ``path`` (``O_EXCL``) and let ``serialize(file)`` write it, streamed: no copy of the file in
    memory; fsynced. Returns ``(size, xxh3_64 hex)`` of what was written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        out = _HashingWriter(fd)
        serialize(out)
        os.fsync(fd)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        os.close(fd)
    return out.size, out.hasher.hexdigest()


def mkdir(path: str | os.PathLike[str]) -> None:
    """Create one new folder (its parent must exist; an existing one is an error)."""
    Path(path).mkdir()


def make_temp_dir(prefix: str) -> Path:
    """A new private folder in the system's temporary folder (``$TMPDIR``), named ``{prefix}...``."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file under folder ``path``, then every folder, deepest first."""
    folders = []
    for where, _, names in os.walk(path):
        folders.append(where)
        for name in names:
            fsync_file(os.path.join(where, name))
    for where in reversed(folders):
        fsync_dir(where)


def open_append(path: str | os.PathLike[str]) -> TextIO:
    """A log file opened for appending text (its folder created): logs stay local, line by line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


def create_text(path: str | os.PathLike[str], text: str) -> None:
    """Create a new text file (``FileExistsError`` when it exists: the caller picks another name)."""
    with Path(path).open("x", encoding="utf-8") as file:
        file.write(text)


def last_byte(path: str | os.PathLike[str]) -> bytes:
    """The last byte of a file (empty for an empty or missing file)."""
    try:
        with Path(path).open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return b""
            f.seek(-1, os.SEEK_END)
            return f.read(1)
    except FileNotFoundError:
        return b""


def _sync_file_range() -> "ctypes._CFuncPtr | None":
    """libc's ``sync_file_range`` (Linux), or None where it does not exist."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range; do not wait


def _pwrite_block(fd: int, view: memoryview, offset: int) -> None:
    """``os.pwrite`` all of ``view`` at ``offset``, then start its writeback (no waiting)."""
    start, left = offset, view
    while left:
        n = os.pwrite(fd, left, offset)
        left, offset = left[n:], offset + n
    if _SYNC_FILE_RANGE is not None and len(view):
        # Only a hint: the fsync at the end is what makes the data durable.
        _SYNC_FILE_RANGE(fd, start, len(view), _SYNC_FILE_RANGE_WRITE)


def _open_direct(path: Path, fd: int, total: int) -> int | None:
    """A second, ``O_DIRECT`` descriptor of the new file, its ``total`` bytes allocated; or None.

    None where the file system refuses direct I/O (the page-cache path is used). The space
    is allocated first (``posix_fallocate``): a full disk fails here, before any data, and
    writes into allocated space let ext4 take its inode lock shared, so threads write at once.
    """
    try:
        direct = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    if not hasattr(os, "O_DIRECT"):
        os.close(direct)
        return None
    try:
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
        probe = mmap.mmap(-1, ALIGN)  # page aligned, zeros; overwritten by the first block
        try:
            os.pwrite(direct, probe, 0)
        except OSError as exc:  # the open succeeded but the file system cannot do it
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.close(direct)
            return None
        finally:
            probe.close()
    except BaseException:
        os.close(direct)
        raise
    return direct


def _write_paged(fd: int, path: Path, chunks: Iterable[memoryview], hasher: "xxhash.xxh3_64") -> int:
    """Write through the page cache: each view's blocks by ``WRITE_THREADS`` threads, one view at a time."""
    threads = 1 if after_block_hook is not None else WRITE_THREADS  # the hook wants "written so far" exactly
    pool = ThreadPoolExecutor(threads, thread_name_prefix="resumable-write") if threads > 1 else None
    written = 0
    try:
        for view in chunks:
            pending: list[Future] = []
            for start in range(0, len(view), BLOCK_BYTES):
                block = view[start:start + BLOCK_BYTES]
                hasher.update(block)
                if pool is None:
                    _pwrite_block(fd, block, written)
                else:
                    pending.append(pool.submit(_pwrite_block, fd, block, written))
                written += len(block)
                if after_block_hook is not None:
                    after_block_hook(path, written)
            for f in pending:
                f.result()  # this view is out (or its error raised) before the next is produced
            del view, pending  # release this chunk (and any contiguous copy) before the next
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # no thread may still write when the fd is closed
    return written


def _write_direct(fd: int, direct: int, chunks: Iterable[memoryview], hasher: "xxhash.xxh3_64") -> int:
    """Write the file as ``BLOCK_BYTES`` blocks at aligned offsets through ``direct`` (``O_DIRECT``).

    The calling thread cuts the views into blocks and checksums them in order;
    ``DIRECT_THREADS`` threads copy a block's pieces into an aligned buffer of their own
    and write it, bypassing the page cache. The last block's final partial page goes
    through ``fd`` (a normal descriptor). At most ``2 x DIRECT_THREADS`` blocks are in
    flight, each holding references to the views its pieces come from.

    Returns:
        The bytes written.
    """
    local = threading.local()

    def put(offset: int, pieces: list[memoryview], nbytes: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, BLOCK_BYTES)
            bufs.append(buf)
        pos = 0
        for piece in pieces:
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        aligned = nbytes // ALIGN * ALIGN
        view, at = memoryview(buf)[:aligned], offset
        while view:
            n = os.pwrite(direct, view, at)
            view, at = view[n:], at + n
        if aligned < nbytes:
            _pwrite_block(fd, memoryview(buf)[aligned:nbytes], offset + aligned)

    bufs: list[mmap.mmap] = []
    pending: deque[Future] = deque()
    pieces: list[memoryview] = []
    filled, offset = 0, 0
    with ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="resumable-write") as pool:
        def flush() -> None:
            nonlocal pieces, filled, offset
            pending.append(pool.submit(put, offset, pieces, filled))
            offset, pieces, filled = offset + filled, [], 0
            while len(pending) > 2 * DIRECT_THREADS:
                pending.popleft().result()

        try:
            for view in chunks:
                while view:
                    take = min(len(view), BLOCK_BYTES - filled)
                    hasher.update(view[:take])
                    pieces.append(view[:take])
                    filled += take
                    view = view[take:]
                    if filled == BLOCK_BYTES:
                        flush()
            if filled:
                flush()
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
    for buf in bufs:
        try:
            buf.close()
        except BufferError:  # a view still held by a traceback: the GC unmaps it later
            pass
    return offset


class LocalBackend(Backend):
    """Files and folders on a POSIX file system."""

    renames = True
    read_threads = 4

    def read_bounded(self, path: Path, what: str, limit: int) -> bytes:
        fd = open_regular(path, what)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise UnsafeCheckpointError(f"{what} {path} is {size} bytes, more than the {limit} we parse; "
                                            "it is damaged or not the file it is named after")
            chunks, total = [], 0
            while total <= limit:  # the file may grow while we read: never past the cap
                block = os.read(fd, min(8 << 20, limit + 1 - total))
                if not block:
                    break
                chunks.append(block)
                total += len(block)
        finally:
            os.close(fd)
        if total > limit:
            raise UnsafeCheckpointError(f"{what} {path} grew past {limit} bytes while being read; refusing it")
        return b"".join(chunks)

    def open_reader(self, path: Path, what: str = "checkpoint file") -> LocalReader:
        return LocalReader(Path(path), what)

    def stat(self, path: Path) -> Entry | None:
        name = Path(path).name
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return Entry(name, False, special=True, link=True) if os.path.islink(path) else None
        return Entry(name, stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns,
                     special=not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)), link=os.path.islink(path))

    def list_dir(self, path: Path) -> list[Entry]:
        try:
            names = sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e for name in names if (e := self.stat(Path(path) / name)) is not None]

    def write_atomic(self, path: Path, data: bytes) -> None:
        atomic_write(path, data)

    def write_stream(self, path: Path, total: int, chunks: Iterable[memoryview],
                     late_header: LateHeader | None = None) -> tuple[int, str]:
        path = Path(path)
        hasher = xxhash.xxh3_64()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        direct = None
        try:
            if after_block_hook is None and total >= DIRECT_MIN_BYTES:
                direct = _open_direct(path, fd, total)
            written = (_write_direct(fd, direct, chunks, hasher) if direct is not None
                       else _write_paged(fd, path, chunks, hasher))
            header = late_header() if late_header is not None else None
            if header is not None:
                _pwrite_block(fd, memoryview(header), 8)
            os.fsync(fd)
        except OSError as exc:
            if exc.filename is None:  # os.write/fsync errors name no file: "No space left on device" where?
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        finally:
            if direct is not None:
                os.close(direct)
            os.close(fd)
        return written, hasher.hexdigest()

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def remove_tree(self, path: Path) -> None:
        path = Path(path)
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)  # a symlink is never followed
        else:
            shutil.rmtree(path)

    def read_versioned(self, path: Path, what: str, limit: int) -> tuple[bytes | None, str | None]:
        try:
            data = self.read_bounded(path, what, limit)
        except CheckpointNotFoundError:
            return None, None
        st = os.stat(path)
        return data, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    def write_if(self, path: Path, data: bytes, version: str | None, metadata: dict[str, str] | None = None) -> str:
        # One job per folder is enforced by the flock (resumable.lock); this check catches a
        # tracker changed by hand or by a job on a file system whose flock is node-local.
        _, now = self.read_versioned(path, "file", 1 << 20)
        if now != version:
            raise Conflict(f"{path} changed since this job read it (another job, or a hand edit, wrote it); "
                           "refusing to overwrite it")
        atomic_write(path, data)
        return self.read_versioned(path, "file", 1 << 20)[1] or ""

    def make_dirs(self, path: Path) -> None:
        make_dirs(path)


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents so that their creation survives a power loss.

    Each folder created here is followed by an fsync of its parent: without it, a crash
    can lose the new folder's entry (and everything committed inside it) even though the
    files in it were fsynced. Folders that already exist are left as they are.

    Raises:
        NotADirectoryError: ``path`` (or a parent) exists and is not a folder.
        OSError: the folder cannot be created (permissions, full disk).
    """
    path = Path(path)
    missing = []
    at = path
    while not at.is_dir():
        if at.exists() or at.is_symlink():  # a file, or a link to nowhere: mkdir would fail obscurely ...
            if at.is_dir():
                break  # ... unless another rank created the folder since the check above
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder; choose another path", str(at))
        missing.append(at)
        at = at.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # another rank or process made it meanwhile: its entry still needs the fsync
            if not folder.is_dir():
                raise
        fsync_dir(folder.parent)
    return path
