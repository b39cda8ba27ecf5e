"""Saves from 1, 2 and 4 real processes reassemble exactly with the real safetensors library.

Every reference is the gathered full tensor (``DTensor.full_tensor()``), every check is
exact (``torch.equal``): saving copies bytes, so there is no tolerance to justify.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from resumable.formats import v2
from resumable.geometry import Box
from resumable.save import save
from tests.launch import run_distributed


def reassemble(folder: Path) -> dict[str, torch.Tensor]:
    """Rebuild every full tensor from the metadata and the files, reading the bytes with ``safetensors``.

    Every stored copy of a chunk is read and must equal the others.
    """
    meta = v2.read_metadata(folder)
    out = {}
    for name, t in meta.tensors.items():
        full = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
        for box, copies in meta.stored(name):
            where = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.shape))
            values = []
            for stored in copies:
                with safe_open(str(folder / stored.file), "pt") as f:
                    values.append(f.get_tensor(stored.key))
            for c in values[1:]:
                assert torch.equal(c, values[0]), f"copies of {name} at {box.offsets} differ"
            full[where] = values[0]
        out[name] = full
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")


def assert_no_redundancy_and_balanced(folder: Path) -> None:
    """Each chunk stored once; bytes per writer differ by at most the largest chunk; names count writers."""
    meta = v2.read_metadata(folder)
    per_rank = {f.rank: 0 for f in meta.files.values()}
    largest = 0
    for name, t in meta.tensors.items():
        itemsize = torch.empty(0, dtype=getattr(torch, t.dtype)).element_size()
        for box, copies in meta.stored(name):
            assert len(copies) == 1, (name, box)
            nbytes = itemsize * box.numel
            largest = max(largest, nbytes)
            per_rank[meta.files[copies[0].file].rank] += nbytes
    assert max(per_rank.values()) - min(per_rank.values()) <= largest, per_rank
    writers = meta.layout.writers
    assert len(per_rank) == writers  # every rank writes its files, some possibly empty
    for name in meta.files:
        count = int(re.search(r"-(\d{7})\.safetensors$", name).group(1))
        assert count == writers, name


def _full(state: dict) -> bytes:
    """Reference full tensors by stored name, as safetensors bytes (tensors cannot cross the
    launcher's queue after the child exits). Collective for DTensors: every rank calls it."""
    from safetensors.torch import save as to_bytes
    from torch.distributed.tensor import DTensor

    from resumable.state import flatten_state

    return to_bytes({name: (leaf.value.full_tensor() if isinstance(leaf.value, DTensor) else leaf.value)
                     .detach().contiguous().clone() for name, leaf in flatten_state(state).tensors.items()})


def _load(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_single_process_save_of_model_and_adamw_state(tmp_path: Path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optimizer": osd, "global_step": 1}
    folder = save(state, tmp_path, 1)
    assert file_names(folder) == ["CKP-model-0000000-0000001.safetensors", "CKP-opt-0000000-0000001.safetensors"]
    assert_same(reassemble(folder), _load(_full(state)))
    common = json.loads((folder / "common.json").read_text())
    assert common["state"]["optimizer"]["param_groups"][0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def _two_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from resumable.layout import dim_indices

    root_path = Path(root)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)  # the same "global" tensors on both ranks
    a, b, c = torch.randn(5, 3), torch.randn(4, 7), torch.randn(8, 3)
    refs: dict[str, Any] = {}

    # DP2: plain tensors, replicated on both ranks (model and optimizer-like state).
    dp = {"model": {"w": a, "scalar": torch.tensor(3.0), "empty": torch.empty(0, 4)},
          "optimizer": {"state": {"w": {"exp_avg": b, "step": torch.tensor(1.0)}}},
          "global_step": 7, "rank_local": {"rank": rank}}
    save(dp, root_path / "dp", 7)
    save(dp, root_path / "dp_rr", 7, remove_redundancy=True)
    refs["dp"] = _full(dp)

    # TP2: Shard(0) and Shard(1) with uneven sizes, a replicated bf16, an int64 optimizer
    # entry, and a _StridedShard whose local tensor holds two boxes (rows {0,1,4,5} / {2,3,6,7}).
    placements = [_StridedShard(0, split_factor=2)]
    rows = dim_indices(8, 0, 2, placements, (2,), (rank,))
    strided = DTensor.from_local(c[rows], mesh, placements, run_check=False, shape=c.shape, stride=c.stride())
    assert torch.equal(strided.full_tensor(), c)  # DTensor itself agrees on what each rank holds
    tp = {"model": {"rows": distribute_tensor(a, mesh, [Shard(0)]), "cols": distribute_tensor(b, mesh, [Shard(1)]),
                    "rep": distribute_tensor(a.bfloat16(), mesh, [Replicate()]), "strided": strided},
          "optimizer": {"state": {"rows": {"ids": distribute_tensor(torch.arange(9), mesh, [Shard(0)])}}}}
    save(tp, root_path / "tp", 3)
    refs["tp"] = _full(tp)

    # PP2: each rank holds different names; both hold a shared replicated one.
    pp = {"model": {f"layers.{rank}.w": torch.full((2, 3), float(rank)), "norm": torch.ones(3)},
          "optimizer": {"state": {f"layers.{rank}.w": {"exp_avg": torch.full((2, 3), 10.0 + rank)}}}}
    save(pp, root_path / "pp", 5, layout_info={"pipeline_stages": 2})
    refs = {k: _load(v) for k, v in refs.items()}  # plain dicts from here on
    refs["pp"] = {f"layers.{r}.w": torch.full((2, 3), float(r)) for r in range(2)}
    refs["pp"].update({f"optimizer.state.layers.{r}.w.exp_avg": torch.full((2, 3), 10.0 + r) for r in range(2)})
    refs["pp"]["norm"] = torch.ones(3)
    torch.distributed.barrier()  # leave together: teardown while a peer is mid-collective aborts gloo
    return {k: _bytes(v) for k, v in refs.items()}


def _bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as to_bytes

    return to_bytes({k: v.contiguous().clone() for k, v in tensors.items()})


def test_two_processes_dp_tp_strided_and_pp_reassemble_exactly(tmp_path: Path):
    refs = {k: _load(v) for k, v in run_distributed(_two_ranks, 2, str(tmp_path))[0].items()}
    dp = tmp_path / "dp" / "iteration_00000007"
    assert file_names(dp) == ["CKP-model-0000000-0000002.safetensors", "CKP-model-0000001-0000002.safetensors",
                              "CKP-opt-0000000-0000002.safetensors", "CKP-opt-0000001-0000002.safetensors"]
    assert_same(reassemble(dp), refs["dp"])
    common = json.loads((dp / "common.json").read_text())
    assert common["rank_local"] == [{"rank": 0}, {"rank": 1}] and common["global_step"] == 7

    rr = tmp_path / "dp_rr" / "iteration_00000007"
    assert_same(reassemble(rr), refs["dp"])
    assert_no_redundancy_and_balanced(rr)

    tp = tmp_path / "tp" / "iteration_00000003"
    assert_same(reassemble(tp), refs["tp"])
    meta = v2.read_metadata(tp)
    assert json.loads((tp / "metadata.json").read_text())["layout"] == {
        "world_size": 2, "mesh": {"tp": 2}, "pipeline_stages": 1, "writers": 2}
    strided = meta.stored("strided")
    assert [box.offsets for box, _ in strided] == [(0, 0), (2, 0), (4, 0), (6, 0)]
    assert strided[0][1] == [v2.Stored("CKP-model-0000000-0000002.safetensors", "strided@0,0")]
    assert meta.stored("rows")[1] == (Box((3, 0), (2, 3)), [v2.Stored("CKP-model-0000001-0000002.safetensors", "rows")])

    pp = tmp_path / "pp" / "iteration_00000005"
    assert_same(reassemble(pp), refs["pp"])
    assert json.loads((pp / "metadata.json").read_text())["layout"]["pipeline_stages"] == 2


def _fsdp_tp(rank: int, world: int, root: str) -> bytes:
    import warnings

    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])  # FSDP over TP: dim-0 shards become _StridedShard
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    assert type(msd["0.weight"].placements[0]).__name__ == "_StridedShard"
    state = {"model": msd, "optimizer": osd, "global_step": 1}
    save(state, Path(root) / "full", 1)
    save(state, Path(root) / "rr", 1, remove_redundancy=True, prefix="")
    # Balance is only promised where the planner has a choice: replicated chunks. (FSDP's
    # uneven shards above are owned by one rank each, whatever the planner does.)
    torch.manual_seed(1)
    replicated = {"model": {f"r{i}": torch.randn(i + 1, 3) for i in range(7)}}
    save(replicated, Path(root) / "rep", 1, remove_redundancy=True)
    refs = _full(state)
    torch.distributed.barrier()  # leave together: teardown while a peer is mid-collective aborts gloo
    return refs


def test_four_processes_fsdp_over_tp_strided_shards_reassemble_exactly(tmp_path: Path):
    refs = _load(run_distributed(_fsdp_tp, 4, str(tmp_path))[0])
    assert any(name.endswith("exp_avg_sq") for name in refs)
    full = tmp_path / "full" / "iteration_00000001"
    assert len(file_names(full)) == 8
    assert_same(reassemble(full), refs)
    assert json.loads((full / "metadata.json").read_text())["layout"]["mesh"] == {"dp": 2, "tp": 2}
    rr = tmp_path / "rr" / "iteration_00000001"
    assert_same(reassemble(rr), refs)
    meta = v2.read_metadata(rr)
    assert all(len(copies) == 1 for name in meta.tensors for _, copies in meta.stored(name))
    assert_no_redundancy_and_balanced(tmp_path / "rep" / "iteration_00000001")
    assert all(re.fullmatch(r"(model|opt)-\d{7}-\d{7}\.safetensors", n) for n in file_names(rr))
