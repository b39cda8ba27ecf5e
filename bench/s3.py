"""``python -m bench.s3``: resumable against PyTorch DCP on an S3 object store, in one run.

    python -m bench.s3                    # 0.25 GiB state, ~6 min on 2 cores (resumable's loads: 4 of ~1 min)
    python -m bench.s3 --size-gib 0.1     # ~2 min
    python -m bench.s3 --reps 2 --res-part-mib 64 --dcp-threads 8 16 --res-threads 16

The store is moto's ``ThreadedMotoServer`` on 127.0.0.1, started here (as the tests start it,
``tests/s3server.py``) and shared by every measurement of the run. Each measurement is a fresh
process (``python -m bench.s3 --worker SPEC.json``) with the server's AWS environment:

- server ceiling: one object of the state's size through raw boto3: one PUT and one GET, boto3's
  transfer manager (16 threads, 8 MiB parts) both ways, and 8 MiB ranged GETs on 16 threads;
- DCP: ``dcp.save`` through ``FsspecWriter`` (s3fs) with ``thread_count`` in ``--dcp-threads``,
  and a cold ``dcp.load`` through ``FsspecReader`` of the fastest save (the reader reads its
  files one after another and takes no thread count);
- resumable: ``resumable.save`` / ``resumable.load`` with ``RESUMABLE_S3_THREADS`` in
  ``--res-threads`` (the load reads the fastest save).

Every load is compared with the saved state (``torch.equal`` on every tensor, ``==`` on the
rest) and every save's bytes must be on the server; a failure is reported and makes the exit
status 1. The server's requests are counted by method. The fastest run of each operation is
reported, and the ratio resumable / DCP. Results: ``bench/results/s3.json`` (every run) and
``s3.md``. moto keeps objects in Python (bodies above 5 MiB in temporary files), parses every
request in Python on the same 2 cores as the client, and reads a whole object for each ranged
GET: the ceiling rows say how much of a ratio the server leaves room for.
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
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch

from bench.state import GIB, build_state, noise, plain_tensors, shapes_for

ROOT = Path(__file__).resolve().parent
BUCKET = "bench"
_MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Worker side: one measurement in this (fresh) process


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def run_worker_spec(spec: dict[str, Any]) -> dict[str, float]:
    """Build the state this measurement needs, run and time it, check a load's values."""
    op, size, url = spec["op"], spec["size_bytes"], spec.get("url", "")
    if op == "ceiling":
        return _ceiling(size)
    import resumable
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    shapes = shapes_for(size)
    saved = build_state(shapes)  # a load's reference: the very state every save wrote
    if op == "dcp_save":
        writer = FsspecWriter(url, thread_count=spec["threads"], sync_files=False)
        return {"seconds": _timed(lambda: dcp.save(saved, storage_writer=writer))}
    if op == "resumable_save":
        return {"seconds": _timed(lambda: resumable.save(saved, url, spec["iteration"]))}
    target = build_state(shapes, fill=False)
    if op == "dcp_load":
        seconds = _timed(lambda: dcp.load(target, storage_reader=FsspecReader(url)))
    elif op == "resumable_load":
        seconds = _timed(lambda: resumable.load(target, url))
    else:
        raise ValueError(f"unknown op {op!r}")
    _check_equal(saved, target)
    return {"seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Driver side: the server, the measurements, the report


def _log(msg: str) -> None:
    print(f"[bench.s3 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _RequestCounter(logging.Filter):
    """Counts the server's requests by method from werkzeug's one log line per request, and
    drops those lines (errors still print)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        method = re.search(r"(GET|PUT|POST|HEAD|DELETE) /", str(args[0])) if args else None
        if method:
            with self._lock:
                self.counts[method[1]] += 1
        return record.levelno >= logging.ERROR

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return self.counts.copy()


_REQUESTS = _RequestCounter()


def _measure(spec: dict[str, Any], env: dict[str, str], timeout: float = 900) -> dict[str, Any]:
    """Run ``spec`` in a fresh ``python -m bench.s3 --worker`` process; its result, with the
    server's ``requests`` by method during it.

    Raises:
        RuntimeError: the worker failed (its output's tail included) or timed out.
    """
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        spec_path, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(result)}))
        before = _REQUESTS.snapshot()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.s3", "--worker", str(spec_path)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{spec['op']} timed out after {timeout:.0f}s") from e
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['op']} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return {**json.loads(result.read_text()), "requests": dict(_REQUESTS.snapshot() - before)}


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


def _sweep(op: str, settings: list[int], spec_for: Callable[[int], dict[str, Any]],
           env_for: Callable[[int], dict[str, str]], size: int, reps: int, failures: list[str],
           saved_to: Callable[[int], str] | None = None, client: Any = None) -> dict[str, Any]:
    """``op`` ``reps`` times per setting, the settings interleaved (a slow phase of the shared
    machine hits them alike); the best setting is the one of the fastest run.

    Returns {"runs": {setting: [seconds, ...]}, "errors": {setting: text}, "requests": {setting:
    {method: count}} (of its last run), "best": setting or None, "seconds": best run or None}.
    For a save, ``saved_to(setting)`` is its URL: emptied before each run, and the server must
    hold the state's bytes there afterwards (a path taken for a local one would "save" into a
    folder named ``s3:``).
    """
    runs: dict[str, list[float]] = {str(s): [] for s in settings}
    errors: dict[str, str] = {}
    requests: dict[str, dict[str, int]] = {}
    for _ in range(reps):
        for s in settings:
            if str(s) in errors:
                continue
            try:
                if saved_to is not None:
                    _remove_prefix(client, _folder(saved_to(s)))
                r = _measure({"op": op, "size_bytes": size, **spec_for(s)}, env_for(s))
                if saved_to is not None:
                    stored = _stored_bytes(client, _folder(saved_to(s)))
                    if stored < size:
                        raise RuntimeError(f"{op} x{s}: the server holds {stored} bytes under {saved_to(s)}, "
                                           f"less than the state's {size}")
                runs[str(s)].append(r["seconds"])
                requests[str(s)] = r["requests"]
                _log(f"{op} x{s}: {r['seconds']:.2f}s, {size / GIB / r['seconds']:.3f} GiB/s, "
                     f"requests {r['requests']}")
            except RuntimeError as e:
                errors[str(s)] = str(e)
                failures.append(f"{op} x{s}: {e}")
                _log(f"{op} x{s} FAILED:\n{e}")
    ok = {k: min(v) for k, v in runs.items() if v}
    best = min(ok, key=ok.__getitem__) if ok else None
    return {"runs": runs, "errors": errors, "requests": requests, "best": best,
            "seconds": ok[best] if best else None}


def _contender(name: str, save_settings: list[int], load_settings: list[int],
               save_spec: Callable[[int], dict[str, Any]], load_url: Callable[[str], str],
               env_for: Callable[[int], dict[str, str]], size: int, reps: int, client: Any,
               failures: list[str]) -> dict[str, Any]:
    """``<name>_save`` once per save setting, then ``<name>_load`` of the fastest save once per
    load setting; the other saves are deleted first and the fastest one after (server memory)."""
    url = lambda s: f"s3://{BUCKET}/{name}/t{s}"  # noqa: E731
    save = _sweep(f"{name}_save", save_settings, lambda s: {"url": url(s), **save_spec(s)}, env_for, size, reps,
                  failures, url, client)
    for s in save["runs"]:
        if s != save["best"]:
            _remove_prefix(client, _folder(url(s)))
    best = save["best"]
    load = _sweep(f"{name}_load", load_settings if best else [], lambda _: {"url": load_url(url(best))}, env_for,
                  size, reps, failures)
    _remove_prefix(client, f"{name}/")
    return {f"{name}_save": save, f"{name}_load": load}


def _rate(size: int, seconds: float | None) -> str:
    return "failed" if seconds is None else f"{size / GIB / seconds:.3f}"


def table(doc: dict[str, Any]) -> str:
    """The markdown table: ceiling rows, then save and cold load of each side, then the ratios."""
    size, res = doc["size_bytes"], doc["results"]
    lines = [f"S3 (moto {doc['versions']['moto']} on 127.0.0.1), state {size / GIB:.3f} GiB, "
             f"{doc['machine']['nproc']} cores, best of {doc['reps']} run(s) per setting; GiB/s of the state (higher "
             f"is better); resumable's part size: {doc['res_part_mib'] or 'default (8)'} MiB. moto reads a whole "
             "object for every ranged GET (moto/s3/responses.py, _handle_range_header slices the full body), so a "
             "load's time grows with GETs x object size here, which a real store does not do.", "",
             "| operation | setting | seconds | GiB/s | requests | all settings (s) |", "|---|---|---|---|---|---|"]
    c = res.get("ceiling")
    if c:
        for what, key in (("server ceiling: PUT one object", "put_seconds"),
                          ("server ceiling: GET one object", "get_seconds"),
                          ("server ceiling: upload_fileobj", "put_mt_seconds"),
                          ("server ceiling: download_fileobj", "get_mt_seconds"),
                          ("server ceiling: ranged GETs", "get_ranges_seconds")):
            setting = "1 request" if key in ("put_seconds", "get_seconds") else "16 threads, 8 MiB parts"
            lines.append(f"| {what} | {setting} | {c[key]:.2f} | {_rate(size, c[key])} | | |")
    best: dict[str, float | None] = {}
    for op, label, knob in (("dcp_save", "DCP save (FsspecWriter)", "thread_count"),
                            ("dcp_load", "DCP cold load (FsspecReader)", "no thread knob"),
                            ("resumable_save", "resumable save", "RESUMABLE_S3_THREADS"),
                            ("resumable_load", "resumable cold load", "RESUMABLE_S3_THREADS")):
        r = res[op]
        seconds = best[op] = r["seconds"]
        setting = knob if r["best"] is None or op == "dcp_load" else f"{knob}={r['best']}"
        allruns = ", ".join(f"{k}: {min(v):.2f}" if v else f"{k}: failed" for k, v in r["runs"].items())
        counts = r["requests"].get(r["best"], {})
        lines.append(f"| {label} | {setting} | {'-' if seconds is None else f'{seconds:.2f}'} | "
                     f"{_rate(size, seconds)} | {', '.join(f'{m} {n}' for m, n in sorted(counts.items()))} | "
                     f"{allruns if op != 'dcp_load' else ''} |")
    for what, a, b in (("save", "resumable_save", "dcp_save"), ("cold load", "resumable_load", "dcp_load")):
        ra, rb = best[a], best[b]
        ratio = "n/a" if ra is None or rb is None else f"{rb / ra:.2f}x"
        lines.append(f"| **ratio resumable / DCP, {what}** | best vs best | | {ratio} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=0.25, help="training state size (default 0.25)")
    p.add_argument("--dcp-threads", type=int, nargs="+", default=[1, 4, 8, 16])
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
    from tests.s3server import _AWS_ENV_CLEARED, make_client, start_server

    start = time.perf_counter()
    size = shapes_for(int(args.size_gib * GIB)).nbytes()
    server = start_server()
    werkzeug = logging.getLogger("werkzeug")  # after start_server, which may quiet it
    werkzeug.setLevel(logging.INFO)  # its one line per request is what _REQUESTS counts (and drops)
    werkzeug.addFilter(_REQUESTS)
    failures: list[str] = []
    try:
        client = make_client(server.endpoint)
        client.create_bucket(Bucket=BUCKET)
        base = {k: v for k, v in os.environ.items() if k not in _AWS_ENV_CLEARED}
        env = {**base, **server.env, "PYTHONUNBUFFERED": "1"}
        env.pop("RESUMABLE_S3_PART_MIB", None)  # --res-part-mib sets it
        _log(f"state {size / GIB:.3f} GiB, server {server.endpoint}")
        ceilings = [_measure({"op": "ceiling", "size_bytes": size}, env) for _ in range(args.reps)]
        c = {k: min(r[k] for r in ceilings) for k in ceilings[0] if k != "requests"}  # each one's fastest run
        results: dict[str, Any] = {"ceiling": c}
        _log("ceiling: " + ", ".join(f"{k[:-8]} {size / GIB / v:.3f} GiB/s" for k, v in c.items()))

        res_env = env if args.res_part_mib is None else {**env, "RESUMABLE_S3_PART_MIB": str(args.res_part_mib)}
        results |= _contender("dcp", args.dcp_threads, [1], lambda t: {"threads": t}, lambda url: url,
                              lambda _: env, size, args.reps, client, failures)
        results |= _contender("resumable", args.res_threads, args.res_threads, lambda _: {"iteration": 1},
                              lambda url: f"{url}/iteration_00000001",
                              lambda t: {**res_env, "RESUMABLE_S3_THREADS": str(t)}, size, args.reps, client,
                              failures)
    finally:
        server.stop()

    versions = {name: version(name) for name in ("moto", "boto3", "s3fs", "fsspec")} | {"torch": torch.__version__}
    doc = {"machine": machine(), "versions": versions, "size_bytes": size, "server": server.endpoint,
           "command": " ".join(["python -m bench.s3", *(argv if argv is not None else sys.argv[1:])]),
           "reps": args.reps, "res_part_mib": args.res_part_mib, "results": results, "failures": failures,
           "seconds": time.perf_counter() - start}
    text = table(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "s3.json").write_text(json.dumps(doc, indent=1))
    (args.out / "s3.md").write_text(text + "\n" + "".join(f"\nFAILED: {f.splitlines()[0]}" for f in failures) + "\n")
    print(f"\n{text}\n\nwrote {args.out}/s3.json, s3.md in {doc['seconds'] / 60:.1f} min", flush=True)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
