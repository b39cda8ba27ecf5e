"""The timed operations, one function per contender, run inside a ``bench.worker`` rank.

Each takes an :class:`Ctx` and returns ``{"seconds": ...}`` (plus ``blocked`` /
``committed`` for asynchronous saves). Durable everywhere: resumable and DCP fsync their
files themselves (``FileSystemWriter(sync_files=True)`` is DCP's default); the
``safetensors`` and ``torch.save`` rows fsync the file after writing it, inside the timing.
Timings run from a barrier before the call to a barrier after it, so a 2-rank number is
the time of the slower rank.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.state import plain_tensors


@dataclass
class Ctx:
    """What an operation needs: this rank's state, the folders, and a barrier."""

    state: dict[str, Any] | None
    world: int
    rank: int
    out: Path            # save: the folder to create
    source: Path | None  # load: the checkpoint folder
    barrier: Callable[[], None]

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of ``fn`` between two barriers (the slowest rank's time)."""
        self.barrier()
        start = time.perf_counter()
        fn()
        self.barrier()
        return time.perf_counter() - start


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ saves


def resumable_save(ctx: Ctx) -> dict[str, float]:
    import resumable

    return {"seconds": ctx.timed(lambda: resumable.save(ctx.state, ctx.out, 1))}


def resumable_async_save(ctx: Ctx) -> dict[str, float]:
    """Two saves through one saver; the second (staging buffers reused) is the one timed."""
    from resumable.async_save import AsyncSaver

    saver = AsyncSaver()
    saver.save(ctx.state, ctx.out, 1).wait()
    ctx.barrier()
    start = time.perf_counter()
    handle = saver.save(ctx.state, ctx.out, 2)
    blocked = time.perf_counter() - start
    handle.wait()
    ctx.barrier()
    return {"seconds": time.perf_counter() - start, "blocked": blocked, "committed": time.perf_counter() - start}


def _dcp_writer(path: Path, threads: int) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(path, thread_count=threads, sync_files=True)


def dcp_save(ctx: Ctx, threads: int = 1) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    writer = _dcp_writer(ctx.out, threads)
    return {"seconds": ctx.timed(lambda: dcp.save(ctx.state, storage_writer=writer))}


def dcp_save_t2(ctx: Ctx) -> dict[str, float]:
    return dcp_save(ctx, threads=2)


def dcp_async_save(ctx: Ctx) -> dict[str, float]:
    """DCP's best CPU setting: one ``DefaultStager`` kept across saves (it caches the staged
    storages, so the second save copies into the first one's memory) and 2 writer threads.

    Two saves; the second is the one timed. (``cache_staged_state_dict=True`` on the writer
    would pin memory, which needs CUDA.)
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, False, False))
    try:
        dcp.async_save(ctx.state, storage_writer=_dcp_writer(ctx.out / "1", 2), async_stager=stager).result()
        ctx.barrier()
        start = time.perf_counter()
        future = dcp.async_save(ctx.state, storage_writer=_dcp_writer(ctx.out / "2", 2), async_stager=stager)
        blocked = time.perf_counter() - start
        future.result()
        ctx.barrier()
        seconds = time.perf_counter() - start
    finally:
        stager.close()
    return {"seconds": seconds, "blocked": blocked, "committed": seconds}


def dcp_async_save_default(ctx: Ctx) -> dict[str, float]:
    """``dcp.async_save`` as documented: a new default stager per call (fresh CPU buffers each save)."""
    import torch.distributed.checkpoint as dcp

    dcp.async_save(ctx.state, storage_writer=_dcp_writer(ctx.out / "1", 2)).result()
    ctx.barrier()
    start = time.perf_counter()
    future = dcp.async_save(ctx.state, storage_writer=_dcp_writer(ctx.out / "2", 2))
    blocked = time.perf_counter() - start
    future.result()
    ctx.barrier()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "blocked": blocked, "committed": seconds}


def safetensors_save(ctx: Ctx) -> dict[str, float]:
    from safetensors.torch import save_file

    flat = plain_tensors(ctx.state)
    ctx.out.mkdir(parents=True)
    path = ctx.out / "model.safetensors"

    def run() -> None:
        save_file(flat, str(path))
        _fsync(path)
    return {"seconds": ctx.timed(run)}


def torch_save(ctx: Ctx) -> dict[str, float]:
    flat = plain_tensors(ctx.state)
    ctx.out.mkdir(parents=True)
    path = ctx.out / "model.pt"

    def run() -> None:
        with open(path, "wb") as f:
            torch.save(flat, f)
            f.flush()
            os.fsync(f.fileno())
    return {"seconds": ctx.timed(run)}


# ------------------------------------------------------------------------------ loads


def resumable_load(ctx: Ctx, balanced: bool = False, verify: str = "blocks") -> dict[str, float]:
    import resumable

    return {"seconds": ctx.timed(lambda: resumable.load(ctx.state, ctx.source, balanced=balanced, verify=verify))}


def resumable_load_sizes(ctx: Ctx) -> dict[str, float]:
    """A load checking sizes only (no per-block checksums): what the default verification costs."""
    return resumable_load(ctx, verify="size")


def resumable_balanced_load(ctx: Ctx) -> dict[str, float]:
    return resumable_load(ctx, balanced=True)


def dcp_load(ctx: Ctx) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    return {"seconds": ctx.timed(lambda: dcp.load(ctx.state, checkpoint_id=ctx.source))}


def safetensors_load(ctx: Ctx) -> dict[str, Any]:
    """``load_file`` maps the file and returns tensors over the mapping (nothing is read yet),
    so the timing includes one pass over every tensor (``sum``), which faults every page in."""
    from safetensors.torch import load_file

    box: dict[str, Any] = {}

    def run() -> None:
        box.update(load_file(str(ctx.source / "model.safetensors")))
        for t in box.values():
            t.sum()
    return {"seconds": ctx.timed(run), "loaded": box}


def torch_load(ctx: Ctx) -> dict[str, Any]:
    box: dict[str, Any] = {}
    seconds = ctx.timed(lambda: box.update(torch.load(ctx.source / "model.pt", weights_only=True)))
    return {"seconds": seconds, "loaded": box}


OPS: dict[str, Callable[[Ctx], dict[str, Any]]] = {f.__name__: f for f in (
    resumable_save, resumable_async_save, dcp_save, dcp_save_t2, dcp_async_save, dcp_async_save_default,
    safetensors_save, torch_save,
    resumable_load, resumable_load_sizes, resumable_balanced_load, dcp_load, safetensors_load, torch_load)}
#: Operations that build their own tensors (no target state is prepared for them).
ALLOCATING = {"safetensors_load", "torch_load"}
