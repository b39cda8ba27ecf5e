"""CheckpointManager: retention (sync and async), async staging semantics, background errors, options."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from resumable import CheckpointManager, commit
from resumable.errors import SaveError
from tests.distributed.test_save_layouts import file_names, reassemble
from tests.launch import run_distributed


def _tracker_ok(directory: Path) -> bool:
    target = commit.read_tracker(directory)
    return target is not None and commit.is_committed(directory / commit.iteration_dirname(target))


def _retention_and_async(rank: int, world: int, root: str) -> dict:
    from resumable.storage import local as storage_local

    out: dict = {}
    for mode in ("sync", "async"):
        for keep in (1, 3):
            directory = Path(root) / f"{mode}-{keep}"
            mgr = CheckpointManager(directory, keep_checkpoint_max=keep, async_save=mode == "async",
                                    save_checkpoint_steps=2)
            tracker_always_ok = True
            for step in range(1, 11):
                if mgr.should_save(step, last_step=9):
                    mgr.save({"model": {"w": torch.full((3,), float(step))}, "global_step": step}, step)
                    if rank == 0 and commit.read_tracker(directory) is not None:
                        tracker_always_ok &= _tracker_ok(directory)
            mgr.close()
            out[(mode, keep)] = (commit.committed_iterations(directory), commit.read_tracker(directory),
                                 tracker_always_ok)

    # Async: mutating the state right after save() returns does not change the saved bytes.
    directory = Path(root) / "mutate"
    mgr = CheckpointManager(directory, keep_checkpoint_max=None, async_save=True,
                            events_path=Path(root) / "events.jsonl")  # every rank passes it, rank 0 writes
    w = torch.arange(6.0)
    mgr.save({"model": {"w": w}}, 1)
    w.add_(100.0)
    mgr.save({"model": {"w": w}}, 2)  # reuses the staging buffers of save 1
    w.zero_()
    mgr.wait()

    # Async: a background writer failure on rank 1 surfaces at the next save, on every rank.
    def fail(path: Path, written: int) -> None:
        if "iteration_00000003" in str(path):  # only save 3: the hook stays set while it runs
            raise OSError(5, "Input/output error", str(path))

    storage_local.after_block_hook = fail if rank == 1 else None
    mgr.save({"model": {"w": w}}, 3)  # returns: the failure happens in the background
    try:
        mgr.save({"model": {"w": w}}, 4)
        out["error"] = None
    except SaveError as exc:
        out["error"] = str(exc)
    storage_local.after_block_hook = None
    out["after_error"] = mgr.wait()  # nothing in flight any more: the failed save was not retried
    mgr.close()
    torch.distributed.barrier()
    return out


def test_retention_async_staging_and_background_errors_on_two_processes(tmp_path: Path):
    out = run_distributed(_retention_and_async, 2, str(tmp_path))
    res = out[0]
    # Saves at 2, 4, 6, 8 (every 2 steps) and 9 (the last step); 10 is after last_step but divisible.
    for mode in ("sync", "async"):
        assert res[(mode, 1)] == ([10], 10, True)
        assert res[(mode, 3)] == ([8, 9, 10], 10, True)
    mutate = tmp_path / "mutate"
    assert torch.equal(reassemble(mutate / "iteration_00000001")["w"], torch.arange(6.0))
    assert torch.equal(reassemble(mutate / "iteration_00000002")["w"], torch.arange(6.0) + 100)
    failed_file = mutate / ".tmp-iteration_00000003" / "CKP-model-0000001-0000002.safetensors"
    assert res["error"] == (f"saving {mutate / 'iteration_00000003'} failed on 1 rank(s), nothing was committed: "
                            f"rank 1: {failed_file}: input/output error: the disk or network file system failed: "
                            "check the device (dmesg) and run again")
    assert out[1]["error"] == res["error"]
    assert res["after_error"] is None
    assert commit.committed_iterations(mutate) == [1, 2] and commit.read_tracker(mutate) == 2
    # One event per committed save (the failed one has none), its bytes every rank's files.
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["iteration"], e["mode"], e["ranks"]) for e in events] == [
        ("save", 1, "async", 2), ("save", 2, "async", 2)]
    assert events[0]["bytes"] == sum(f.stat().st_size for f in (mutate / "iteration_00000001").glob("*.safetensors"))


def test_save_optimizer_false_prefix_and_checkpoint_format_ckpt(tmp_path: Path, caplog):
    state = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {"w": {"exp_avg": torch.zeros(2)}}},
             "global_step": 4}
    mgr = CheckpointManager(tmp_path / "custom", prefix="qwen3", save_optimizer=False, checkpoint_format="ckpt")
    assert "checkpoint_format 'ckpt' is not available in Checkpoint 2.0; saving safetensors" in caplog.text
    folder = mgr.save(state, 4)
    assert folder == tmp_path / "custom" / "iteration_00000004"
    assert file_names(folder) == ["qwen3-model-0000000-0000001.safetensors"]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["save_optimizer"] is False and list(meta["tensors"]) == ["w"]
    assert json.loads((folder / "common.json").read_text())["global_step"] == 4
