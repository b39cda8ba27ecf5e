"""A real S3 server for the tests: moto's ``ThreadedMotoServer`` on 127.0.0.1 (real HTTP, real
boto3 on the client side), and :class:`FaultProxy`, a reverse proxy in front of it that fails or
drops chosen requests (a store answering 500/503, a server that stops mid-save).

Fixtures (registered by ``tests/conftest.py``):

- ``s3_server`` (session): the running :class:`Server`.
- ``s3`` (function): a :class:`Bucket` on a fresh bucket, with the server's AWS environment
  variables set for the test (``monkeypatch.setenv``), so the library's own boto3 clients and
  any subprocess the test starts reach the server.
- ``s3_faulty`` (function): the same, but ``AWS_ENDPOINT_URL`` (and ``.endpoint``/``.client``)
  go through a :class:`FaultProxy`, reachable as ``.proxy``. The inspection helpers (``keys``,
  ``get``, ``put``, ``delete``, ``multipart_uploads``) talk to the server directly, so arranging
  and checking a test's state is neither faulted nor counted by the proxy.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import pytest

# boto3 and moto are imported where used: tests/conftest.py imports this module in every run,
# and a run that uses no S3 fixture should neither pay for them (~0.25 s) nor need them.
if TYPE_CHECKING:
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"

# Variables that would override or disturb the ones we set (a profile, a session token that
# does not belong to our keys, an S3-specific endpoint, which beats AWS_ENDPOINT_URL).
_AWS_ENV_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
)


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS environment that points boto3 (and s3fs) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # No credential probing on the network (instance metadata) and no user config files
        # (a ~/.aws/config with another addressing style or retry mode would change what we test).
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


@functools.cache
def _session() -> boto3.session.Session:
    # Our own session: the tests' clients neither see nor change boto3's default session,
    # which the library under test may use.
    import boto3

    return boto3.session.Session()


def make_client(endpoint: str, config: Config | None = None) -> Any:
    """A boto3 S3 client on ``endpoint``, independent of the environment."""
    return _session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=config,
    )


@dataclass
class Server:
    endpoint: str
    env: dict[str, str]
    _moto: ThreadedMotoServer = field(repr=False)

    def stop(self) -> None:
        self._moto.stop()


def start_server() -> Server:
    """Start moto's S3 server on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request drowns a failure's log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    return Server(endpoint=endpoint, env=aws_env(endpoint), _moto=moto)


# ---------------------------------------------------------------------------------------------
# Fault-injecting proxy

# Headers that describe one connection, not the message (RFC 9110 7.6.1), plus Expect: the proxy
# answers "100 Continue" itself (BaseHTTPRequestHandler does) before reading the body.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_PIECE = 1 << 20
# S3's error codes for the statuses a test is likely to inject; others use the status phrase.
_S3_CODES = {
    403: "AccessDenied",
    404: "NoSuchKey",
    412: "PreconditionFailed",
    500: "InternalError",
    503: "SlowDown",
}


@dataclass
class _Rule:
    action: Literal["fail", "drop"]
    method: str | None
    path_contains: str | None
    after: int
    status: int
    times: int | None
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return _matches(self.method, self.path_contains, method, path)


def _matches(method: str | None, path_contains: str | None, got_method: str, got_path: str) -> bool:
    return (method is None or method.upper() == got_method) and (
        path_contains is None or path_contains in got_path
    )


class FaultProxy:
    """HTTP/1.1 reverse proxy on 127.0.0.1 in front of ``upstream`` that fails or drops chosen
    requests. Requests are matched on their method and on a substring of their path with its
    query (path-style S3: ``/bucket/key?partNumber=2&uploadId=...``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None, upstream
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._seen: list[tuple[str, str]] = []
        handler = type("_BoundHandler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll: stop() (each s3_faulty test's teardown) waits up to one interval.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def fail(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        after: int = 0,
        status: int = 500,
        times: int | None = None,
    ) -> None:
        """Answer matching requests with an S3 XML error of ``status``, after letting ``after``
        of them through, ``times`` times (None: until :meth:`heal`)."""
        self._add(_Rule("fail", method, path_contains, after, status, times))

    def drop(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        after: int = 0,
        times: int | None = None,
    ) -> None:
        """Like :meth:`fail`, but read the request and close the connection without answering."""
        self._add(_Rule("drop", method, path_contains, after, 0, times))

    def heal(self) -> None:
        """Remove every rule: all requests go through again."""
        with self._lock:
            self._rules.clear()

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        """How many matching requests reached the proxy (forwarded, failed or dropped)."""
        with self._lock:
            return sum(_matches(method, path_contains, m, p) for m, p in self._seen)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _decide(self, method: str, path: str) -> _Rule | None:
        """Record a request and return the rule that fires on it, if any (the first one does;
        every matching rule still counts the request towards its ``after``)."""
        with self._lock:
            self._seen.append((method, path))
            chosen = None
            for rule in self._rules:
                if not rule.matches(method, path):
                    continue
                rule.seen += 1
                due = rule.seen > rule.after and (rule.times is None or rule.fired < rule.times)
                if due and chosen is None:
                    rule.fired += 1
                    chosen = rule
            return chosen


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer is framed (length or chunked)
    timeout = 60  # an idle keep-alive connection's thread ends eventually
    proxy: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one stderr line per request would bury a failing test's output

    def _handle(self) -> None:
        rule = self.proxy._decide(self.command, self.path)
        try:
            if rule is None:
                self._forward()
                return
            for _ in self._body_wire():  # read the request so the connection stays in sync
                pass
            if rule.action == "drop":
                self.close_connection = True
            else:
                self._send_s3_error(rule.status)
        except (OSError, http.client.HTTPException):
            # The client or the server broke mid-exchange: this connection's framing is lost.
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    def _body_wire(self) -> Iterator[bytes]:
        """The request body as it came on the wire, in pieces: Content-Length bytes, or the
        chunked framing verbatim (chunk sizes, data, the last chunk and any trailers)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline()
                if not size_line:
                    raise ConnectionError("request body ended inside its chunked framing")
                yield size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                yield from self._read_exactly(size + 2)  # the data and its CRLF
            while True:  # trailers, up to the blank line
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError("request ended inside its trailers")
                yield line
                if line in (b"\r\n", b"\n"):
                    return
        yield from self._read_exactly(int(self.headers.get("Content-Length", 0)))

    def _read_exactly(self, n: int) -> Iterator[bytes]:
        while n > 0:
            piece = self.rfile.read(min(n, _PIECE))
            if not piece:
                raise ConnectionError("request body shorter than announced")
            n -= len(piece)
            yield piece

    def _forward(self) -> None:
        # A fresh upstream connection per request: no stale keep-alive socket to the server to
        # retry on, and a request body streams through only once.
        upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host included: moto builds URLs from it
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            for piece in self._body_wire():
                upstream.send(piece)
            self._relay(upstream.getresponse())
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        no_body = self.command == "HEAD" or response.status in (204, 304)
        length = response.getheader("Content-Length")
        chunked = not no_body and length is None and response.chunked
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not no_body and length is None:  # delimited by the close of the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if no_body:
            return
        while piece := response.read(_PIECE):
            self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_s3_error(self, status: int) -> None:
        code = _S3_CODES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by FaultProxy</Message>"
            f"<Resource>{escape(self.path)}</Resource><RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# ---------------------------------------------------------------------------------------------
# The per-test bucket helper and the fixtures


class Bucket:
    """One test's bucket. ``client`` is on ``endpoint`` (what AWS_ENDPOINT_URL says: the proxy
    for ``s3_faulty``); ``direct`` and the helpers go to the server itself."""

    def __init__(self, name: str, endpoint: str, direct: Any, proxy: FaultProxy | None) -> None:
        self.bucket = name
        self.endpoint = endpoint
        self.direct = direct
        self.client = direct if proxy is None else make_client(endpoint)
        self.proxy = proxy

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.direct.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.direct.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key``; returns its ETag (quoted, as S3 gives it)."""
        return self.direct.put_object(Bucket=self.bucket, Key=key, Body=data)["ETag"]

    def upload(self, local: os.PathLike[str], prefix: str) -> None:
        """Every file under the local folder ``local`` as the object ``prefix/<relative path>``."""
        root = Path(local)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.put(f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())

    def delete(self, key: str) -> None:
        self.direct.delete_object(Bucket=self.bucket, Key=key)

    def multipart_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload in progress, sorted."""
        pages = self.direct.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket)
        return sorted((u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", []))

    def _empty_and_remove(self) -> None:
        for key, upload_id in self.multipart_uploads():
            self.direct.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        for key in self.keys():
            self.delete(key)
        self.direct.delete_bucket(Bucket=self.bucket)


def _bucket_name(test_name: str) -> str:
    # Valid S3 name (3-63 of [a-z0-9-], alphanumeric ends), readable in a failure, and unique.
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40] or "t"
    return f"{stem}-{uuid.uuid4().hex[:16]}"


@contextmanager
def _open_bucket(
    server: Server,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    proxy: FaultProxy | None,
) -> Iterator[Bucket]:
    endpoint = server.endpoint if proxy is None else proxy.endpoint
    for name in _AWS_ENV_CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_env(endpoint).items():
        monkeypatch.setenv(name, value)
    direct = make_client(server.endpoint)
    name = _bucket_name(request.node.name)
    direct.create_bucket(Bucket=name)
    bucket = Bucket(name, endpoint, direct, proxy)
    yield bucket
    # Objects of tens of MiB stay in the server's memory for the session otherwise.
    bucket._empty_and_remove()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def s3(
    s3_server: Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bucket]:
    with _open_bucket(s3_server, request, monkeypatch, proxy=None) as bucket:
        yield bucket


@pytest.fixture
def s3_faulty(
    s3_server: Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bucket]:
    proxy = FaultProxy(s3_server.endpoint)
    try:
        with _open_bucket(s3_server, request, monkeypatch, proxy) as bucket:
            yield bucket
    finally:
        proxy.stop()
