"""dim_runs (arithmetic on runs) against torch's own splitting of an index vector."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

from resumable.geometry import runs
from resumable.layout import _shard_dim, dim_indices, dim_runs, placement_chunks


def torch_dim_indices(size, dim, ndim, placements, mesh_shape, coordinate):
    """The reference: split ``arange(size)`` with each placement's own ``_split_tensor``,
    mesh dims left to right (what layout.dim_indices did before dim_runs)."""
    idx = torch.arange(size)
    for mesh_dim, p in enumerate(placements):
        if _shard_dim(p, ndim) != dim:
            continue
        local_p = type(p)(0, split_factor=p.split_factor) if hasattr(p, "split_factor") else Shard(0)
        pieces, _ = local_p._split_tensor(idx, mesh_shape[mesh_dim], with_padding=False)
        c = coordinate[mesh_dim]
        idx = pieces[c] if c < len(pieces) else idx[:0]
    return idx.tolist()


def torch_dim_runs(*args):
    out, local = [], 0
    for start, length in runs(torch_dim_indices(*args)):
        out.append((start, length, local))
        local += length
    return out


def _check_every_coordinate(size, dim, ndim, placements, mesh):
    for coord in itertools.product(*map(range, mesh)):
        got = dim_runs(size, dim, ndim, placements, mesh, coord)
        assert got == torch_dim_runs(size, dim, ndim, placements, mesh, coord), (size, placements, mesh, coord)
        assert dim_indices(size, dim, ndim, placements, mesh, coord) == torch_dim_indices(
            size, dim, ndim, placements, mesh, coord)


@st.composite
def placement_lists(draw, ndim):
    n = draw(st.integers(1, 3))
    mesh = tuple(draw(st.lists(st.integers(1, 8), min_size=n, max_size=n)))
    placements = []
    for _ in mesh:
        kind = draw(st.sampled_from(["r", "s", "ss"]))
        d = draw(st.integers(0, ndim - 1))
        if kind == "r":
            placements.append(Replicate())
        elif kind == "s":
            placements.append(Shard(d))
        else:
            placements.append(_StridedShard(d, split_factor=draw(st.integers(1, 8))))
    return mesh, placements


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_dim_runs_match_torch_for_random_placements(data):
    ndim = data.draw(st.integers(1, 3))
    size = data.draw(st.integers(0, 200))
    dim = data.draw(st.integers(0, ndim - 1))
    mesh, placements = data.draw(placement_lists(ndim))
    _check_every_coordinate(size, dim, ndim, placements, mesh)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 200), a=st.integers(1, 8), b=st.integers(1, 8),
       layout=st.sampled_from(["fsdp_tp", "hsdp", "shard_shard", "tp_fsdp_wrong_factor"]))
def test_dim_runs_match_torch_for_the_layouts_dtensor_uses(size, a, b, layout):
    mesh = (a, b)
    placements = {
        "fsdp_tp": [_StridedShard(0, split_factor=b), Shard(0)],  # FSDP over TP: mesh (dp, tp)
        "hsdp": [Replicate(), Shard(0)],
        "shard_shard": [Shard(0), Shard(0)],
        "tp_fsdp_wrong_factor": [_StridedShard(0, split_factor=a), Shard(0)],
    }[layout]
    _check_every_coordinate(size, 0, 2, placements, mesh)
    _check_every_coordinate(size, 1, 2, placements, mesh)  # dim 1 is not sharded: one run


def test_dim_runs_do_not_enumerate_elements():
    assert dim_runs(8192 * 4096, 0, 2, [Shard(0)], [8192], [5]) == [(5 * 4096, 4096, 0)]
    n = 10**12
    assert dim_runs(n, 0, 1, [Shard(0)], [8192], [8191]) == [(8191 * 122070313, n - 8191 * 122070313, 0)]
    # FSDP over TP gives each rank one block; a strided shard alone gives one run per factor.
    fsdp_tp = [_StridedShard(0, split_factor=4), Shard(0)]
    assert dim_runs(n, 0, 1, fsdp_tp, [8, 4], [3, 1]) == [(n // 32 * 11, n // 32, 0)]
    assert torch_dim_runs(320, 0, 1, fsdp_tp, [8, 4], [3, 1]) == [(10 * 11, 10, 0)]
    held = dim_runs(n, 0, 1, [_StridedShard(0, split_factor=4)], [8], [3])
    assert [(s, l) for s, l, _ in held] == [(j * n // 4 + 3 * n // 32, n // 32) for j in range(4)]
    [chunk] = placement_chunks((n, 4096), [Shard(0)], (8192,), (0,))
    assert chunk.box.shape == (122070313, 4096)


def test_coordinates_past_an_uneven_split_hold_nothing():
    assert dim_runs(3, 0, 1, [Shard(0)], [4], [3]) == [] == torch_dim_runs(3, 0, 1, [Shard(0)], [4], [3])
    assert placement_chunks((3, 2), [Shard(0)], (4,), (3,)) == []
