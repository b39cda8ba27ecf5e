"""Which boxes of each tensor every rank of a target layout holds, computed offline.

The rules are the trainer's, read from the same table the trainer builds its
``parallelize_module`` plans from (:mod:`resumable.models.qwen3`, "parallel plan"), and
applied by tensor name, so that a checkpoint split for a layout is exactly what the trainer
itself saves on it (``tests/distributed/test_train_layouts.py`` compares the two):

- tensor parallel ("tp"): a parameter in the plan (and its ``optimizer.state.<fqn>.*``) is
  ``Shard(dim)`` on the dim the plan gives (column-wise: 0, row-wise: 1, the embedding's
  vocabulary: 0); everything else (norms, AdamW's ``step``) is replicated;
- a sharded optimizer (FSDP over "dp") also splits every parameter and its moments along
  dim 0 over "dp" (``_StridedShard`` when "tp" already splits dim 0, as FSDP2 does);
- pipeline stages own contiguous layers (``qwen3.stage_layers``); the embedding lives on
  the first stage, the final norm and lm_head on the last; any other name on every stage.

Rank order is pp-major, tp-minor. A checkpoint of an unknown model (:func:`resumable.models.identify`)
splits over "dp" only: tensor parallelism needs the model's plan, so ``tp > 1`` is refused;
pipeline stages need to know which layer a tensor belongs to, so ``pp > 1`` is accepted
only when its parameters are numbered ``model.layers.{i}.*`` (HuggingFace's decoder
convention; the stage rules above then apply). :func:`check_layout` refuses these and every
impossible layout before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from resumable.errors import ConfigError
from resumable.formats.ms_names import parse_our_name
from resumable.geometry import Box
from resumable.layout import placement_chunks
from resumable.models import Identified, identify
from resumable.models.qwen3 import hf_head_counts, layer_of, on_stage, tp_dim

if TYPE_CHECKING:
    from resumable.sources import Source

__all__ = ["TargetLayout", "check_layout", "parse_layout", "rank_boxes"]

_KEYS = ("pp", "dp", "tp")
_SHOWN = 3  # names quoted in a refusal


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

    def __str__(self) -> str:
        return f"pp={self.pp},dp={self.dp},tp={self.tp}" + (" (sharded optimizer)" if self.sharded_optimizer else "")

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
    """``"dp=2,tp=2"`` (any of pp, dp, tp, each at most once; missing ones are 1) → :class:`TargetLayout`.

    Raises:
        ConfigError: an unknown or repeated key, or a non-positive size, with the accepted form.

    Example::

        parse_layout("pp=2,tp=2").world_size     # 4
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in _KEYS or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout {text!r}: {part!r} is not one of pp=N, dp=N, tp=N with N >= 1 "
                              "(e.g. --layout dp=2,tp=2)")
        if key in sizes:
            raise ConfigError(f"--layout {text!r}: {key} is given twice ({key}={sizes[key]} and {part}); "
                              "give each of pp, dp, tp at most once")
        sizes[key] = int(value)
    return TargetLayout(sizes.get("pp", 1), sizes.get("dp", 1), sizes.get("tp", 1), sharded_optimizer)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


def _tp_problems(source: Source, tp: int) -> list[str]:
    """Why a Qwen3 ``source`` cannot be split over ``tp`` ranks: heads, and dims smaller than tp."""
    shapes = {name: t.shape for name, t in source.tensors.items()}
    problems = []
    counts = hf_head_counts(shapes, source.model_config)
    for what, n in zip(("attention heads", "KV heads"), counts or ()):
        if n % tp:
            problems.append(f"its {n} {what} do not divide by tp={tp}: tensor parallelism gives each rank "
                            "whole heads")
    small = sorted((name, shape[d]) for name, shape in shapes.items()
                   if (d := tp_dim(parse_our_name(name)[0])) is not None and d < len(shape) and shape[d] < tp)
    if small:
        problems.append(f"tp={tp} is larger than the dim it would split of {len(small)} tensor(s) "
                        f"({_shown([f'{name}: {size}' for name, size in small])})")
    return problems


def check_layout(source: Source, layout: TargetLayout) -> Identified:
    """Refuse a layout ``source`` cannot be split into, before any work; the model it was identified as.

    Raises:
        ConfigError: listing every problem: tensor or pipeline parallelism of a model with no
        plan, heads or KV heads not divisible by tp, tp larger than a dim it would split,
        more stages than layers.

    Example::

        check_layout(open_source("unified/"), parse_layout("tp=2")).model     # "qwen3"
    """
    found = identify(source.tensors)
    layers = num_layers(list(source.tensors))
    problems = []
    if layout.tp > 1:
        if found.model is None:
            problems.append(f"tensor parallelism needs the plan of a known model, and this is none: "
                            f"{found.reason}; split it with tp=1 (dp and pp only)")
        else:
            problems.extend(_tp_problems(source, layout.tp))
    if layout.pp > 1:
        if layers == 0:
            problems.append(f"pipeline stages need numbered layers (model.layers.{{i}}.*) and no tensor has one "
                            f"({found.reason}); split it with pp=1")
        elif layout.pp > layers:
            problems.append(f"pp={layout.pp} exceeds its {layers} layers: every stage needs at least one layer")
    if problems:
        raise ConfigError(f"cannot split {source.path} for layout {layout}: " + "; ".join(problems))
    return found


def _param(name: str) -> tuple[str, bool]:
    """The parameter a tensor belongs to, and whether the tensor is AdamW's scalar ``step``."""
    param, slot = parse_our_name(name)
    return param, slot == "step"


def _placements(param: str, ndim: int, is_step: bool, layout: TargetLayout) -> list[Placement]:
    """Placements over the (dp, tp) mesh."""
    if is_step or ndim == 0:
        return [Replicate(), Replicate()]
    dim = tp_dim(param) if layout.tp > 1 else None
    tp: Placement = Shard(dim) if dim is not None else Replicate()
    dp: Placement = Replicate()
    if layout.sharded_optimizer and layout.dp > 1:
        dp = _StridedShard(0, split_factor=layout.tp) if dim == 0 else Shard(0)
    return [dp, tp]


def num_layers(names: Sequence[str]) -> int:
    """Decoder layers of a model, from its tensor names (largest layer index + 1)."""
    found = [layer for n in names if (layer := layer_of(_param(n)[0])) is not None]
    return max(found) + 1 if found else 0


def rank_boxes(name: str, shape: Sequence[int], layout: TargetLayout, rank: int, layers: int) -> list[Box]:
    """The boxes of tensor ``name`` (global ``shape``) that ``rank`` holds under ``layout`` (maybe none)."""
    param, is_step = _param(name)
    stage, dp_rank, tp_rank = layout.coordinate(rank)
    if not on_stage(param, stage, layout.pp, layers):
        return []
    placements = _placements(param, len(shape), is_step, layout)
    chunks = placement_chunks(tuple(shape), placements, (layout.dp, layout.tp), (dp_rank, tp_rank))
    return [c.box for c in chunks]
