"""Two jobs pointed at one checkpoint folder: the second refuses with LockedError; a crashed holder never blocks.

The lock is ``flock`` on ``<directory>/.lock`` (``resumable.lock``), taken by rank 0 when
the ``CheckpointManager`` (or the legacy monitor) is built and before anything in the
folder is read or cleaned. The kernel drops it when its holder dies, SIGKILL included.
The tool and training-job cases run side by side, two at a time (``jobs.start_bodies``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from resumable import CheckpointManager, commit
from resumable.errors import LockedError
from resumable.lock import LOCK_FILE
from resumable.proctree import kill_tree
from resumable.save import save as resumable_save
from tests.e2e.jobs import start_bodies
from tests.launch import context
from tools.soak import Job, committed_step


def _holder(directory: Path) -> str:
    doc = json.loads((directory / LOCK_FILE).read_text())
    return f"host {doc['host']}, pid {doc['pid']}, since {doc['since']}"


def _locked_message(directory: Path) -> str:
    return (f"{directory} is in use by another job ({_holder(directory)}); two jobs must not save into one "
            f"checkpoint folder: stop the other job, or give this one another output_dir / callbacks.0.directory. "
            f"The lock is {directory / LOCK_FILE}; it is released when its holder exits, even by a crash, so never "
            "delete it by hand")


def test_a_second_manager_on_a_held_folder_refuses_until_the_first_closes(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, keep_checkpoint_max=2)
    first.save({"model": {"w": torch.ones(3)}}, 1)
    # A save in progress of the first job: the second must not clean it away.
    (tmp_path / ".tmp-iteration_00000002").mkdir()
    with pytest.raises(LockedError) as info:
        CheckpointManager(tmp_path, keep_checkpoint_max=2)
    assert str(info.value) == _locked_message(tmp_path)
    assert f"pid {os.getpid()}" in str(info.value)
    assert (tmp_path / ".tmp-iteration_00000002").is_dir()
    first.close()
    second = CheckpointManager(tmp_path, keep_checkpoint_max=2)  # released: the next job takes it, and cleans
    assert not (tmp_path / ".tmp-iteration_00000002").exists()
    second.close()


def _hold_then_wait(directory: str, ready: "mp.synchronize.Event") -> None:
    manager = CheckpointManager(directory)  # kept referenced: a collected manager releases its lock
    ready.set()
    time.sleep(600)
    manager.close()


def test_a_killed_holder_never_leaves_the_folder_locked(tmp_path: Path) -> None:
    ctx = context()  # forked from the server that imported torch: no 2 s interpreter start
    ready = ctx.Event()
    child = ctx.Process(target=_hold_then_wait, args=(str(tmp_path), ready))
    child.start()
    try:
        assert ready.wait(timeout=120), "the holder never took the lock"
        with pytest.raises(LockedError) as info:
            CheckpointManager(tmp_path)
        assert f"pid {child.pid}" in str(info.value)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    CheckpointManager(tmp_path).close()  # no stale lock: the kernel released it with the process


def _a_tool_writing_into_a_live_jobs_folder_refuses_naming_the_holder(tmp_path: Path, argv: list[str]) -> None:
    held = tmp_path / "ckpt"
    CheckpointManager(held).save({"model": {"w": torch.ones(3)}}, 1)
    resumable_save({"model": {"w": torch.zeros(3)}, "global_step": 5}, tmp_path / "src", 5)
    before = sorted(p.name for p in held.iterdir())
    ctx = context()  # forked from the server that imported torch: no 2 s interpreter start
    ready = ctx.Event()
    child = ctx.Process(target=_hold_then_wait, args=(str(held), ready))  # a live job, in another process
    child.start()
    try:
        assert ready.wait(timeout=120), "the holder never took the lock"
        cmd, *options = argv
        done = subprocess.run([sys.executable, "-m", "resumable.cli", cmd, str(tmp_path / "src"), str(held), *options,
                               "--quiet"], capture_output=True, text=True, timeout=300)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"resumable {cmd}: error: {_locked_message(held)}\n"
    assert f"pid {child.pid}" in done.stderr
    assert sorted(p.name for p in held.iterdir()) == before  # no iteration, no rank_0/, tracker untouched
    assert commit.read_tracker(held) == 1


def _a_second_training_job_on_a_live_jobs_folder_stops_with_locked_error(tmp_path: Path, job: Job) -> None:
    env = {k: v for k, v in os.environ.items() if k != commit.FAULT_ENV}
    first = subprocess.Popen(job.command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "log" / "train.jsonl").exists() or not (tmp_path / "log" / "train.jsonl").stat().st_size:
            assert first.poll() is None and time.monotonic() < deadline, "the first job did not start training"
            time.sleep(0.05)
        # The same command again: same output_dir, so the same checkpoint folder.
        second = subprocess.run(job.command(tmp_path), capture_output=True, text=True, timeout=300, env=env)
        assert first.poll() is None, "the second job disturbed the first"
    finally:
        kill_tree(first.pid)
        first.wait()
    assert second.returncode != 0
    assert _locked_message(tmp_path / "checkpoint") in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert "resumed from" not in second.stderr and "loading" not in second.stderr  # refused before reading
    committed_step(job, tmp_path)  # the first job's checkpoints are intact


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    yield from start_bodies(request, tmp_path_factory)


@pytest.mark.parametrize("argv", [["split", "--layout", "dp=2"], ["convert", "--to", "v2"],
                                  ["convert", "--to", "legacy"]], ids=" ".join)
def test_a_tool_writing_into_a_live_jobs_folder_refuses_naming_the_holder(started, request, argv: list[str]) -> None:
    started[request.node.name].result()


@pytest.mark.slow
@pytest.mark.parametrize("job", [Job("v2-two-writers", stop_step=100_000, interval=1),
                                 Job("legacy-two-writers", legacy=True, stop_step=100_000, interval=1)],
                         ids=lambda j: j.name)
def test_a_second_training_job_on_a_live_jobs_folder_stops_with_locked_error(started, request, job: Job) -> None:
    started[request.node.name].result()
