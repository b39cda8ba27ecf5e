"""Save on one parallel layout, load on another: model AND AdamW state come back bit-exact.

Every tensor of the state (weights, ``exp_avg``, ``exp_avg_sq``, ``step``) is set to a
deterministic reference value of its *global* tensor before saving, so the check after
loading is exact equality of every local chunk with the same slice of the reference
(no tolerance: loading copies bytes). After the load the state is handed back to the
model and optimizer (``apply_training_state``) and read out again, so what the trainer
sees is checked too, including the optimizer's learning rate from common.json.

Jobs are real gloo process groups (``tests.launch``). To keep the suite fast, one job per
world size saves its sources and loads the targets whose sources already exist (the
one-process layout runs on rank 0 in a process group of its own); the phases below run
once per module and each cell of the matrix is its own test.

Layouts (the tiny ``_Net``: an embedding of 7 rows — uneven over 2, 3 and 4 ranks — and
two blocks of a column-wise ``w1`` (10 rows) and a row-wise ``w2`` (10 columns)):

==================  =============================================================
``single``          plain tensors, one process
``replicated``      plain tensors on every rank (pure data parallel)
``dp2_fsdp``        ``fully_shard`` over 2 ranks
``tpN``             tensor parallel over N ranks (embedding row-wise, w1 column-, w2 row-wise)
``dp2_tp2``         TP over 2, replicated over dp 2
``dp2_tp2_fsdp``    TP over 2, then ``fully_shard`` over dp 2: ``_StridedShard`` placements
``pp2``             rank r holds ``layers.r`` only (and the embedding on rank 0)
==================  =============================================================
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.launch import run_distributed

SOURCE_LR = 0.125


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(8, 10, bias=False)
        self.w2 = nn.Linear(10, 8, bias=False)
        self.norm = nn.Parameter(torch.ones(8))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.layers = nn.ModuleDict({"0": _Block(), "1": _Block()})


def _tp_plan() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {"embed": RowwiseParallel(input_layouts=Replicate())}
    for i in ("0", "1"):
        plan[f"layers.{i}.w1"] = ColwiseParallel()
        plan[f"layers.{i}.w2"] = RowwiseParallel()
    return plan


def build(layout: str, device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """The model, AdamW and its ``training_state`` on ``layout`` (collective when the layout makes a mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from resumable.load import training_state

    torch.manual_seed(0)
    with torch.device(device):
        model = _Net()
    if layout == "pp2":
        rank = dist.get_rank()
        del model.layers[str(1 - rank)]
        if rank == 1:
            model.embed = None
    elif layout.startswith("tp"):
        mesh = init_device_mesh("cpu", (int(layout[2:]),), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, _tp_plan())
    elif layout == "dp2_fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)))
    elif layout in ("dp2_tp2", "dp2_tp2_fsdp"):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], _tp_plan())
        if layout == "dp2_tp2_fsdp":
            fully_shard(model, mesh=mesh["dp"])
    else:
        assert layout in ("single", "replicated"), layout
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optim, training_state(model, optim)


def reference(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The global value every layout stores for tensor ``name``."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=g).to(dtype)


def _chunks(state: dict[str, Any]):
    from resumable.layout import local_chunks, local_tensor
    from resumable.state import flatten_state

    for name, leaf in sorted(flatten_state(state).tensors.items()):
        ref = reference(name, leaf.value.shape, leaf.value.dtype)
        local = local_tensor(leaf.value)
        for c in local_chunks(leaf.value):
            yield name, local, c.local, ref[c.box.slices_in(type(c.box).full(ref.shape))] if ref.dim() else ref


def fill_reference(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for _, local, where, value in _chunks(state):
            local[where] = value


def fill_garbage(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for _, local, where, _ in _chunks(state):
            local[where] = -777.0


def mismatches(state: dict[str, Any]) -> list[str]:
    return [f"{name}{list(where)}" for name, local, where, value in _chunks(state)
            if not torch.equal(local[where], value)]


def _save(layout: str, directory: Path, rank: int, group: Any) -> None:
    import resumable

    model, optim, state = build(layout)
    for param_group in optim.param_groups:
        param_group["lr"] = SOURCE_LR
    state = _state_with_context(model, optim, rank)
    fill_reference(state)
    resumable.save(state, directory, 10, process_group=group)


def _state_with_context(model: nn.Module, optim: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    from resumable.load import training_state

    state = training_state(model, optim)
    state["global_step"] = 10
    state["rank_local"] = {"seed": 1000 + rank}
    return state


def _load(layout: str, directory: Path, rank: int, opts: dict[str, Any], group: Any) -> dict[str, Any]:
    from resumable.load import apply_training_state, load, load_async, training_state

    template = None
    if opts.get("async"):
        # The template lives on the meta device: the reading overlaps with building the real model.
        template = build(layout, device="meta")[2]
        pending = load_async(template, directory, process_group=group)
    model, optim, state = build(layout)
    state["global_step"], state["rank_local"] = 0, None
    fill_garbage(state)
    if template is not None:
        result = pending.result(state)
    else:
        result = load(state, directory, balanced=opts.get("balanced", False), process_group=group)
    bad = mismatches(state)
    apply_training_state(model, optim, state)
    bad += [f"after apply: {m}" for m in mismatches(training_state(model, optim))]
    lrs = {g["lr"] for g in optim.param_groups}
    if lrs != {SOURCE_LR}:
        bad.append(f"optimizer lr {lrs}, expected {SOURCE_LR}")
    if state["global_step"] != 10 or result.common["global_step"] != 10:
        bad.append(f"global_step {state['global_step']}")
    return {"bad": bad, "bytes": result.bytes_read, "rank_local": result.rank_local,
            "tensors": result.tensors}


def _phase(rank: int, world: int, root: str, steps: list[tuple]) -> dict[str, Any]:
    """Run one job's saves and loads in order; a failing cell is recorded, the others still run.

    Layout ``single`` runs on rank 0 alone, in a process group of its own (a real
    one-process job inside this job, which saves a process start per phase); the other
    ranks skip it.
    """
    solo = dist.new_group([0])  # collective: every rank creates it, only rank 0 uses it
    out: dict[str, Any] = {}
    for step in steps:
        layout = step[2] if step[0] == "load" else step[1]
        group = solo if layout == "single" else None
        if group is solo and rank != 0:
            continue
        if step[0] == "save":
            _save(layout, Path(root) / step[2], rank, group)
            continue
        _, source, layout, opts = step
        cell = _cell(source, layout, opts)
        try:
            out[cell] = _load(layout, Path(root) / source, rank, opts, group)
        except Exception as exc:  # noqa: BLE001 - reported per cell by the test
            out[cell] = {"bad": [f"{type(exc).__name__}: {exc}"]}
    return out


def _cell(source: str, layout: str, opts: dict[str, Any]) -> str:
    extra = "".join(f"+{k}" for k in sorted(opts))
    return f"{source}->{layout}{extra}"


# (world size, steps); sources are named after the layout that saved them.
PHASES: list[tuple[int, list[tuple]]] = [
    (2, [("save", "single", "single"), ("save", "dp2_fsdp", "dp2_fsdp"), ("save", "tp2", "tp2"),
         ("load", "single", "tp2", {}),                     # 1 -> 2
         ("load", "dp2_fsdp", "tp2", {}),                   # DP2 -> TP2
         ("load", "dp2_fsdp", "tp2", {"async": True}),      # async = sync
         ("load", "single", "replicated", {}),
         ("load", "single", "replicated", {"balanced": True}),
         ("load", "dp2_fsdp", "single", {})]),              # 2 -> 1
    (3, [("save", "tp3", "tp3"),
         ("load", "tp2", "tp3", {})]),                      # uneven: 7 rows 4+3 -> 3+3+1
    (4, [("save", "dp2_tp2_fsdp", "dp2_tp2_fsdp"),
         ("load", "tp2", "dp2_tp2", {}),                    # TP2 -> DP2 x TP2
         ("load", "tp3", "tp4", {}),                        # uneven: 3+3+1 -> 2+2+2+1
         ("load", "single", "dp2_tp2_fsdp", {}),            # 1 -> 4 with _StridedShard
         ("load", "dp2_tp2_fsdp", "dp2_tp2_fsdp", {}),      # same layout
         ("load", "dp2_tp2_fsdp", "dp2_tp2", {}),
         ("load", "dp2_tp2_fsdp", "dp2_tp2", {"balanced": True}),
         ("load", "tp3", "dp2_tp2", {"balanced": True}),    # units cut across a target's columns
         ("load", "dp2_tp2_fsdp", "single", {})]),          # FSDP over TP -> one process
    (2, [("load", "dp2_tp2_fsdp", "pp2", {}),               # FSDP over TP -> pipeline stages
         ("load", "tp3", "tp2", {}),                        # uneven: 3 -> 2
         ("load", "dp2_tp2_fsdp", "dp2_fsdp", {"balanced": True}),
         ("load", "tp3", "single", {"balanced": True})]),
]

CELLS = [(1 if s[2] == "single" else world, _cell(s[1], s[2], s[3]))
         for world, steps in PHASES for s in steps if s[0] == "load"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    root = tmp_path_factory.mktemp("reshard")
    results: dict[str, list[Any]] = {}
    for world, steps in PHASES:
        per_rank = run_distributed(_phase, world, str(root), steps)
        for cell in per_rank[0]:
            results[cell] = [r[cell] for r in per_rank if cell in r]
    return results


@pytest.mark.parametrize("world,cell", CELLS, ids=[c for _, c in CELLS])
def test_every_rank_loads_exactly_the_saved_values(matrix: dict[str, list[Any]], world: int, cell: str) -> None:
    per_rank = matrix[cell]
    assert len(per_rank) == world
    assert [r["bad"] for r in per_rank] == [[] for _ in range(world)]


def test_rank_local_values_come_back_only_when_the_world_size_is_unchanged(matrix) -> None:
    assert [r["rank_local"] for r in matrix["dp2_tp2_fsdp->dp2_tp2_fsdp"]] == [{"seed": 1000 + r} for r in range(4)]
    assert [r["rank_local"] for r in matrix["tp2->dp2_tp2"]] == [None] * 4
    assert [r["rank_local"] for r in matrix["tp3->tp2"]] == [None] * 2


def test_a_pipeline_stage_loads_only_its_own_tensors(matrix) -> None:
    # stage 0: embed + layers.0 (3 weights) and their AdamW state (3 tensors each);
    # stage 1: layers.1 only. Counted from the state the stage built.
    assert [r["tensors"] for r in matrix["dp2_tp2_fsdp->pp2"]] == [4 * 4, 3 * 4]


def _tensor_bytes() -> int:
    """Bytes of every tensor of the full state: weights + exp_avg + exp_avg_sq (fp32) + steps (fp32 scalars)."""
    params = 7 * 8 + 2 * (8 * 10 + 10 * 8 + 8)
    return 4 * (3 * params + 7)


def test_balanced_load_reads_every_element_once_in_all_and_less_per_rank(matrix) -> None:
    for plain, balanced, world in (("single->replicated", "single->replicated+balanced", 2),
                                   ("dp2_tp2_fsdp->dp2_tp2", "dp2_tp2_fsdp->dp2_tp2+balanced", 4)):
        plain_bytes = [r["bytes"] for r in matrix[plain]]
        balanced_bytes = [r["bytes"] for r in matrix[balanced]]
        # The targets replicate everything over 2 data parallel ranks: a plain load reads it twice.
        assert sum(balanced_bytes) == _tensor_bytes()
        assert sum(plain_bytes) >= 2 * _tensor_bytes()
        assert all(b < p for b, p in zip(balanced_bytes, plain_bytes)), (balanced_bytes, plain_bytes)
