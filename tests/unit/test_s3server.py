"""The S3 test server and its fault proxy (tests/s3server.py) behave as real S3 does for boto3."""

from __future__ import annotations

import hashlib
import http.client
import os

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from tests.s3server import Bucket, make_client

# One attempt in all: botocore's "max_attempts" counts retries after the first, so 1 still retries once.
NO_RETRY = Config(retries={"total_max_attempts": 1})
MiB = 1 << 20


def _status(error: ClientError) -> int:
    return error.response["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_list_delete(s3: Bucket) -> None:
    s3.put("a.json", b"{}")
    s3.client.put_object(Bucket=s3.bucket, Key="dir/b.bin", Body=b"\x00\x01")
    assert s3.keys() == ["a.json", "dir/b.bin"]
    assert s3.keys("dir/") == ["dir/b.bin"]
    assert s3.get("dir/b.bin") == b"\x00\x01"
    s3.delete("a.json")
    assert s3.keys() == ["dir/b.bin"]
    assert s3.url("dir", "b.bin") == f"s3://{s3.bucket}/dir/b.bin"


def test_environment_reaches_the_server(s3: Bucket) -> None:
    # A client built only from the environment, as the library builds its own.
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
    s3.put("k", b"v")
    client = boto3.session.Session().client("s3")
    assert client.get_object(Bucket=s3.bucket, Key="k")["Body"].read() == b"v"


def test_conditional_put(s3: Bucket) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="tracker", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        s3.client.put_object(Bucket=s3.bucket, Key="tracker", Body=b"2", IfNoneMatch="*")
    assert _status(refused.value) == 412
    etag = s3.client.head_object(Bucket=s3.bucket, Key="tracker")["ETag"]
    new_etag = s3.client.put_object(Bucket=s3.bucket, Key="tracker", Body=b"3", IfMatch=etag)[
        "ETag"
    ]
    with pytest.raises(ClientError) as stale:
        s3.client.put_object(Bucket=s3.bucket, Key="tracker", Body=b"4", IfMatch=etag)
    assert _status(stale.value) == 412
    assert new_etag != etag and s3.get("tracker") == b"3"


def test_multipart_upload_listed_while_in_progress(s3: Bucket) -> None:
    upload_id = s3.client.create_multipart_upload(Bucket=s3.bucket, Key="big")["UploadId"]
    assert s3.multipart_uploads() == [("big", upload_id)]
    assert s3.keys() == []
    parts = [b"a" * (5 * MiB), b"b" * 10]
    etags = [
        s3.client.upload_part(
            Bucket=s3.bucket, Key="big", UploadId=upload_id, PartNumber=n, Body=part
        )["ETag"]
        for n, part in enumerate(parts, 1)
    ]
    s3.client.complete_multipart_upload(
        Bucket=s3.bucket,
        Key="big",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
    assert s3.multipart_uploads() == []
    assert s3.get("big") == b"".join(parts)


def test_ranged_get_readinto(s3: Bucket) -> None:
    data = os.urandom(MiB)
    s3.put("blob", data)
    body = s3.client.get_object(Bucket=s3.bucket, Key="blob", Range="bytes=1000-1999")["Body"]
    buf = bytearray(1000)
    view, filled = memoryview(buf), 0
    while filled < len(buf) and (n := body.readinto(view[filled:])):
        filled += n
    assert filled == 1000 and bytes(buf) == data[1000:2000]


def test_proxy_forwards_tens_of_mib_both_ways(s3_faulty: Bucket) -> None:
    client = s3_faulty.client
    assert s3_faulty.proxy is not None and client.meta.endpoint_url == s3_faulty.proxy.endpoint
    upload_id = client.create_multipart_upload(Bucket=s3_faulty.bucket, Key="big")["UploadId"]
    part = os.urandom(16 * MiB)
    etags = [
        client.upload_part(
            Bucket=s3_faulty.bucket, Key="big", UploadId=upload_id, PartNumber=n, Body=part
        )["ETag"]
        for n in (1, 2)
    ]
    client.complete_multipart_upload(
        Bucket=s3_faulty.bucket,
        Key="big",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2), etags)]},
    )
    # Read back through the proxy, streamed in pieces, on the client's kept-alive connection.
    body = client.get_object(Bucket=s3_faulty.bucket, Key="big")["Body"]
    digest = hashlib.sha256()
    for piece in body.iter_chunks(MiB):
        digest.update(piece)
    assert digest.digest() == hashlib.sha256(part + part).digest()
    assert s3_faulty.proxy.count("PUT", "partNumber=") == 2
    assert s3_faulty.proxy.count() == 5  # create, 2 parts, complete, get


def test_proxy_forwards_a_chunked_request_body(s3_faulty: Bucket) -> None:
    # boto3 sends Content-Length over http; other clients (aiohttp under s3fs) may send chunked.
    assert s3_faulty.proxy is not None
    url = s3_faulty.direct.generate_presigned_url(
        "put_object", Params={"Bucket": s3_faulty.bucket, "Key": "chunked"}
    )
    pieces = [os.urandom(MiB + 7), b"tail"]
    conn = http.client.HTTPConnection(*s3_faulty.proxy.endpoint.removeprefix("http://").split(":"))
    path = url.split(s3_faulty.direct.meta.endpoint_url, 1)[1]
    conn.request("PUT", path, body=iter(pieces), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200, response.read()
    conn.close()
    assert s3_faulty.get("chunked") == b"".join(pieces)


def test_proxy_fail_after_and_times(s3_faulty: Bucket) -> None:
    assert s3_faulty.proxy is not None
    client = make_client(s3_faulty.endpoint, NO_RETRY)
    s3_faulty.proxy.fail("PUT", path_contains="/obj", after=1, status=503, times=1)
    client.put_object(Bucket=s3_faulty.bucket, Key="obj", Body=b"1")
    with pytest.raises(ClientError) as failed:
        client.put_object(Bucket=s3_faulty.bucket, Key="obj", Body=b"2")
    assert _status(failed.value) == 503
    assert failed.value.response["Error"]["Code"] == "SlowDown"
    assert s3_faulty.get("obj") == b"1"  # the failed request never reached the server
    client.put_object(Bucket=s3_faulty.bucket, Key="obj", Body=b"3")
    client.put_object(Bucket=s3_faulty.bucket, Key="other", Body=b"x")  # not matched
    assert s3_faulty.get("obj") == b"3"
    assert s3_faulty.proxy.count("PUT", "/obj") == 3
    assert s3_faulty.proxy.count("PUT") == 4 and s3_faulty.proxy.count("GET") == 0


def test_proxy_fail_until_heal(s3_faulty: Bucket) -> None:
    assert s3_faulty.proxy is not None
    client = make_client(s3_faulty.endpoint, NO_RETRY)
    s3_faulty.put("obj", b"v")
    s3_faulty.proxy.fail(path_contains="/obj")  # any method
    for _ in range(3):
        with pytest.raises(ClientError) as failed:
            client.get_object(Bucket=s3_faulty.bucket, Key="obj")
        assert _status(failed.value) == 500
        assert failed.value.response["Error"]["Code"] == "InternalError"
    with pytest.raises(ClientError) as head:  # HEAD: the status alone, no body
        client.head_object(Bucket=s3_faulty.bucket, Key="obj")
    assert _status(head.value) == 500
    s3_faulty.proxy.heal()
    assert client.get_object(Bucket=s3_faulty.bucket, Key="obj")["Body"].read() == b"v"


def test_proxy_drop_closes_without_answer(s3_faulty: Bucket) -> None:
    assert s3_faulty.proxy is not None
    client = make_client(s3_faulty.endpoint, NO_RETRY)
    s3_faulty.proxy.drop("PUT", times=1)
    with pytest.raises(ConnectionClosedError):
        client.put_object(Bucket=s3_faulty.bucket, Key="obj", Body=b"x" * MiB)
    assert s3_faulty.keys() == []
    # The rule is spent: the same client, on a new connection, succeeds.
    client.put_object(Bucket=s3_faulty.bucket, Key="obj", Body=b"y")
    assert s3_faulty.get("obj") == b"y"
    s3_faulty.proxy.drop(path_contains="/obj")
    with pytest.raises(ConnectionClosedError):
        client.get_object(Bucket=s3_faulty.bucket, Key="obj")
    s3_faulty.proxy.heal()
    assert client.get_object(Bucket=s3_faulty.bucket, Key="obj")["Body"].read() == b"y"
