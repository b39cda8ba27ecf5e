"""Parallel layouts: a ("pp", "dp", "tp") DeviceMesh and what each dimension does to the model.

=====================  ==========================================================
``parallel_config``    effect
=====================  ==========================================================
``model_parallel``     tensor parallel (DTensor), see the table below
``data_parallel``      own micro batches per rank; gradients averaged over "dp":
                       FSDP2 ``fully_shard`` when ``parallel.enable_parallel_optimizer``
                       (parameters and optimizer state sharded), else one all-reduce
``pipeline_stage``     layers split over stages, ``torch.distributed.pipelining``
=====================  ==========================================================

Tensor parallel plan (the table is ``resumable.models.qwen3.TP_LAYER_PLAN`` / ``TP_TOP_PLAN``, which
``resumable split`` reads too; column-wise shards weight dim 0 = output features, row-wise dim 1):

==============================  ============  ================================================
module                          style         why
==============================  ============  ================================================
q/k/v_proj, gate/up_proj        column-wise   each rank computes its own heads / FFN slice
o_proj, down_proj               row-wise      partial sums all-reduced back to the full width
embed_tokens                    row-wise      vocabulary-sharded lookup, summed over ranks
lm_head                         column-wise   logits gathered to full vocabulary for the loss
norms (incl. q_norm/k_norm)     replicated    q/k_norm see local heads only: their gradient is
                                              a partial sum, all-reduced over "tp" (sync_grads)
==============================  ============  ================================================

Rank order is pp-major, tp-minor: rank = (pp_rank * dp + dp_rank) * tp + tp_rank.
Everything here is collective over the world unless it says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from resumable.models.qwen3 import (
    FIRST_STAGE,
    LAST_STAGE,
    TP_LAYER_PLAN,
    TP_PARTIAL_GRADS,
    TP_TOP_PLAN,
    stage_layers,
)
from resumable.train.config import TrainConfig, check_layout
from resumable.train.model import Qwen3ForCausalLM

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

_STYLES: dict[str, type[ColwiseParallel] | type[RowwiseParallel]] = {
    "colwise": ColwiseParallel, "rowwise": RowwiseParallel}
# Not which weights are sharded (that is the plan) but how this trainer computes around them:
# the embedding takes replicated token ids and returns replicated activations, and lm_head
# gathers the logits to the full vocabulary, so the loss stays a plain cross entropy.
_TOP_LAYOUTS: dict[str, dict[str, Replicate]] = {
    "model.embed_tokens": {"input_layouts": Replicate(), "output_layouts": Replicate()},
    "lm_head": {"output_layouts": Replicate()},
}


@dataclass(frozen=True)
class Layout:
    """This rank's place in the mesh."""

    mesh: DeviceMesh
    device: torch.device
    pp: int
    dp: int
    tp: int
    sharded_optimizer: bool

    def coord(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    @property
    def is_first_stage(self) -> bool:
        return self.coord("pp") == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord("pp") == self.pp - 1


def pick_device() -> torch.device:
    """CUDA device of this local rank when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_layout(cfg: TrainConfig) -> Layout:
    """Create the mesh; collective over the world. The process group must be initialised."""
    check_layout(cfg, dist.get_world_size())
    pc = cfg.parallel_config
    device = pick_device()
    mesh = init_device_mesh(device.type, (pc.pipeline_stage, pc.data_parallel, pc.model_parallel),
                            mesh_dim_names=("pp", "dp", "tp"))
    # Sharding over one data-parallel rank would change nothing but the tensor types.
    return Layout(mesh, device, pc.pipeline_stage, pc.data_parallel, pc.model_parallel,
                  cfg.parallel.enable_parallel_optimizer and pc.data_parallel > 1)


def _module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent of submodule ``name`` and the attribute that holds it there."""
    parent, _, attr = name.rpartition(".")
    return model.get_submodule(parent), attr


def _keep_stage(model: Qwen3ForCausalLM, layout: Layout) -> None:
    """Delete what this pipeline stage does not own; the kept names stay global."""
    keep = stage_layers(len(model.model.layers), layout.pp, layout.coord("pp"))
    for name in list(model.model.layers):
        if int(name) not in keep:
            del model.model.layers[name]
    dropped = (() if layout.is_first_stage else FIRST_STAGE) + (() if layout.is_last_stage else LAST_STAGE)
    for name in dropped:
        setattr(*_module(model, name), None)


def _tensor_parallel(model: Qwen3ForCausalLM, layout: Layout) -> None:
    tp_mesh = layout.mesh["tp"]
    for layer in model.model.layers.values():
        parallelize_module(layer, tp_mesh, {name: _STYLES[rule.style]() for name, rule in TP_LAYER_PLAN.items()})
    top: dict[str, ParallelStyle] = {  # the top-level modules on this pipeline stage
        name: _STYLES[rule.style](**_TOP_LAYOUTS[name]) for name, rule in TP_TOP_PLAN.items()
        if getattr(*_module(model, name)) is not None}
    if top:
        tied = model.lm_head is not None and model.model.embed_tokens is not None and (
            model.lm_head.weight is model.model.embed_tokens.weight)
        parallelize_module(model, tp_mesh, top)
        if tied:  # both are Shard(0) over the vocabulary, so one DTensor serves both
            model.lm_head.weight = model.model.embed_tokens.weight


def _fully_shard(model: Qwen3ForCausalLM, layout: Layout) -> None:
    dp_mesh = layout.mesh["dp"]
    for layer in model.model.layers.values():
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)  # embedding, final norm, lm_head (tied or not) in the root unit


def parallelize(model: Qwen3ForCausalLM, layout: Layout) -> Qwen3ForCausalLM:
    """Turn the full, identically initialised model into this rank's part, in place."""
    if layout.pp > 1:
        _keep_stage(model, layout)
    model.to(layout.device)
    if layout.tp > 1:
        _tensor_parallel(model, layout)
    if layout.sharded_optimizer:
        _fully_shard(model, layout)
    return model


def build_pipeline(model: nn.Module, layout: Layout, micro_batch_num: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "PipelineScheduleSingle":
    """This stage's schedule: 1F1B when there are enough micro batches, else GPipe.

    The schedule divides gradients by ``micro_batch_num`` itself (``scale_grads``).
    """
    # Imported here: pipelining pulls in torch._dynamo, half a second per process.
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(model, layout.coord("pp"), layout.pp, layout.device, group=layout.group("pp"))
    schedule = Schedule1F1B if micro_batch_num >= layout.pp else ScheduleGPipe
    return schedule(stage, n_microbatches=micro_batch_num, loss_fn=loss_fn)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    """Sum ``grads`` over ``group`` in one collective, then multiply by ``scale``, in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_grads(model: nn.Module, layout: Layout) -> None:
    """Finish the gradients after backward; collective over "tp" and "dp" (each rank calls it).

    1. q_norm/k_norm gradients are partial sums over the tensor-parallel ranks: sum them.
    2. Without FSDP, average every gradient over the data-parallel ranks (FSDP already did).
    DTensor gradients are reduced through their local tensors: a replica group shares the
    same local shard, so summing local shards over "dp" is the data-parallel sum.
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if layout.tp > 1:
        _all_reduce_flat([_local(g) for n, g in named if n.endswith(TP_PARTIAL_GRADS)], layout.group("tp"), 1.0)
    if layout.dp > 1 and not layout.sharded_optimizer:
        _all_reduce_flat([_local(g) for _, g in named], layout.group("dp"), 1.0 / layout.dp)
