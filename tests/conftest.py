"""Fixtures shared by every test directory: the S3 server (see tests/s3server.py)."""

from tests.s3server import s3, s3_faulty, s3_server  # noqa: F401  (registered by import)
