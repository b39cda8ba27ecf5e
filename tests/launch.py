"""Run a function on N real ``torch.distributed`` processes (gloo, CPU) and collect results.

Usage in a test::

    def _body(rank: int, world_size: int, tmp: str) -> float:   # module level: it is pickled
        ...
        return value

    results = run_distributed(_body, 4, str(tmp_path))          # [value of rank 0, ..., rank 3]

An exception on any rank fails the test with that rank's traceback. Every process
group gets a bounded timeout so a bug shows up as an error, not a hung suite.

Ranks are forked from a server that imported torch once per test session (:func:`context`),
so a rank starts in milliseconds instead of the 1-2 s of a fresh ``import torch`` on 2 cores.
Each rank gets the caller's environment as it is at the call.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=120)
#: What the fork server imports before forking any rank (an import missing here is simply done later).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "safetensors.torch",
           "pytest", "resumable.load", "resumable.save", "resumable.manager", "resumable.train.loop"]


def context() -> Any:
    """The ``forkserver`` context whose server preloads :data:`PRELOAD` (started at first use, kept
    for the session). Forked from a fresh server, never from the test process, each child is clean;
    it inherits the server's environment, not the caller's: pass ``os.environ`` along."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, env: dict[str, str], fn: Callable, args: tuple,
            queue: Any) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        queue.put((rank, True, fn(rank, world_size, *args)))
        # Leave together: gloo can abort ("terminate called without an active exception")
        # when one rank tears down its pairs while another still uses them.
        dist.barrier()
    except BaseException:  # report every failure, then let the others time out or finish
        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return per-rank results."""
    queue = context().SimpleQueue()
    port = free_port()
    error = None
    try:
        mp.start_processes(_worker, args=(world_size, port, dict(os.environ), fn, args, queue), nprocs=world_size,
                           join=True, start_method="forkserver")
    except Exception as exc:  # the per-rank tracebacks below say more
        error = exc
    results: dict[int, Any] = {}
    failures = []
    while not queue.empty():
        rank, ok, value = queue.get()
        if ok:
            results[rank] = value
        else:
            failures.append(f"rank {rank} failed:\n{value}")
    if failures or error is not None:
        raise AssertionError("\n".join(failures) or f"distributed run failed: {error}")
    return [results[r] for r in range(world_size)]
