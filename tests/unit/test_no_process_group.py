"""The library in a process that torchrun started, before ``init_process_group``: one clear error at
each entry point, before anything touches the checkpoint folder (each rank would otherwise act as
rank 0 of a world of one, and the second would meet the first's lock)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

import resumable
from resumable.errors import ConfigError

STATE = {"model": {"w": torch.zeros(2)}}
CALLS: dict[str, Callable[[Path], object]] = {
    "CheckpointManager": lambda d: resumable.CheckpointManager(d),
    "resumable.save": lambda d: resumable.save(STATE, d, 1),
    "resumable.async_save": lambda d: resumable.async_save(STATE, d, 1),
    "resumable.load": lambda d: resumable.load({"model": {"w": torch.zeros(2)}}, d),
    "resumable.load_async": lambda d: resumable.load_async(STATE, d),
}


@pytest.mark.parametrize("entry", sorted(CALLS))
def test_a_rank_of_a_torchrun_job_without_a_process_group_is_told_to_create_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)  # what torchrun sets in its second process
    folder = tmp_path / "ckpt"
    with pytest.raises(ConfigError) as caught:
        CALLS[entry](folder)
    assert str(caught.value) == (
        f"{entry}: this process is one rank of a multi-process job (RANK=1, WORLD_SIZE=2, LOCAL_RANK=1 in the "
        "environment, as torchrun sets them) but torch.distributed has no process group: call "
        'torch.distributed.init_process_group() in every process first (backend "gloo" on CPU, "nccl" on GPUs), '
        "so that the ranks save and load one checkpoint together")
    assert not folder.exists()


def test_a_one_process_torchrun_needs_no_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert resumable.save(STATE, tmp_path, 1) == tmp_path / "iteration_00000001"
