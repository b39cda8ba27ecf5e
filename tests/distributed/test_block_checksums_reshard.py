"""A reshard reads parts of stored blocks; a flipped byte in a block a rank reads only in part is still caught.

Saved by one process as one (1000, 700) float32 chunk (2.8 MB: 1 MiB blocks 0-2), loaded
on 2 real gloo ranks as Shard(0): rank 0 reads rows 0-499 (bytes 0-1.4 MB), rank 1 rows
500-999, so block 1 is cut between them. The flipped byte lies in rank 1's rows of
block 1: rank 1 reads it, rank 0 completes the block from the file, both refuse, with a
plain load and with ``balanced=True`` (each unit checked by its reader before any send).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import resumable
from resumable.formats.safetensors_io import CHECK_BLOCK, read_header
from tests.launch import run_distributed

ROWS, COLS = 1000, 700
MODEL = "CKP-model-0000000-0000001.safetensors"


def _full() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))


def _load(rank: int, world: int, folder: str, balanced: bool) -> str:
    mesh = init_device_mesh("cpu", (world,))
    target = {"model": {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])}}
    try:
        resumable.load(target, folder, balanced=balanced)
    except resumable.errors.CorruptCheckpointError as exc:
        return str(exc)
    assert torch.equal(target["model"]["w"].full_tensor(), _full())
    return ""


@pytest.mark.parametrize("balanced", [False, True], ids=["plain", "balanced"])
def test_a_flip_in_a_block_cut_between_two_ranks_fails_both(tmp_path: Path, balanced: bool) -> None:
    folder = resumable.save({"model": {"w": _full()}}, tmp_path / "ckpt", 1)
    assert run_distributed(_load, 2, str(folder), balanced) == ["", ""]  # intact: loads bit for bit
    entry = read_header(folder / MODEL).tensors["w"]
    at = entry.start + 500 * COLS * 4 + 1000  # rank 1's rows, inside block 1 (which starts in rank 0's)
    assert entry.start + CHECK_BLOCK < at < entry.start + 2 * CHECK_BLOCK
    data = bytearray((folder / MODEL).read_bytes())
    data[at] ^= 0x08
    (folder / MODEL).write_bytes(bytes(data))
    b0 = entry.start + CHECK_BLOCK
    expected = f"{folder / MODEL}: tensor 'w', bytes {b0}-{b0 + CHECK_BLOCK}: xxh3-64 "
    errors = run_distributed(_load, 2, str(folder), balanced)
    assert all(expected in e for e in errors), errors
