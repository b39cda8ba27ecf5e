"""One rank of one measurement, in a fresh process: ``python -m bench.worker SPEC.json``.

Started by :mod:`bench.proc` with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_PORT`` set. Steps:
import everything (so that every contender starts from the same baseline), join the gloo
job, build this rank's state, prepare the page cache (cold: dropped; warm: the files read
once), run the operation between barriers, check the loaded values, and write
``{seconds, ..., rss_*}`` to ``<result>.<rank>.json``.

Peak RSS is ``ru_maxrss`` (the high-water mark of this process): ``rss_import`` after the
imports, ``rss_state`` after building the state, ``rss_peak`` after the operation.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import safetensors.torch  # noqa: F401  (imported before the baseline, like every contender)
import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401

import resumable  # noqa: F401
import resumable.balanced  # noqa: F401
from bench import disk, ops
from bench.cases import BY_NAME
from bench.state import build_state, check_loaded, shapes_for, value


def maxrss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepare_cache(cache: str, source: Path, rank: int, barrier: Any) -> str:
    """Cold: evict the source's files; warm: read them once. Rank 0 does it, everyone waits."""
    method = ""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    barrier()
    if rank == 0:
        if cache == "cold":
            method = disk.drop_caches(files)
        elif cache == "warm":
            for f in files:
                with open(f, "rb") as fh:
                    while fh.read(16 << 20):
                        pass
            method = "read"
    barrier()
    return method


def _check_flat(loaded: dict[str, torch.Tensor], params: list[str]) -> None:
    """The flat dicts of safetensors / torch.load: first and last element of every big tensor."""
    index = {name: k for k, name in enumerate(params)}
    for name, t in loaded.items():
        base, _, suffix = name.rpartition(".")
        if suffix == "step":
            continue
        j = {"exp_avg": 1, "exp_avg_sq": 2}.get(suffix, 0)
        fqn = base if j else name
        want = (1.0, -1.0, 0.5)[j] * value(3 * index[fqn] + j, 0)
        if float(t[0].reshape(-1)[0]) != want or float(t[-1].reshape(-1)[0]) != want:
            raise AssertionError(f"{name}: loaded values differ from the saved ones")


def run_disk(spec: dict[str, Any]) -> dict[str, Any]:
    """The disk case, for each thread count in ``writers``: durable writes (direct, then page
    cache) and a cold read; each count's files are removed before the next count's."""
    out = {}
    for n in spec["writers"]:
        folder = Path(spec["out"]) / f"x{n}"
        try:
            direct_s = disk.durable_write(folder, spec["size_bytes"], n, direct=True)
            write_s = disk.durable_write(folder, spec["size_bytes"], n)
            read_s, nbytes, method = disk.cold_read(folder, n)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        out[str(n)] = {"write_seconds": write_s, "direct_write_seconds": direct_s, "read_seconds": read_s,
                       "bytes": nbytes, "cache_method": method}
    return out


def run_case(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Build, prepare, time, check: one rank's share of one case."""
    case = BY_NAME[spec["case"]]
    barrier = (lambda: dist.barrier()) if world > 1 else (lambda: None)
    rss_import = maxrss()
    allocating = case.op in ops.ALLOCATING
    state = None
    if not allocating:
        state = build_state(shapes_for(spec["size_bytes"]), world=world, rank=rank,
                            replicated=case.replicated, fill=case.source is None)
    rss_state = maxrss()
    source = Path(spec["source"]) if spec.get("source") else None
    method = ""
    if source is not None:
        method = _prepare_cache(case.cache, source, rank, barrier)
    else:
        barrier()
        if rank == 0:
            os.sync()  # earlier runs' dirty pages are not this save's to flush
        barrier()
    ctx = ops.Ctx(state, world, rank, Path(spec["out"]), source, barrier)
    result = ops.OPS[case.op](ctx)
    rss_peak = maxrss()
    loaded = result.pop("loaded", None)
    if loaded is not None:
        _check_flat(loaded, list(shapes_for(spec["size_bytes"]).params()))
    elif source is not None:
        check_loaded(state, case.saved_world)
    return {**result, "rss_import": rss_import, "rss_state": rss_state, "rss_peak": rss_peak,
            "cache_method": method}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if "disk" in spec:
        out = run_disk(spec)
    else:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        try:
            out = run_case(spec, rank, world)
            if world > 1:
                dist.barrier()  # leave together (gloo aborts when a peer tears down early)
        finally:
            if world > 1:
                dist.destroy_process_group()
    Path(f"{spec['result']}.{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
