"""Failures during a save: every rank learns them, nothing is committed, a killed writer leaves
the previous checkpoint intact and its leftover is cleaned at the next start."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from resumable import CheckpointManager, commit
from resumable.errors import SaveError
from tests.distributed.test_save_layouts import reassemble
from tests.launch import context, run_distributed


def _failing_rank_one(rank: int, world: int, root: str) -> list[str]:
    from resumable.storage import local as storage_local
    from resumable.save import save

    root_path = Path(root)
    messages = []
    # 1. rank 1's state holds a value a checkpoint cannot store.
    bad = {"model": {"w": torch.ones(2)}, "extra": object() if rank == 1 else 1}
    try:
        save(bad, root_path, 1)
    except SaveError as exc:
        messages.append(str(exc))

    # 2. rank 1's writer fails half-way through its file (the disk "fills up").
    def disk_full(path: Path, written: int) -> None:
        raise OSError(28, "No space left on device", str(path))

    storage_local.after_block_hook = disk_full if rank == 1 else None
    try:
        save({"model": {"w": torch.ones(2)}}, root_path, 2)
    except SaveError as exc:
        messages.append(str(exc))
    storage_local.after_block_hook = None

    # 3. the group is still usable: the next save commits.
    save({"model": {"w": torch.ones(2)}}, root_path, 3)
    torch.distributed.barrier()
    return messages


def test_a_failing_rank_makes_every_rank_raise_and_commits_nothing(tmp_path: Path):
    results = run_distributed(_failing_rank_one, 2, str(tmp_path))
    assert results[0] == results[1]  # every rank learns the same thing
    plan_msg, write_msg = results[0]
    assert plan_msg == ("saving iteration 1 failed on 1 rank(s), nothing was committed: rank 1: TypeError: state "
                        "value at 'extra' has type object; checkpoints store tensors and JSON-able values (None, "
                        "bool, int, float, str, lists, dicts) only")
    temp_file = tmp_path / ".tmp-iteration_00000002" / "CKP-model-0000001-0000002.safetensors"
    assert write_msg == (f"saving {tmp_path / 'iteration_00000002'} failed on 1 rank(s), nothing was committed: "
                         f"rank 1: {temp_file}: no space left on the device: free space on that file system (or write to another one) and run again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration_00000003", commit.TRACKER]
    assert commit.read_tracker(tmp_path) == 3


def _save_then_stall(directory: str, stalled: "mp.synchronize.Event") -> None:
    """Child process: commit iteration 1, then stop inside the write of iteration 2's file."""
    from resumable.storage import local as storage_local

    mgr = CheckpointManager(directory, keep_checkpoint_max=1)
    mgr.save({"model": {"w": torch.arange(4.0)}, "global_step": 1}, 1)

    def stall(path: Path, written: int) -> None:
        stalled.set()       # part of the file is on disk; the parent kills us now
        time.sleep(600)

    storage_local.after_block_hook = stall
    mgr.save({"model": {"w": torch.zeros(4)}, "global_step": 2}, 2)


def test_a_writer_killed_mid_file_leaves_the_previous_checkpoint_and_its_leftover_is_cleaned(tmp_path: Path):
    ctx = context()  # forked from the server that imported torch: no 2 s interpreter start
    stalled = ctx.Event()
    child = ctx.Process(target=_save_then_stall, args=(str(tmp_path), stalled))
    child.start()
    try:
        assert stalled.wait(timeout=120), "the writer never reached the stall point"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    leftover = tmp_path / ".tmp-iteration_00000002"
    assert (leftover / "CKP-model-0000000-0000001.safetensors").exists()  # a real half-written file
    assert commit.read_tracker(tmp_path) == 1 and commit.committed_iterations(tmp_path) == [1]
    assert torch.equal(reassemble(tmp_path / "iteration_00000001")["w"], torch.arange(4.0))

    CheckpointManager(tmp_path, keep_checkpoint_max=1)  # the next start cleans up
    # .lock is the folder's job lock (resumable.lock): it stays, unlocked, by design.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "iteration_00000001", commit.TRACKER]


@pytest.mark.parametrize("keep", [0, -1])
def test_manager_refuses_keep_checkpoint_max_below_one(tmp_path: Path, keep: int):
    from resumable.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        CheckpointManager(tmp_path, keep_checkpoint_max=keep)
    assert str(e.value) == ("keep_checkpoint_max must be at least 1 (the newest checkpoint is always kept), "
                            f"got {keep}")
