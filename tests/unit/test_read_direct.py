"""reads.read_direct: preadv straight into the target, identical to the safe_open path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from resumable.formats.safetensors_io import write_file
from resumable.geometry import Box
from resumable import reads as reads_mod
from resumable.errors import CorruptCheckpointError
from resumable.reads import (ReadJob, contiguous_run, contiguous_shares, execute_reads, place_into, plan_small_reads,
                             read_direct)
from resumable.planning import Read


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 6))
def test_contiguous_shares_cover_the_jobs_in_order_and_balance_bytes(sizes: list[int], parts: int) -> None:
    shares = contiguous_shares(sizes, parts)
    assert len(shares) == parts
    assert [i for share in shares for i in share] == list(range(len(sizes)))  # consecutive, in order, once
    # Whole jobs: no share exceeds its fair part by more than one job.
    fair, biggest = sum(sizes) / parts, max(sizes, default=0)
    assert all(sum(sizes[i] for i in share) <= fair + biggest for share in shares)


def test_contiguous_shares_cut_at_the_nearest_job_boundary() -> None:
    assert contiguous_shares([1, 1, 10], 2) == [range(0, 2), range(2, 3)]
    assert contiguous_shares([2] * 10, 4) == [range(0, 3), range(3, 5), range(5, 8), range(8, 10)]


@pytest.mark.parametrize("src, shape, expected", [
    ((slice(2, 4), slice(0, 8)), (10, 8), (16, 16)),          # whole rows
    ((slice(3, 4), slice(2, 5)), (10, 8), (26, 3)),           # part of one row
    ((slice(0, 10), slice(0, 4)), (10, 8), None),             # a column block: strided
    ((slice(1, 2), slice(0, 2), slice(0, 3)), (4, 5, 3), (15, 6)),
    ((), (), (0, 1)),                                          # 0-d
])
def test_contiguous_run_finds_single_byte_runs_only(src, shape, expected) -> None:
    assert contiguous_run(src, shape) == expected


@pytest.mark.parametrize("small_read, piece", [(1 << 20, 8 << 20), (64, 96)], ids=["all-small", "streamed-in-pieces"])
def test_read_direct_fills_rows_columns_and_strided_targets_like_safe_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_read: int, piece: int) -> None:
    # With tiny thresholds the same reads take the streamed path, several pieces per read.
    monkeypatch.setattr(reads_mod, "SMALL_READ", small_read)
    monkeypatch.setattr(reads_mod, "READ_PIECE", piece)
    stored = torch.arange(80, dtype=torch.float32).reshape(10, 8)
    scalar = torch.tensor(7, dtype=torch.int64)
    write_file(tmp_path / "f.safetensors", [("w", stored), ("s", scalar)])
    box = Box((0, 0), (10, 8))
    reads = [
        Read("rows", "f.safetensors", "w", box, Box((2, 0), (3, 8)), (slice(2, 5), slice(0, 8)),
             (slice(0, 3), slice(0, 8))),
        Read("cols", "f.safetensors", "w", box, Box((0, 1), (10, 3)), (slice(0, 10), slice(1, 4)),
             (slice(0, 10), slice(0, 3))),
        Read("into_view", "f.safetensors", "w", box, Box((4, 0), (2, 8)), (slice(4, 6), slice(0, 8)),
             (slice(0, 2), slice(1, 9))),
        Read("s", "f.safetensors", "s", Box((), ()), Box((), ()), (), ()),
    ]

    def targets() -> dict[str, torch.Tensor]:
        return {"rows": torch.zeros(3, 8), "cols": torch.zeros(10, 3), "into_view": torch.zeros(2, 10),
                "s": torch.zeros((), dtype=torch.int64)}

    direct, reference = targets(), targets()
    n = read_direct(tmp_path, reads, direct)
    assert n == execute_reads(tmp_path, reads, place_into(reference))
    for name in direct:
        assert torch.equal(direct[name], reference[name]), name
    assert torch.equal(direct["rows"], stored[2:5])
    assert torch.equal(direct["into_view"][:, 1:9], stored[4:6])


def test_read_direct_refuses_a_truncated_file_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    write_file(path, [("w", torch.ones(10, 8))])
    os.truncate(path, path.stat().st_size - 40)
    read = Read("w", "f.safetensors", "w", Box((0, 0), (10, 8)), Box((0, 0), (10, 8)),
                (slice(0, 10), slice(0, 8)), (slice(0, 10), slice(0, 8)))
    target = torch.zeros(10, 8)
    with pytest.raises(CorruptCheckpointError, match=f"{path}: .* the file is truncated"):
        read_direct(tmp_path, [read], {"w": target})
    assert not target.any()  # refused before any byte was placed


def _job(file: int, offset: int, nbytes: int) -> ReadJob:
    return ReadJob(file, offset, nbytes, memoryview(bytearray(nbytes)))


def _spans(jobs: list[ReadJob]) -> list[tuple[int, int, int]]:
    return [(j.file, j.offset, j.nbytes) for j in jobs]


def test_small_reads_touching_a_stream_stay_in_it_and_lone_neighbours_are_read_together() -> None:
    big = _job(0, 0, 1000)
    after_big = _job(0, 1000, 4)                       # the step counter after a moment tensor
    norm = [_job(1, 500, 40), _job(1, 540, 40), _job(1, 580, 4)]  # exp_avg, exp_avg_sq, step
    lone = _job(1, 90_000, 8)                          # far from anything
    streamed, groups = plan_small_reads([lone, *norm, after_big, big], small=100, gap=16)
    assert _spans(streamed) == _spans([big, after_big])
    assert [_spans(g) for g in groups] == [_spans(norm), _spans([lone])]


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 50), st.integers(1, 30)), max_size=25),
       st.integers(1, 40), st.integers(0, 10))
def test_plan_small_reads_places_every_job_once_in_file_order(raw, small: int, gap: int) -> None:
    jobs, ends = [], {}
    for file, skip, nbytes in raw:  # non-overlapping jobs per file, as a rank's reads are
        start = ends.get(file, 0) + skip
        jobs.append(_job(file, start, nbytes))
        ends[file] = start + nbytes
    streamed, groups = plan_small_reads(jobs, small=small, gap=gap)
    placed = _spans(streamed) + [s for g in groups for s in _spans(g)]
    assert sorted(placed) == sorted(_spans(jobs))
    assert _spans(streamed) == sorted(_spans(streamed))
    for g in groups:
        assert len({j.file for j in g}) == 1 and all(j.nbytes < small for j in g)
        assert _spans(g) == sorted(_spans(g)) and g[-1].offset + g[-1].nbytes - g[0].offset <= small


def test_read_direct_places_grouped_small_reads_like_safe_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Six 40-byte tensors side by side, 100-byte groups: three reads of two tensors each.
    monkeypatch.setattr(reads_mod, "SMALL_READ", 100)
    tensors = [(f"t{i}", torch.arange(10, dtype=torch.float32) + 10 * i) for i in range(6)]
    write_file(tmp_path / "g.safetensors", tensors)
    box = Box((0,), (10,))
    reads = [Read(name, "g.safetensors", name, box, box, (slice(0, 10),), (slice(0, 10),)) for name, _ in tensors]
    # t5 lands in a strided view: the group's bytes are copied through a tensor, not a memoryview.
    direct = {name: torch.zeros(10) for name, _ in tensors[:5]} | {"t5": torch.zeros(10, 2)[:, 1]}
    assert read_direct(tmp_path, reads, direct) == 240
    for name, t in tensors:
        assert torch.equal(direct[name], t), name
