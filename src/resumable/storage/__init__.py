"""All file and object I/O goes through here: one interface (:class:`Backend`), two backends.

:func:`as_path` turns a user's path into a :class:`~pathlib.Path` or an
:class:`ObjectPath` (``s3://bucket/prefix``); :func:`backend` gives the backend that
serves it. The functions below are the calls the rest of the library makes; each
dispatches on the path's type. Only this package opens files by path
(``tests/unit/test_layers.py`` checks it).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Iterable

from resumable.storage.base import Backend, Conflict, Entry, LateHeader, Reader, StorageError
from resumable.storage import local
from resumable.storage.local import LocalBackend
from resumable.storage.paths import AnyPath, ObjectPath, as_path, is_object, is_remote_text

__all__ = ["AnyPath", "Backend", "Conflict", "Entry", "ObjectPath", "Reader", "StorageError", "as_path", "backend",
           "exists", "is_dir", "is_file", "is_object", "is_remote_text", "list_dir", "open_reader", "read_bounded",
           "remove", "remove_tree", "require_local", "stat", "write_atomic", "write_serialized",
           "write_stream"]

LOCAL = LocalBackend()
_S3: Backend | None = None


def backend(path: Any) -> Backend:
    """The backend serving ``path`` (a Path, an ObjectPath, or text given to :func:`as_path`)."""
    global _S3
    if isinstance(path, ObjectPath):
        if _S3 is None:
            from resumable.storage.s3 import S3Backend  # boto3 is imported only when an s3:// path is used
            _S3 = S3Backend()
        return _S3
    if isinstance(path, str):
        return backend(as_path(path))
    return LOCAL


def read_bounded(path: AnyPath, what: str, limit: int) -> bytes:
    return backend(path).read_bounded(path, what, limit)


def open_reader(path: AnyPath, what: str = "checkpoint file") -> Reader:
    return backend(path).open_reader(path, what)


def stat(path: AnyPath) -> Entry | None:
    return backend(path).stat(path)


def exists(path: AnyPath) -> bool:
    return stat(path) is not None


def is_dir(path: AnyPath) -> bool:
    """A folder (local: not a symlink to one; object store: a prefix holding any object)."""
    entry = stat(path)
    return entry is not None and entry.is_dir and not entry.special


def is_file(path: AnyPath) -> bool:
    """A regular file or an object."""
    entry = stat(path)
    return entry is not None and not entry.is_dir and not entry.special


def list_dir(path: AnyPath) -> list[Entry]:
    return backend(path).list_dir(path)


def write_atomic(path: AnyPath, data: bytes) -> None:
    backend(path).write_atomic(path, data)


def write_stream(path: AnyPath, total: int, chunks: Iterable[memoryview],
                 late_header: LateHeader | None = None) -> tuple[int, str]:
    return backend(path).write_stream(path, total, chunks, late_header)


def write_serialized(path: AnyPath, serialize: Callable[[Any], None]) -> tuple[int, str]:
    """A new file written by ``serialize(binary_file)`` (``torch.save``): streamed into a local file; for an
    object, serialised into memory first (its size must be known), then uploaded. ``(size, xxh3_64)``."""
    if not isinstance(path, ObjectPath):
        return local.write_through(path, serialize)
    buf = io.BytesIO()
    serialize(buf)
    data = buf.getbuffer()
    try:
        return write_stream(path, len(data), [data])
    finally:
        data.release()


def remove(path: AnyPath) -> None:
    backend(path).remove(path)


def remove_tree(path: AnyPath) -> None:
    backend(path).remove_tree(path)


def make_dirs(path: AnyPath) -> None:
    backend(path).make_dirs(path)


def require_local(path: AnyPath, what: str) -> Path:
    """``path`` as a local Path, or a clear "not implemented" for an object-store path."""
    if isinstance(path, ObjectPath):
        from resumable.errors import NotImplementedYet
        raise NotImplementedYet(f"{what} on object storage ({path}) is not supported yet; copy it to a local "
                                "folder first (aws s3 sync)")
    return Path(path)
