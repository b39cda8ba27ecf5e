"""Synthetic per-rank holdings of a large training state on W simulated ranks.

The scale benchmark (issue 14) feeds checkpoint planners what each of W ranks would
hold of a Llama/Qwen-like decoder and its AdamW state, without any tensor data and
without ``torch.distributed``: every rank's share is described by a :class:`Holding`
(the tensor's global shape and dtype, the device mesh it lives on, the rank's
coordinate in that mesh and the DTensor placements).

Everything here is pure and deterministic. The per-stage tensor list of a layout is
built once and cached; :func:`rank_holdings` only adds the rank's coordinate, so
asking for one rank of W = 8192 costs what asking for one rank of W = 8 does.

Models (:data:`MODELS`): ``"8b"`` and ``"70b"``, HuggingFace names
(``model.layers.{i}.self_attn.q_proj.weight``, ...), Qwen3-style ``q_norm`` /
``k_norm``, untied ``lm_head``; weights bfloat16, and per parameter the flattened
optimizer entries ``optimizer.state.<fqn>.step`` (float32, 0-d),
``.exp_avg`` and ``.exp_avg_sq`` (float32, the parameter's shape).

Layouts (:data:`LAYOUTS`), as FSDP2 / torchtitan would place the tensors:

* ``fsdp``: mesh ``("dp",) = (W,)``; ``Shard(0)``.
* ``hsdp``: mesh ``("replicate", "shard") = (R, W // R)``, R = 8 for W >= 64 else 2;
  ``(Replicate(), Shard(0))``.
* ``tp8_fsdp`` (and ``tp4_fsdp``, the target of a TP change): mesh
  ``("dp", "tp") = (W // t, t)``. Column-parallel weights (q, k, v, gate, up,
  embed_tokens, lm_head) are TP ``Shard(0)``, so ``fully_shard`` puts
  ``_StridedShard(0, split_factor=t)`` on dp; row-parallel weights (o, down) are TP
  ``Shard(1)`` with ``Shard(0)`` on dp; norms ``(Shard(0), Replicate())``
  (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, ``_init_sharding_spec_tp``).
* ``pp_fsdp``: P = min(4, W // 2) pipeline stages with the layers split contiguously
  (embed_tokens on the first, norm and lm_head on the last); each stage is a 1-D
  FSDP mesh ``("dp",)`` over its contiguous block of W // P ranks; ``Shard(0)``.

The 0-d ``step`` entries are ``Replicate()`` on every mesh dimension. Moments are
placed like their parameter.

Example::

    from bench.scale_state import rank_holdings, reshard_target
    holdings = rank_holdings("8b", "tp8_fsdp", 4096, 17)
    target = reshard_target("tp8_fsdp", 4096, "tp")   # tp4_fsdp on 4096 ranks
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch.distributed.tensor.placement_types import Placement, Replicate, Shard, _StridedShard

Kind = Literal["model", "opt"]


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a Llama/Qwen-like decoder."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int


MODELS: dict[str, ModelShape] = {
    "8b": ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256),
    "70b": ModelShape(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, vocab=128256),
}

#: The layouts this module describes; ``tp4_fsdp`` exists as the target of a TP change.
LAYOUTS: tuple[str, ...] = ("fsdp", "hsdp", "tp8_fsdp", "tp4_fsdp", "pp_fsdp")

WEIGHT_DTYPE = "bfloat16"
OPTIM_DTYPE = "float32"


class TensorSpec(NamedTuple):
    """One entry of the full (unsharded) state."""

    name: str
    kind: Kind
    dtype: str
    shape: tuple[int, ...]


class Holding(NamedTuple):
    """What one simulated rank holds of one tensor."""

    name: str
    kind: Kind
    dtype: str
    #: Global shape of the tensor.
    shape: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...]
    #: Global ranks of the mesh in row-major order (for PP: the stage's sub-mesh).
    mesh_ranks: tuple[int, ...]
    #: This rank's coordinate in the mesh.
    coordinate: tuple[int, ...]
    placements: tuple[Placement, ...]


class ReshardTarget(NamedTuple):
    """The layout a checkpoint is loaded into."""

    label: str
    layout: str
    world: int


# Tensor roles: how tensor parallelism splits a parameter.
_COLWISE, _ROWWISE, _NORM = "colwise", "rowwise", "norm"


class _Param(NamedTuple):
    fqn: str
    shape: tuple[int, ...]
    role: str


def _layer_params(m: ModelShape, i: int) -> list[_Param]:
    p = f"model.layers.{i}."
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return [
        _Param(p + "input_layernorm.weight", (m.hidden,), _NORM),
        _Param(p + "self_attn.q_proj.weight", (q, m.hidden), _COLWISE),
        _Param(p + "self_attn.k_proj.weight", (kv, m.hidden), _COLWISE),
        _Param(p + "self_attn.v_proj.weight", (kv, m.hidden), _COLWISE),
        _Param(p + "self_attn.o_proj.weight", (m.hidden, q), _ROWWISE),
        _Param(p + "self_attn.q_norm.weight", (m.head_dim,), _NORM),
        _Param(p + "self_attn.k_norm.weight", (m.head_dim,), _NORM),
        _Param(p + "post_attention_layernorm.weight", (m.hidden,), _NORM),
        _Param(p + "mlp.gate_proj.weight", (m.ffn, m.hidden), _COLWISE),
        _Param(p + "mlp.up_proj.weight", (m.ffn, m.hidden), _COLWISE),
        _Param(p + "mlp.down_proj.weight", (m.hidden, m.ffn), _ROWWISE),
    ]


def _embed(m: ModelShape) -> _Param:
    return _Param("model.embed_tokens.weight", (m.vocab, m.hidden), _COLWISE)


def _head(m: ModelShape) -> list[_Param]:
    return [
        _Param("model.norm.weight", (m.hidden,), _NORM),
        _Param("lm_head.weight", (m.vocab, m.hidden), _COLWISE),
    ]


def _stage_params(m: ModelShape, stage: int, stages: int) -> list[_Param]:
    """Parameters of pipeline stage ``stage`` of ``stages`` (one stage: the whole model)."""
    per, extra = divmod(m.layers, stages)
    first = stage * per + min(stage, extra)
    count = per + (1 if stage < extra else 0)
    params = [_embed(m)] if stage == 0 else []
    for i in range(first, first + count):
        params += _layer_params(m, i)
    if stage == stages - 1:
        params += _head(m)
    return params


def _optim_names(fqn: str) -> tuple[str, str, str]:
    """The flattened AdamW entries of a parameter: step, exp_avg, exp_avg_sq."""
    base = f"optimizer.state.{fqn}."
    return base + "step", base + "exp_avg", base + "exp_avg_sq"


def _model(model: str) -> ModelShape:
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}") from None


def tensor_specs(model: str) -> list[TensorSpec]:
    """Every tensor of the full state: the parameters, then their optimizer entries."""
    params = _stage_params(_model(model), 0, 1)
    specs = [TensorSpec(p.fqn, "model", WEIGHT_DTYPE, p.shape) for p in params]
    for p in params:
        step, avg, avg_sq = _optim_names(p.fqn)
        specs += [
            TensorSpec(step, "opt", OPTIM_DTYPE, ()),
            TensorSpec(avg, "opt", OPTIM_DTYPE, p.shape),
            TensorSpec(avg_sq, "opt", OPTIM_DTYPE, p.shape),
        ]
    return specs


# ---------------------------------------------------------------------- layouts


def _tp_degree(layout: str) -> int | None:
    match = re.fullmatch(r"tp(\d+)_fsdp", layout)
    return int(match.group(1)) if match else None


def hsdp_replicas(world: int) -> int:
    """R, the replicate degree of ``hsdp`` on ``world`` ranks."""
    return 8 if world >= 64 else 2


def pp_stages(world: int) -> int:
    """P, the pipeline degree of ``pp_fsdp`` on ``world`` ranks."""
    return min(4, world // 2)


def check_layout(layout: str, world: int) -> None:
    """Raise ``ValueError`` if ``layout`` cannot be laid on ``world`` ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    tp = _tp_degree(layout)
    if layout == "fsdp":
        fits = world >= 1
    elif layout == "hsdp":
        fits = world >= 2 and world % hsdp_replicas(world) == 0
    elif layout == "pp_fsdp":
        fits = world >= 2 and world % pp_stages(world) == 0
    else:
        fits = tp is not None and world >= tp and world % tp == 0
    if not fits:
        raise ValueError(f"layout {layout} does not fit on {world} ranks")


class _Mesh(NamedTuple):
    shape: tuple[int, ...]
    dim_names: tuple[str, ...]
    ranks: tuple[int, ...]


class _Group(NamedTuple):
    """Ranks that hold the same tensors on the same mesh (a PP stage, or everyone)."""

    mesh: _Mesh
    #: (name, kind, dtype, shape, placements) of every tensor the group holds.
    tensors: tuple[tuple[str, Kind, str, tuple[int, ...], tuple[Placement, ...]], ...]


def _placements(layout: str, role: str, ndim: int) -> tuple[Placement, ...]:
    """Placements of a tensor of ``ndim`` dimensions (0: an optimizer step)."""
    tp = _tp_degree(layout)
    if layout in ("fsdp", "pp_fsdp"):
        return (Shard(0),) if ndim else (Replicate(),)
    if layout == "hsdp":
        return (Replicate(), Shard(0)) if ndim else (Replicate(), Replicate())
    if tp is None:
        raise ValueError(f"unknown layout {layout!r}")
    if not ndim:
        return (Replicate(), Replicate())
    if role == _COLWISE:
        return (_StridedShard(0, split_factor=tp), Shard(0))
    if role == _ROWWISE:
        return (Shard(0), Shard(1))
    return (Shard(0), Replicate())


def _group_mesh(layout: str, world: int, group: int) -> _Mesh:
    if layout == "fsdp":
        return _Mesh((world,), ("dp",), tuple(range(world)))
    if layout == "hsdp":
        r = hsdp_replicas(world)
        return _Mesh((r, world // r), ("replicate", "shard"), tuple(range(world)))
    if layout == "pp_fsdp":
        size = world // pp_stages(world)
        return _Mesh((size,), ("dp",), tuple(range(group * size, (group + 1) * size)))
    tp = _tp_degree(layout)
    if tp is None:
        raise ValueError(f"unknown layout {layout!r}")
    return _Mesh((world // tp, tp), ("dp", "tp"), tuple(range(world)))


def group_of(layout: str, world: int, rank: int) -> int:
    """The group of ``rank``: ranks of one group hold the same tensors on the same mesh (0 but for PP)."""
    return rank // (world // pp_stages(world)) if layout == "pp_fsdp" else 0


@functools.lru_cache(maxsize=64)
def _group(model: str, layout: str, world: int, group: int) -> _Group:
    check_layout(layout, world)
    m = _model(model)
    stages = pp_stages(world) if layout == "pp_fsdp" else 1
    params = _stage_params(m, group, stages)
    tensors = [(p.fqn, "model", WEIGHT_DTYPE, p.shape, _placements(layout, p.role, len(p.shape))) for p in params]
    for p in params:
        step, avg, avg_sq = _optim_names(p.fqn)
        moment = _placements(layout, p.role, len(p.shape))
        tensors += [
            (step, "opt", OPTIM_DTYPE, (), _placements(layout, p.role, 0)),
            (avg, "opt", OPTIM_DTYPE, p.shape, moment),
            (avg_sq, "opt", OPTIM_DTYPE, p.shape, moment),
        ]
    return _Group(_group_mesh(layout, world, group), tuple(tensors))


def _coordinate(mesh: _Mesh, rank: int) -> tuple[int, ...]:
    """Row-major coordinate of ``rank`` in a mesh over a contiguous block of ranks."""
    index = rank - mesh.ranks[0]
    coord = []
    for size in reversed(mesh.shape):
        index, c = divmod(index, size)
        coord.append(c)
    return tuple(reversed(coord))


def rank_holdings(model: str, layout: str, world: int, rank: int) -> list[Holding]:
    """What simulated rank ``rank`` of ``world`` holds, in state-dict order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in a world of {world}")
    group = _group(model, layout, world, group_of(layout, world, rank))
    mesh, coord = group.mesh, _coordinate(group.mesh, rank)
    return [
        Holding(name, kind, dtype, shape, mesh.shape, mesh.dim_names, mesh.ranks, coord, placements)
        for name, kind, dtype, shape, placements in group.tensors
    ]


def reshard_target(layout: str, world: int, change: Literal["half", "tp"] = "half") -> ReshardTarget:
    """Where a checkpoint saved with ``layout`` on ``world`` ranks is loaded for a reshard.

    ``"half"``: the same layout kind on ``world // 2`` ranks (``"W -> W/2"``).
    ``"tp"``: only for ``tp8_fsdp``: ``tp4_fsdp`` on the same ranks, dp doubled.
    Raises ``ValueError`` where the target does not exist (e.g. tp8 on 4 ranks).
    """
    if change == "half":
        target = ReshardTarget("W -> W/2", layout, world // 2)
    elif change == "tp" and layout == "tp8_fsdp":
        target = ReshardTarget("tp8 -> tp4", "tp4_fsdp", world)
    else:
        raise ValueError(f"no {change!r} reshard for layout {layout}")
    check_layout(target.layout, target.world)
    return target

