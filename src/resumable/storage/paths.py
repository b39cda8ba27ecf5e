"""Where a checkpoint lives: a local :class:`pathlib.Path` or an :class:`ObjectPath` (``s3://bucket/key``).

Every path a user gives (``output_dir``, ``load_checkpoint``, a CLI argument) goes through
:func:`as_path`. ``pathlib.Path("s3://b/run")`` silently means the local folder ``s3:/b/run``;
:func:`as_path` makes it an :class:`ObjectPath`, and any other ``scheme://`` is refused. An
:class:`ObjectPath` has no ``__fspath__``: handing one to ``open()`` or ``os.*`` raises
``TypeError`` instead of writing a local file. Pure: no I/O.
"""

from __future__ import annotations

import os
import re
from functools import total_ordering
from pathlib import Path
from typing import Union

from resumable.errors import ConfigError, NotImplementedYet

__all__ = ["AnyPath", "ObjectPath", "as_path", "is_object", "is_remote_text"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# S3's rules for new buckets: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@total_ordering
class ObjectPath:
    """``s3://bucket/key``: a bucket and a ``/``-separated key, with the part of ``pathlib``'s API we use.

    A folder is a key prefix: ``ObjectPath("b", "run") / "iteration_00000100"`` names every
    object under ``run/iteration_00000100/``. Immutable and hashable.
    """

    __slots__ = ("bucket", "key")
    scheme = "s3"

    def __init__(self, bucket: str, key: str = "") -> None:
        parts = [p for p in key.split("/") if p and p != "."]
        if ".." in parts:
            raise ConfigError(f"s3://{bucket}/{key}: '..' in an object key is not allowed; write the key in full")
        object.__setattr__(self, "bucket", bucket)
        object.__setattr__(self, "key", "/".join(parts))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ObjectPath is immutable")

    def __reduce__(self) -> tuple:  # pickled between ranks (a resolution broadcast)
        return ObjectPath, (self.bucket, self.key)

    def __truediv__(self, other: str | os.PathLike[str]) -> "ObjectPath":
        other = os.fspath(other)
        return ObjectPath(self.bucket, f"{self.key}/{other}" if self.key else other)

    def joinpath(self, *others: str) -> "ObjectPath":
        at = self
        for o in others:
            at = at / o
        return at

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.bucket, self.key.rpartition("/")[0])

    @property
    def suffix(self) -> str:
        name = self.name
        dot = name.rfind(".")
        return name[dot:] if 0 < dot < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        return self.name[:len(self.name) - len(self.suffix)]

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def relative_to(self, other: "ObjectPath") -> str:
        if other.bucket != self.bucket or not (self.key == other.key or self.key.startswith(other.key + "/")
                                               or not other.key):
            raise ValueError(f"{self} is not under {other}")
        return self.key[len(other.key):].lstrip("/")

    @property
    def prefix(self) -> str:
        """The key prefix of the objects inside this "folder" (``run/`` for ``s3://b/run``; ``""`` for the bucket)."""
        return f"{self.key}/" if self.key else ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.bucket, self.key) == (other.bucket, other.key)

    def __lt__(self, other: "ObjectPath") -> bool:
        return (self.bucket, self.key) < (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash(("s3", self.bucket, self.key))


AnyPath = Union[Path, ObjectPath]


def is_remote_text(text: str) -> bool:
    """True when ``text`` names an object store (``scheme://...``) rather than a local path."""
    return bool(_SCHEME.match(text))


def as_path(path: "str | os.PathLike[str] | ObjectPath") -> AnyPath:
    """A user's path as a :class:`~pathlib.Path` or an :class:`ObjectPath`.

    Raises:
        ConfigError: an ``s3://`` URL without a valid bucket name.
        NotImplementedYet: another scheme (``gs://``, ``http://``, ...).
    """
    if isinstance(path, ObjectPath):
        return path
    text = os.fspath(path)
    m = _SCHEME.match(text)
    if not m:
        return Path(text)
    scheme = m.group(1).lower()
    if scheme != "s3":
        raise NotImplementedYet(
            f"{text}: {scheme}:// storage is not supported; checkpoints go to a local path or to "
            "s3://bucket/prefix (any S3-compatible store: set AWS_ENDPOINT_URL for one that is not AWS)")
    bucket, _, key = text[m.end():].partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"{text}: {bucket!r} is not a valid S3 bucket name (3-63 characters of a-z, 0-9, '.' "
                          "and '-'); write s3://<bucket>/<prefix>")
    return ObjectPath(bucket, key)


def is_object(path: object) -> bool:
    """True for an :class:`ObjectPath` (a path in an object store)."""
    return isinstance(path, ObjectPath)
