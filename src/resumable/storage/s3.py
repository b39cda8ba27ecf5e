"""The S3-compatible object store backend (``s3://bucket/prefix``), through ``boto3``.

Why boto3: it is the reference client of the S3 API (what every S3-compatible server
tests against), its client is thread safe, it exposes every call the commit protocol
needs as it is (multipart uploads, ranged GETs whose body we ``readinto`` the target's
memory, ``If-Match`` / ``If-None-Match`` conditional writes), and it reads the endpoint,
region, credentials, retry mode and attempts from the standard AWS environment variables
and config files, so a job is configured exactly as the AWS CLI is. Parallelism comes
from our own threads (parts and ranges), which is where the throughput is.

Configuration: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a store that is not
AWS, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``AWS_REGION``,
``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` (default here: ``standard``, 5 attempts).
``RESUMABLE_S3_PART_MIB`` (default 8) and ``RESUMABLE_S3_THREADS`` (default 16) size the
parts and the threads of one file's upload and of one rank's reads.

Memory: a rank's upload holds at most ``2 x threads + 1`` part buffers at once beside its
state; reads go straight into the target tensors (no file is ever buffered whole).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import xxhash

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, NotImplementedYet, UnsafeCheckpointError
from resumable.storage.base import Backend, Conflict, Entry, LateHeader, StorageError
from resumable.storage.paths import ObjectPath

__all__ = ["S3Backend", "S3Reader"]

_MIN_PART = 5 << 20  # S3's smallest part but the last


def _part_bytes() -> int:
    return max(_MIN_PART, int(float(os.environ.get("RESUMABLE_S3_PART_MIB", "8")) * (1 << 20)))


def _threads() -> int:
    return max(1, int(os.environ.get("RESUMABLE_S3_THREADS", "16")))


#: The environment a client is made from: a change makes a new client.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
               "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "RESUMABLE_S3_THREADS")


def _code(exc: BaseException) -> tuple[str, int]:
    """``(error code, HTTP status)`` of a botocore ClientError (``("", 0)`` for anything else)."""
    response = getattr(exc, "response", None) or {}
    return (str(response.get("Error", {}).get("Code", "")),
            int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))


def _missing(exc: BaseException) -> bool:
    code, status = _code(exc)
    return status == 404 or code in ("NoSuchKey", "404", "NotFound")


class S3Backend(Backend):
    """Objects under ``s3://bucket/prefix``; a "folder" is a key prefix ending in ``/``."""

    renames = False

    def __init__(self) -> None:
        self._client: Any = None
        self._made_for: tuple = ()
        self._lock = threading.Lock()

    @property
    def read_threads(self) -> int:  # type: ignore[override]
        return _threads()

    @property
    def client(self) -> Any:
        """One boto3 client per process and configuration (thread safe; a forked child, or a changed
        AWS environment, makes its own)."""
        made_for = (os.getpid(), *(os.environ.get(k) for k in _CLIENT_ENV))
        with self._lock:
            if self._client is None or self._made_for != made_for:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise NotImplementedYet("s3:// paths need boto3: pip install 'resumable[s3]' (or boto3)") from None
                config = Config(
                    max_pool_connections=4 * _threads() + 8,
                    retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                             "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))},
                    # Our own xxh3-64 checksums cover every byte end to end; the SDK's CRCs would
                    # cost a second pass over each part for nothing.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
                self._client = boto3.session.Session().client("s3", config=config)
                self._made_for = made_for
            return self._client

    def call(self, op: str, path: ObjectPath, what: str = "object", **kwargs: Any) -> Any:
        """``client.<op>(Bucket=..., **kwargs)``; errors become our own, naming the object and the cause."""
        try:
            return getattr(self.client, op)(Bucket=path.bucket, **kwargs)
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError, ReadTimeout, ...
            code, status = _code(exc)
            if _missing(exc) and op in ("get_object", "head_object"):
                raise CheckpointNotFoundError(f"{what} {path} does not exist") from None
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Conflict(f"{path} changed since this job read it: another job wrote it ({code})") from None
            if code == "NoSuchBucket":
                raise StorageError(f"{path}: bucket {path.bucket!r} does not exist at "
                                   f"{self.client.meta.endpoint_url}; create it (aws s3 mb s3://{path.bucket}) "
                                   "or check AWS_ENDPOINT_URL") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"{path}: {op} refused ({code}); check the credentials "
                                   "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy") from None
            detail = f"{code} (HTTP {status})" if code else f"{type(exc).__name__}: {exc}"
            raise StorageError(f"{path}: {op} failed after retries: {detail}; the object store at "
                               f"{self.client.meta.endpoint_url} is unreachable or failing") from exc

    # -- reads ---------------------------------------------------------------------------

    def read_bounded(self, path: ObjectPath, what: str, limit: int) -> bytes:
        data = self._get(path, what, 0, limit + 1)
        if len(data) > limit:
            raise UnsafeCheckpointError(f"{what} {path} is more than the {limit} bytes we parse; "
                                        "it is damaged or not the object it is named after")
        return data

    def _get(self, path: ObjectPath, what: str, offset: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` bytes from ``offset`` (fewer at the end of the object)."""
        try:
            resp = self.call("get_object", path, what, Key=path.key, Range=f"bytes={offset}-{offset + nbytes - 1}")
        except StorageError as exc:
            if "InvalidRange" in str(exc):  # an empty object has no byte 0
                return b""
            raise
        return resp["Body"].read()

    def open_reader(self, path: ObjectPath, what: str = "checkpoint file") -> "S3Reader":
        return S3Reader(self, path, what)

    def stat(self, path: ObjectPath) -> Entry | None:
        if path.key:
            try:
                head = self.call("head_object", path, Key=path.key)
                return Entry(path.name, False, int(head["ContentLength"]),
                             int(head["LastModified"].timestamp() * 1e9))
            except CheckpointNotFoundError:
                pass
        found = self.call("list_objects_v2", path, Prefix=path.prefix, MaxKeys=1)
        return Entry(path.name, True) if found.get("KeyCount", 0) else None

    def list_dir(self, path: ObjectPath) -> list[Entry]:
        entries = []
        token: dict[str, str] = {}
        while True:
            page = self.call("list_objects_v2", path, Prefix=path.prefix, Delimiter="/", **token)
            entries += [Entry(p["Prefix"][len(path.prefix):].rstrip("/"), True) for p in page.get("CommonPrefixes", [])]
            entries += [Entry(o["Key"][len(path.prefix):], False, int(o["Size"]),
                              int(o["LastModified"].timestamp() * 1e9))
                        for o in page.get("Contents", []) if o["Key"] != path.prefix]
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        return sorted(entries, key=lambda e: e.name)

    def keys_under(self, path: ObjectPath) -> list[str]:
        """Every object key under folder ``path`` (all depths)."""
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self.call("list_objects_v2", path, Prefix=path.prefix, **token)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    # -- writes --------------------------------------------------------------------------

    def write_atomic(self, path: ObjectPath, data: bytes) -> None:
        body = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        self.call("put_object", path, Key=path.key, Body=body)  # a PUT is all or nothing

    def write_stream(self, path: ObjectPath, total: int, chunks: Iterable[memoryview],
                     late_header: LateHeader | None = None) -> tuple[int, str]:
        part = _part_bytes()
        if total <= part:  # one PUT of a buffer holding the whole (small) file
            buf = bytearray()
            hasher = xxhash.xxh3_64()
            for view in chunks:
                hasher.update(view)
                buf += view
            header = late_header() if late_header is not None else None
            if header is not None:
                buf[8:8 + len(header)] = header
            self.write_atomic(path, buf)
            return len(buf), hasher.hexdigest()
        return _MultipartUpload(self, path, part).run(chunks, late_header)

    def remove(self, path: ObjectPath) -> None:
        self.call("delete_object", path, Key=path.key)  # absent: S3 answers 204 as well

    def remove_keys(self, path: ObjectPath, keys: list[str]) -> None:
        """Delete ``keys`` (of ``path``'s bucket), 1000 per request (S3's limit)."""
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self.call("delete_objects", path, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(f"s3://{path.bucket}/{first.get('Key')}: delete failed: {first.get('Code')} "
                                   f"({len(resp['Errors'])} of {len(batch)} objects not deleted)")

    def remove_tree(self, path: ObjectPath) -> None:
        self.remove_keys(path, self.keys_under(path))

    def abort_uploads(self, path: ObjectPath) -> list[str]:
        """Abort the multipart uploads in progress under folder ``path`` (a killed save's); their keys."""
        page = self.call("list_multipart_uploads", path, Prefix=path.prefix)
        keys = []
        for upload in page.get("Uploads", []):
            self.call("abort_multipart_upload", path, Key=upload["Key"], UploadId=upload["UploadId"])
            keys.append(upload["Key"])
        return keys

    # -- compare and swap ---------------------------------------------------------------

    def read_versioned(self, path: ObjectPath, what: str, limit: int) -> tuple[bytes | None, str | None]:
        try:
            resp = self.call("get_object", path, what, Key=path.key)
        except CheckpointNotFoundError:
            return None, None
        if int(resp.get("ContentLength", 0)) > limit:
            raise UnsafeCheckpointError(f"{what} {path} is more than the {limit} bytes we parse; it is damaged")
        return resp["Body"].read(), resp["ETag"]

    def write_if(self, path: ObjectPath, data: bytes, version: str | None,
                 metadata: dict[str, str] | None = None) -> str:
        condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
        return self.call("put_object", path, Key=path.key, Body=bytes(data), Metadata=metadata or {},
                         **condition)["ETag"]

    def user_metadata(self, path: ObjectPath) -> dict[str, str]:
        """The object's user metadata (``x-amz-meta-*``), empty when it has none or is absent."""
        try:
            return dict(self.call("head_object", path, Key=path.key).get("Metadata", {}))
        except CheckpointNotFoundError:
            return {}


class S3Reader:
    """Ranged GETs of one object, each body read straight into the caller's memory."""

    def __init__(self, backend: S3Backend, path: ObjectPath, what: str) -> None:
        self.backend, self.path, self.what = backend, path, what
        self._size: int | None = None

    @property
    def size(self) -> int:
        """The object's size (one HEAD, the first time it is asked: ranged reads need none)."""
        if self._size is None:
            self._size = int(self.backend.call("head_object", self.path, self.what, Key=self.path.key)["ContentLength"])
        return self._size

    def readinto(self, view: memoryview, offset: int) -> None:
        if not len(view):
            return
        try:
            resp = self.backend.call("get_object", self.path, self.what, Key=self.path.key,
                                     Range=f"bytes={offset}-{offset + len(view) - 1}")
        except StorageError as exc:
            if "InvalidRange" in str(exc):  # the range starts past the end: truncated
                raise self._short(offset) from None
            raise
        raw = resp["Body"]._raw_stream  # urllib3's response: readinto without an intermediate bytes object
        try:
            self._fill(raw, view, offset)
        finally:
            raw.release_conn()

    def read_some(self, offset: int, nbytes: int) -> bytes:
        try:
            resp = self.backend.call("get_object", self.path, self.what, Key=self.path.key,
                                     Range=f"bytes={offset}-{offset + nbytes - 1}")
        except StorageError as exc:
            if "InvalidRange" in str(exc):  # past the end (or an empty object)
                return b""
            raise
        total = str(resp.get("ContentRange", "")).rpartition("/")[2]
        if total.isdigit():
            self._size = int(total)  # "bytes 0-65535/123456": no HEAD needed for the size
        return resp["Body"].read()

    def read_span(self, views: "list[tuple[int, memoryview]]") -> None:
        """One ranged GET from the first view's start to the last one's end, its body read into each
        view in turn (the bytes between two views read into a scratch buffer and dropped)."""
        views = [(at, v) for at, v in views if len(v)]
        if len(views) <= 1:
            for at, v in views:
                self.readinto(v, at)
            return
        start, end = views[0][0], views[-1][0] + len(views[-1][1])
        try:
            resp = self.backend.call("get_object", self.path, self.what, Key=self.path.key,
                                     Range=f"bytes={start}-{end - 1}")
        except StorageError as exc:
            if "InvalidRange" in str(exc):
                raise self._short(start) from None
            raise
        raw = resp["Body"]._raw_stream
        scratch = memoryview(bytearray(min(1 << 20, end - start)))
        pos = start
        try:
            for at, view in views:
                while pos < at:  # a gap between two views
                    pos += self._fill(raw, scratch[:min(len(scratch), at - pos)], pos)
                pos += self._fill(raw, view, pos)
        finally:
            raw.release_conn()

    def _fill(self, raw: Any, view: memoryview, at: int) -> int:
        """Read all of ``view`` from the response body ``raw`` (positioned at byte ``at``); its length."""
        got = 0
        try:
            while got < len(view):
                n = raw.readinto(view[got:])
                if not n:
                    raise self._short(at + got)
                got += n
        except (OSError, ValueError) as exc:
            if isinstance(exc, CorruptCheckpointError):
                raise
            raise StorageError(f"{self.path}: the connection broke at byte {at + got} of a ranged read: {exc}") from exc
        return got

    def _short(self, at: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: object ends at byte {at}, before the data metadata.json "
                                      "records; it is truncated: restore it or re-save the checkpoint")

    def read(self, offset: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def sequential(self) -> None:
        """Nothing to advise an object store."""

    def random(self) -> None:
        """Nothing to advise an object store."""

    def close(self) -> None:
        """Nothing held between requests."""

    def __enter__(self) -> "S3Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MultipartUpload:
    """One file as parts of ``part`` bytes uploaded by threads, hashed in order as they are cut.

    With a late header, part 1 (header and first bytes) is held back and sent last, once the
    header is final: S3 assembles the parts by number, not by arrival.
    """

    def __init__(self, backend: S3Backend, path: ObjectPath, part: int) -> None:
        self.backend, self.path, self.part = backend, path, part
        self.threads = _threads()
        self.free: deque[bytearray] = deque()
        self.etags: dict[int, str] = {}
        self.upload_id = ""

    def _send(self, number: int, buf: bytearray, nbytes: int) -> None:
        if nbytes < len(buf):  # the last part: cut in place (boto3 takes a bytearray, not a memoryview)
            del buf[nbytes:]
        resp = self.backend.call("upload_part", self.path, Key=self.path.key, UploadId=self.upload_id,
                                 PartNumber=number, Body=buf)
        self.etags[number] = resp["ETag"]
        self.free.append(buf)

    def run(self, chunks: Iterable[memoryview], late_header: LateHeader | None) -> tuple[int, str]:
        hasher = xxhash.xxh3_64()
        self.upload_id = self.backend.call("create_multipart_upload", self.path, Key=self.path.key)["UploadId"]
        pending: deque[Future] = deque()
        held: tuple[bytearray, int] | None = None
        number, filled, written = 1, 0, 0
        buf = bytearray(self.part)
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="resumable-upload") as pool:
                def flush() -> None:
                    nonlocal buf, number, filled, held
                    if number == 1 and late_header is not None:
                        held = (buf, filled)
                    else:
                        pending.append(pool.submit(self._send, number, buf, filled))
                    while len(pending) > 2 * self.threads:
                        pending.popleft().result()
                    buf = self.free.popleft() if self.free else bytearray(self.part)
                    number, filled = number + 1, 0

                for view in chunks:
                    while view:
                        take = min(len(view), self.part - filled)
                        buf[filled:filled + take] = view[:take]
                        hasher.update(view[:take])
                        filled, written, view = filled + take, written + take, view[take:]
                        if filled == self.part:
                            flush()
                if filled:
                    flush()
                if held is not None:
                    header = late_header() if late_header is not None else None
                    first, nbytes = held
                    if header is not None:
                        first[8:8 + len(header)] = header
                    pending.append(pool.submit(self._send, 1, first, nbytes))
                while pending:
                    pending.popleft().result()
            parts = [{"PartNumber": n, "ETag": self.etags[n]} for n in sorted(self.etags)]
            self.backend.call("complete_multipart_upload", self.path, Key=self.path.key, UploadId=self.upload_id,
                              MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.backend.call("abort_multipart_upload", self.path, Key=self.path.key, UploadId=self.upload_id)
            except Exception:  # the store is failing: the next start aborts what is left
                pass
            raise
        return written, hasher.hexdigest()
