"""Which boxes of each tensor every rank of a target layout holds, computed offline.

The rules are the trainer's (``resumable.train.parallel``), applied by tensor name so that
a checkpoint split for a layout is exactly what the trainer itself saves on it:

==============================================  ==========================================
tensor (and its ``optimizer.state.<fqn>.*``)    tensor parallel ("tp") placement
==============================================  ==========================================
q/k/v_proj, gate/up_proj, embed_tokens,         column-wise / vocabulary: ``Shard(0)``
lm_head
o_proj, down_proj                               row-wise: ``Shard(1)``
everything else (norms, ``step``, unknown)      replicated
==============================================  ==========================================

With a sharded optimizer (FSDP over "dp") every parameter and its moments are also
split along dim 0 over "dp" (``_StridedShard`` when "tp" already splits dim 0, as
FSDP2 does). Pipeline stages own contiguous layers (``stage_layers``); the embedding
lives on the first stage, the final norm and lm_head on the last; a name outside the
model's layers lives on every stage. Rank order is pp-major, tp-minor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from resumable.errors import ConfigError
from resumable.geometry import Box
from resumable.layout import placement_chunks
from resumable.train.parallel import stage_layers

__all__ = ["TargetLayout", "parse_layout", "rank_boxes"]

_TP_DIM = {
    "self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 0, "self_attn.v_proj.weight": 0,
    "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0,
    "self_attn.o_proj.weight": 1, "mlp.down_proj.weight": 1,
}
_TOP_TP_DIM = {"model.embed_tokens.weight": 0, "lm_head.weight": 0}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OPT = re.compile(r"^optimizer\.state\.(.+)\.(exp_avg|exp_avg_sq|step)$")


@dataclass(frozen=True)
class TargetLayout:
    """A trainer layout: pipeline stages × data parallel × tensor parallel, optionally FSDP."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    sharded_optimizer: bool = False

    def __post_init__(self) -> None:
        if min(self.pp, self.dp, self.tp) < 1:
            raise ConfigError(f"layout sizes must be positive, got pp={self.pp} dp={self.dp} tp={self.tp}")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def mesh(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp}

    def coordinate(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) of a global rank: rank = (pp_rank × dp + dp_rank) × tp + tp_rank."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp


def parse_layout(text: str, sharded_optimizer: bool = False) -> TargetLayout:
    """``"dp=2,tp=2"`` (any of pp, dp, tp; missing ones are 1) → :class:`TargetLayout`.

    Raises:
        ConfigError: an unknown key or a non-positive size, with the accepted form.
    """
    sizes = {"pp": 1, "dp": 1, "tp": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in sizes or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout {text!r}: {part!r} is not one of pp=N, dp=N, tp=N with N >= 1 "
                              "(e.g. --layout dp=2,tp=2)")
        sizes[key] = int(value)
    return TargetLayout(sizes["pp"], sizes["dp"], sizes["tp"], sharded_optimizer)


def _param(name: str) -> tuple[str, bool]:
    """The parameter a tensor belongs to, and whether the tensor is AdamW's scalar ``step``."""
    m = _OPT.match(name)
    return (m.group(1), m.group(2) == "step") if m else (name, False)


def _on_stage(param: str, layout: TargetLayout, stage: int, num_layers: int) -> bool:
    m = _LAYER.match(param)
    if m:
        return int(m.group(1)) in stage_layers(num_layers, layout.pp, stage)
    if param.startswith("model.embed_tokens."):
        return stage == 0
    if param.startswith(("model.norm.", "lm_head.")):
        return stage == layout.pp - 1
    return True


def _tp_dim(param: str) -> int | None:
    m = _LAYER.match(param)
    return _TP_DIM.get(m.group(2)) if m else _TOP_TP_DIM.get(param)


def _placements(param: str, ndim: int, is_step: bool, layout: TargetLayout) -> list[Placement]:
    """Placements over the (dp, tp) mesh."""
    if is_step or ndim == 0:
        return [Replicate(), Replicate()]
    tp_dim = _tp_dim(param) if layout.tp > 1 else None
    tp: Placement = Shard(tp_dim) if tp_dim is not None else Replicate()
    dp: Placement = Replicate()
    if layout.sharded_optimizer and layout.dp > 1:
        dp = _StridedShard(0, split_factor=layout.tp) if tp_dim == 0 else Shard(0)
    return [dp, tp]


def num_layers(names: Sequence[str]) -> int:
    """Decoder layers of a model, from its tensor names (largest layer index + 1)."""
    found = [int(m.group(1)) for n in names if (m := _LAYER.match(_param(n)[0]))]
    return max(found) + 1 if found else 0


def rank_boxes(name: str, shape: Sequence[int], layout: TargetLayout, rank: int, layers: int) -> list[Box]:
    """The boxes of tensor ``name`` (global ``shape``) that ``rank`` holds under ``layout`` (maybe none)."""
    param, is_step = _param(name)
    stage, dp_rank, tp_rank = layout.coordinate(rank)
    if not _on_stage(param, layout, stage, layers):
        return []
    placements = _placements(param, len(shape), is_step, layout)
    chunks = placement_chunks(tuple(shape), placements, (layout.dp, layout.tp), (dp_rank, tp_rank))
    return [c.box for c in chunks]
