"""A rank that dies, hangs or raises during a save or a load: the others get an error in bounded time.

Real gloo processes, forked like ``tests.launch.run_distributed``'s from the fork server that
imported torch (``tests.launch.context``). Unlike ``run_distributed`` (which tears every process
down as soon as one fails), the launcher here lets a rank die and records what each
survivor raised and after how long. Collective timeouts are a few seconds so a hang
shows up quickly: the process group's timeout for sync saves and loads, the async saver's
own ``collective_timeout`` for its background commit.
"""

from __future__ import annotations

import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from resumable import commit
from tests.launch import context, free_port

pytestmark = pytest.mark.slow

# Every collective of these tests gives up after this long (busy 2-core CI included; the ranks,
# forked with torch imported, start within milliseconds of each other).
TIMEOUT_S = 4.0


def _worker(rank: int, world: int, port: int, env: dict[str, str], pg_timeout: float, fn: Callable, args: tuple,
            out: Any) -> None:
    os.environ.clear()
    os.environ.update(env)  # the fork server's environment is not the caller's
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # Import now: a rank still importing when its peer enters a collective would eat the short timeout.
    import resumable.load, resumable.manager, resumable.save  # noqa: E401,F401
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout))
    start = time.monotonic()
    try:
        value = fn(rank, *args)
        out.put((rank, "ok", value, time.monotonic() - start))
    except BaseException as exc:  # the survivor's error is what the test checks
        out.put((rank, type(exc).__name__, f"{exc}\n{traceback.format_exc()}", time.monotonic() - start))
    out.close()
    out.join_thread()  # the queue's feeder thread must deliver before we leave
    os._exit(0)  # no teardown: the peer may be dead, destroy_process_group could wait on it


def run_with_failures(fn: Callable, world: int, *args: Any, pg_timeout: float = TIMEOUT_S,
                      deadline_s: float = 90.0, survivors: tuple[int, ...] = (0,)) -> dict[int, tuple[str, Any, float]]:
    """Run ``fn(rank, *args)`` on ``world`` processes; return rank → (outcome, value or message, seconds).

    Returns once every rank of ``survivors`` reported (the faulty rank may be dead or stuck:
    it is killed then). A survivor that has not reported by the deadline fails the test:
    a hang is exactly what must not happen.
    """
    ctx = context()
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, dict(os.environ), pg_timeout, fn, args, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any, float]] = {}
    end = time.monotonic() + deadline_s
    try:
        while not set(survivors) <= set(results):
            try:
                rank, outcome, value, seconds = out.get(timeout=0.2)
                results[rank] = (outcome, value, seconds)
            except queue_mod.Empty:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"ranks still running after {deadline_s} s (a hang): {results}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    return results


def _save_with_a_faulty_rank(rank: int, root: str, fault: str) -> None:
    from resumable.storage import local as storage_local
    from resumable.save import save

    save({"model": {"w": torch.ones(4)}, "global_step": 1}, root, 1)  # a good checkpoint first
    if rank == 1 and fault == "exit":
        storage_local.after_block_hook = lambda path, n: os._exit(3)   # dies mid-file, no goodbye
    elif rank == 1 and fault == "hang":
        storage_local.after_block_hook = lambda path, n: time.sleep(600)  # stuck in I/O
    save({"model": {"w": torch.zeros(4)}, "global_step": 2}, root, 2)


# "hang" is the same code path as exit after the timeout; it stays runnable (-k hang) but make
# test keeps to "exit": the hung-rank bound is covered by the async and the training-job tests.
@pytest.mark.parametrize("fault", ["exit", pytest.param("hang", marks=pytest.mark.skipif(
    os.environ.get("RESUMABLE_SLOW_TESTS") != "1", reason="set RESUMABLE_SLOW_TESTS=1: covered faster below"))])
def test_a_rank_dying_or_hanging_in_a_sync_save_fails_the_others_in_bounded_time(tmp_path: Path, fault: str) -> None:
    results = run_with_failures(_save_with_a_faulty_rank, 2, str(tmp_path), fault)
    outcome, message, seconds = results[0]
    assert outcome == "SaveError", message
    assert message.startswith(f"saving {tmp_path / 'iteration_00000002'}: a collective with the other ranks failed, "
                              "nothing was committed; a rank died or does not answer (see its log): ")
    assert seconds < TIMEOUT_S + 30  # bounded: connection loss at once, a hang after the timeout
    assert commit.read_tracker(tmp_path) == 1
    assert commit.committed_iterations(tmp_path) == [1]
    assert not (tmp_path / ".tmp-iteration_00000002").exists()  # rank 0 removed the temp folder


def _async_save_with_a_hanging_rank(rank: int, root: str) -> str:
    from resumable import CheckpointManager
    from resumable.storage import local as storage_local

    mgr = CheckpointManager(root, async_save=True, collective_timeout=TIMEOUT_S)
    mgr.save({"model": {"w": torch.ones(4)}}, 1)
    mgr.wait()
    if rank == 1:
        storage_local.after_block_hook = lambda path, n: time.sleep(600)
    mgr.save({"model": {"w": torch.zeros(4)}}, 2)  # returns at once: the hang is in the background
    mgr.wait()
    return "no error"


def test_an_async_save_whose_peer_hangs_fails_after_the_savers_own_timeout(tmp_path: Path) -> None:
    # The process group's timeout is long: only the async saver's collective_timeout can end the wait.
    results = run_with_failures(_async_save_with_a_hanging_rank, 2, str(tmp_path), pg_timeout=300.0)
    outcome, message, seconds = results[0]
    assert outcome == "SaveError", message
    assert message.startswith(f"saving {tmp_path / 'iteration_00000002'}: a collective with the other ranks failed, "
                              "nothing was committed; a rank died or does not answer (see its log): ")
    assert seconds < TIMEOUT_S + 30
    assert commit.read_tracker(tmp_path) == 1 and commit.committed_iterations(tmp_path) == [1]


def _load_with_a_faulty_rank(rank: int, root: str, fault: str) -> str:
    from resumable.load import load
    from resumable.save import save

    save({"model": {"w": torch.arange(4.0)}}, root, 1)
    state = {"model": {"w": torch.zeros(4 if rank == 0 or fault != "raise" else 5)}}
    if rank == 1 and fault == "exit":
        os._exit(3)
    load(state, root)
    return "loaded"


@pytest.mark.parametrize("fault", ["exit", "raise"])
def test_a_rank_dying_or_raising_in_a_load_fails_the_others_in_bounded_time(tmp_path: Path, fault: str) -> None:
    results = run_with_failures(_load_with_a_faulty_rank, 2, str(tmp_path), fault)
    outcome, message, seconds = results[0]
    if fault == "raise":  # the failure is agreed: rank 0 learns rank 1's reason, nothing is filled
        assert outcome == "StateMismatchError", message
        assert message.startswith(f"rank 1 failed: the state does not match checkpoint {tmp_path / 'iteration_00000001'}"
                                  ":\nw: shape [5] in the state, [4] in the checkpoint")
    else:  # the peer is gone: the agreement's collective fails instead of waiting forever
        assert outcome in ("RuntimeError", "DistBackendError"), message
    assert seconds < TIMEOUT_S + 30


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with ``RANK=rank`` under a torchrun launcher."""
    from resumable.proctree import descendants

    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def test_a_hung_rank_stops_a_training_job_after_resumable_collective_timeout(tmp_path: Path) -> None:
    import signal
    import subprocess

    from resumable.proctree import kill_tree
    from tools.soak import Job, committed_step

    job = Job("hang", nproc=2, stop_step=100_000, interval=1)
    env = {**{k: v for k, v in os.environ.items() if k != commit.FAULT_ENV}, "RESUMABLE_COLLECTIVE_TIMEOUT": "5"}
    output = tmp_path / "job.log"
    with open(output, "w") as sink:
        proc = subprocess.Popen(job.command(tmp_path), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    try:
        log = tmp_path / "log" / "train.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and log.stat().st_size):
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.05)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # rank 1 hangs: alive, connections open, never answers
        stopped = time.monotonic()
        # Rank 0 must give up on its own; torchrun's teardown of the stopped rank is not ours to time.
        while "Timed out waiting 5000ms" not in output.read_text():
            assert time.monotonic() - stopped < 60, f"rank 0 still waits:\n{output.read_text()[-3000:]}"
            time.sleep(0.1)
        waited = time.monotonic() - stopped
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert waited < 35  # about 5 s of timeout, not the 30 minutes of the default
    committed_step(job, tmp_path)  # what was committed before the hang is whole
