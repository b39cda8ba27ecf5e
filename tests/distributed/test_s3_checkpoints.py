"""Checkpoints on a real S3 server (moto on 127.0.0.1, real boto3): the same guarantees as on a local disk.

Round trips with reshard between 1 and 2 real gloo processes, retention, damage detected and
fallen back from, one job per prefix (the lease), a store that fails or stops mid-save
(``SaveError``, nothing committed, leftovers cleaned at the next start) and the tracker's
conditional write. The server and the fault proxy come from ``tests/s3server.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import resumable
from resumable import CheckpointManager, commit, storage
from resumable.errors import CorruptCheckpointError, LockedError, SaveError
from resumable.lock import LeaseLock
from resumable.resolve import resolve_directory
from tests.launch import run_distributed

ROWS, COLS = 96, 40


def _full(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))


def _state(seed: int = 0) -> dict:
    return {"model": {"w": _full(seed), "b": torch.arange(7.0) + seed}, "step": seed}


def _save_sharded(rank: int, world: int, url: str, dim: int) -> str:
    mesh = init_device_mesh("cpu", (world,))
    state = {"model": {"w": distribute_tensor(_full(), mesh, [Shard(dim)]), "b": torch.arange(7.0)}, "step": 3}
    return str(resumable.save(state, url, 3))


def _load_sharded(rank: int, world: int, url: str, dim: int) -> bool:
    mesh = init_device_mesh("cpu", (world,))
    target = {"model": {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(dim)]), "b": torch.zeros(7)},
              "step": 0}
    resumable.load(target, url)
    return torch.equal(target["model"]["w"].full_tensor(), _full()) and target["step"] == 3


@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "columns"])
def test_two_ranks_save_to_s3_one_loads_and_back(s3, dim: int) -> None:
    url = s3.url("run", "ckpt")
    assert run_distributed(_save_sharded, 2, url, dim) == [url + "/iteration_00000003"] * 2
    keys = s3.keys("run/ckpt/")
    assert "run/ckpt/latest_checkpointed_iteration.txt" in keys
    assert sum(k.endswith(".safetensors") for k in keys) == 4  # 2 ranks x (model, opt)
    assert not any(".tmp-" in k for k in keys)  # no rename on an object store: no temp names
    target = {"model": {"w": torch.zeros(ROWS, COLS), "b": torch.zeros(7)}, "step": 0}
    resumable.load(target, url)
    assert torch.equal(target["model"]["w"], _full()) and torch.equal(target["model"]["b"], torch.arange(7.0))
    # One process saves; two ranks load it sharded (a column split reads strided slices).
    one = s3.url("one")
    resumable.save({"model": {"w": _full(), "b": torch.arange(7.0)}, "step": 3}, one, 3)
    assert run_distributed(_load_sharded, 2, one, dim) == [True, True]


def test_the_manager_keeps_the_newest_n_and_resumes_from_the_tracker(s3) -> None:
    url = s3.url("keep")
    with CheckpointManager(url, keep_checkpoint_max=2) as manager:
        for step in (1, 2, 3, 4):
            manager.save(_state(step), step)
    assert sorted({k.split("/")[1] for k in s3.keys("keep/iteration_")}) == ["iteration_00000003",
                                                                             "iteration_00000004"]
    assert s3.get("keep/latest_checkpointed_iteration.txt") == b"4\n"
    assert "keep/.lock" not in s3.keys("keep/")  # released on close
    target = _state(0)
    resumable.load(target, url)
    assert torch.equal(target["model"]["w"], _full(4)) and target["step"] == 4


def test_a_flipped_byte_is_detected_and_a_deleted_object_makes_resume_fall_back(s3) -> None:
    url = s3.url("damage")
    for step in (1, 2):
        resumable.save(_state(step), url, step)
    model = "damage/iteration_00000002/CKP-model-0000000-0000001.safetensors"
    data = bytearray(s3.get(model))
    data[-100] ^= 0x10
    s3.put(model, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"s3://.*iteration_00000002/CKP-model-0000000-0000001"
                                                     r"\.safetensors: tensor 'w', bytes .* xxh3-64"):
        resumable.load(_state(0), url)
    found = resolve_directory(url, fallback=True)
    assert found.iteration == 2  # sizes intact: resolution cannot see a flipped byte, the load does
    s3.delete(model)
    found = resolve_directory(url, fallback=True)
    assert found.iteration == 1 and "iteration_00000002" in found.skipped[0] and "missing" in found.skipped[0]
    target = _state(0)
    resumable.load(target, found.path)
    assert torch.equal(target["model"]["w"], _full(1))


def test_a_second_job_on_one_prefix_is_refused_and_a_dead_holder_never_blocks(s3) -> None:
    url = s3.url("two")
    first = CheckpointManager(url)
    with pytest.raises(LockedError, match=r"is in use by another job \(host .*, pid \d+, since .*\).* expires at"):
        CheckpointManager(url)
    first.close()
    CheckpointManager(url).close()  # released: the next job takes it
    # A lease left by a process of this host that is gone (a crashed job) is taken over at once.
    lease = json.loads(s3.get("two/.lock")) if "two/.lock" in s3.keys("two/") else None
    assert lease is None
    s3.put("two/.lock", json.dumps({"owner": "x", "host": __import__("socket").gethostname(), "pid": 2 ** 22 + 17,
                                    "since": "then", "expires": 4e9}).encode())
    taken = LeaseLock(storage.as_path(url))
    taken.acquire()
    assert json.loads(s3.get("two/.lock"))["owner"] == taken.owner
    taken.release()
    assert "two/.lock" not in s3.keys("two/")


def test_the_tracker_is_advanced_only_if_nobody_else_wrote_it(s3) -> None:
    url = s3.url("cas")
    resumable.save(_state(1), url, 1)
    s3.put("cas/latest_checkpointed_iteration.txt", b" 1\n")  # another writer, after this process read it
    with pytest.raises(SaveError, match=r"latest_checkpointed_iteration.txt was changed by someone else"):
        resumable.save(_state(2), url, 2)
    assert s3.get("cas/latest_checkpointed_iteration.txt") == b" 1\n"


@pytest.mark.parametrize("fault", ["fail", "drop"])
def test_a_store_failing_mid_save_commits_nothing_and_the_next_start_cleans_up(s3_faulty, monkeypatch,
                                                                               fault: str) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("RESUMABLE_S3_PART_MIB", "5")
    url = s3_faulty.url("flaky")
    big = {"model": {"w": torch.randn(3 << 20)}, "step": 1}  # 12 MiB: a multipart upload of 3 parts
    resumable.save(big, url, 1)
    getattr(s3_faulty.proxy, fault)(method="PUT", path_contains="partNumber=2")
    with pytest.raises(SaveError, match=r"saving s3://.*iteration_00000002 failed on 1 rank\(s\), nothing was "
                                        r"committed: rank 0: .*upload_part failed after retries"):
        resumable.save({**big, "step": 2}, url, 2)
    assert s3_faulty.proxy.count(method="PUT", path_contains="partNumber=2") >= 2  # retried, then given up
    assert s3_faulty.get("flaky/latest_checkpointed_iteration.txt") == b"1\n"
    assert not any(k.startswith("flaky/iteration_00000002/metadata.json") for k in s3_faulty.keys())
    s3_faulty.proxy.heal()
    assert resolve_directory(url).iteration == 1
    CheckpointManager(url).close()  # a start: no upload left open, no uncommitted prefix
    assert s3_faulty.multipart_uploads() == []
    assert not any(k.startswith("flaky/iteration_00000002/") for k in s3_faulty.keys())


def test_a_store_stopping_before_metadata_json_leaves_the_tracker_on_a_complete_iteration(s3_faulty,
                                                                                        monkeypatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    url = s3_faulty.url("late")
    resumable.save(_state(1), url, 1)
    s3_faulty.proxy.drop(method="PUT", path_contains="metadata.json")
    with pytest.raises(SaveError, match="nothing was committed"):
        resumable.save(_state(2), url, 2)
    s3_faulty.proxy.heal()
    assert not commit.is_committed(url + "/iteration_00000002")
    assert resolve_directory(url).iteration == 1
