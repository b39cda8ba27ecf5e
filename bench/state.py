"""The synthetic training state the benchmark saves and loads.

A Qwen-like decoder in fp32 (embeddings, attention and SwiGLU projections, norms,
an untied LM head) plus AdamW's ``exp_avg`` / ``exp_avg_sq`` per parameter and a 0-d
``step``, shaped as :func:`resumable.load.training_state` would give it::

    {"model": {fqn: w}, "optimizer": {"state": {fqn: {"exp_avg", "exp_avg_sq", "step"}},
                                      "param_groups": [{"lr": ..., "params": [fqn, ...]}]}}

On ``world`` ranks every tensor is a ``DTensor`` sharded ``Shard(0)`` over a 1-D mesh
(each rank holds its rows, as FSDP would); ``replicated=True`` gives every rank the
whole state (data parallel).

Contents are incompressible, like real fp32 weights: a virtual disk may compress or
deduplicate (constant-filled tensors wrote twice as fast here as random ones), so every
tensor is random noise tiled from one block whose period, 32 MiB + 4 bytes, is not a
multiple of the 4 KiB block size, so no two disk blocks repeat. For checking, the first
element of the first and of the last row that source rank ``s`` holds of tensor ``k``
is ``k + 1 + s / 4`` (times -1 for ``exp_avg``, 1/2 for ``exp_avg_sq``); a load is
verified by looking at those rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

GIB = 1 << 30
#: Elements of the noise block (32 MiB + 4 bytes of fp32).
NOISE_ELEMS = (8 << 20) + 1


def noise(elems: int = NOISE_ELEMS, seed: int = 0) -> torch.Tensor:
    """Uniform [0, 1) fp32 noise (numpy's generator: ~3x faster than torch's here)."""
    import numpy as np

    out = np.empty(elems, dtype=np.float32)
    np.random.default_rng(seed).random(out=out, dtype=np.float32)
    return torch.from_numpy(out)


def fill_noise(t: torch.Tensor, block: torch.Tensor, start: int) -> None:
    """Fill contiguous ``t`` with ``block`` tiled from position ``start`` (one memory pass)."""
    flat, n, pos = t.view(-1), t.numel(), 0
    start %= block.numel()
    while pos < n:
        take = min(n - pos, block.numel() - start)
        flat[pos:pos + take].copy_(block[start:start + take])
        pos, start = pos + take, 0


@dataclass(frozen=True)
class Shapes:
    """Dimensions of the synthetic decoder."""

    vocab: int
    hidden: int
    ffn: int
    layers: int

    def params(self) -> dict[str, tuple[int, ...]]:
        """Parameter FQN → global shape, in model order."""
        h, f = self.hidden, self.ffn
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            for proj in ("q", "k", "v", "o"):
                out[f"{p}self_attn.{proj}_proj.weight"] = (h, h)
            out[f"{p}mlp.gate_proj.weight"] = (f, h)
            out[f"{p}mlp.up_proj.weight"] = (f, h)
            out[f"{p}mlp.down_proj.weight"] = (h, f)
            out[f"{p}input_layernorm.weight"] = (h,)
            out[f"{p}post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def nbytes(self) -> int:
        """Bytes of weights + two fp32 moments (the 0-d steps are negligible but counted)."""
        n = sum(math.prod(s) for s in self.params().values())
        return 3 * 4 * n + 4 * len(self.params())


def shapes_for(size_bytes: int) -> Shapes:
    """Decoder dimensions whose training state is close to ``size_bytes``.

    The widest hidden size whose two vocab matrices use at most half of the parameters,
    then as many layers as fill the rest (at least one).
    """
    params = size_bytes / 12
    best = Shapes(4096, 128, 384, 1)
    for hidden, vocab in ((128, 4096), (256, 8000), (512, 16000), (1024, 32000), (2048, 64000)):
        if 2 * vocab * hidden <= params / 2:
            best = Shapes(vocab, hidden, (hidden * 11 // 4 + 63) // 64 * 64, 1)
    per_layer = 4 * best.hidden ** 2 + 3 * best.hidden * best.ffn + 2 * best.hidden
    layers = max(1, round((params - 2 * best.vocab * best.hidden) / per_layer))
    return Shapes(best.vocab, best.hidden, best.ffn, layers)


def value(index: int, shard: int) -> float:
    """The fill value of tensor ``index`` in the rows written by source rank ``shard`` (exact in fp32)."""
    return index + 1 + shard / 4


def source_shard(row: int, rows: int, world: int) -> int:
    """Which rank holds global ``row`` under ``Shard(0)`` on ``world`` ranks (torch.chunk sizes)."""
    return row // math.ceil(rows / world) if world > 1 else 0


def _rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the rows rank ``rank`` holds under Shard(0) (torch.chunk rule)."""
    per = math.ceil(rows / world)
    start = min(rows, rank * per)
    return start, min(rows, start + per)


def build_state(shapes: Shapes, *, world: int = 1, rank: int = 0, replicated: bool = False,
                fill: bool = True) -> dict[str, Any]:
    """This rank's share of the state: plain tensors on one process, DTensors on ``world`` > 1.

    Args:
        shapes: the decoder dimensions.
        world, rank: the job; with ``world`` > 1 a default process group must exist.
        replicated: every rank holds full plain tensors (data parallel) instead of shards.
        fill: noise and check values (source side); False writes zeros (a load target), so
            the pages are touched either way and the baseline RSS contains the state.
    """
    mesh = None
    block = noise() if fill else None
    if world > 1 and not replicated:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    params = shapes.params()
    model: dict[str, torch.Tensor] = {}
    opt: dict[str, dict[str, torch.Tensor]] = {}
    for k, (name, shape) in enumerate(params.items()):
        triple = [_tensor(shape, 3 * k + j, sign, mesh, world, rank, block)
                  for j, sign in enumerate((1.0, -1.0, 0.5))]
        model[name] = triple[0]
        opt[name] = {"exp_avg": triple[1], "exp_avg_sq": triple[2], "step": torch.tensor(10.0)}
    groups = [{"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01, "params": list(params)}]
    return {"model": model, "optimizer": {"state": opt, "param_groups": groups}, "global_step": 10}


def _tensor(shape: tuple[int, ...], index: int, sign: float, mesh: Any, world: int, rank: int,
            block: torch.Tensor | None) -> torch.Tensor:
    """One tensor (or this rank's Shard(0) piece wrapped as a DTensor): noise plus check values."""
    shard, start, stop = 0, 0, shape[0]
    if mesh is not None:
        shard = rank
        start, stop = _rows(shape[0], world, rank)
    local = torch.empty((stop - start, *shape[1:]), dtype=torch.float32)
    if block is None:
        local.zero_()
    elif local.numel():
        fill_noise(local, block, 7919 * index + start * math.prod(shape[1:]))
        local[0].view(-1)[0] = sign * value(index, shard)
        local[-1].view(-1)[0] = sign * value(index, shard)
    if mesh is None:
        return local
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def tensors(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every big tensor, in build order: weight, exp_avg, exp_avg_sq per parameter."""
    out = []
    for fqn, w in state["model"].items():
        s = state["optimizer"]["state"][fqn]
        out += [(fqn, w), (f"{fqn}.exp_avg", s["exp_avg"]), (f"{fqn}.exp_avg_sq", s["exp_avg_sq"])]
    return out


def check_loaded(state: dict[str, Any], saved_world: int) -> None:
    """Raise AssertionError unless every source shard's first and last row that this rank
    holds carries its check value (so shard boundaries, where reshard bugs live, are checked).
    """
    from resumable.layout import local_chunks, local_tensor

    for index, (name, t) in enumerate(tensors(state)):
        sign = (1.0, -1.0, 0.5)[index % 3]
        local = local_tensor(t)
        rows = t.shape[0]
        for chunk in local_chunks(t):
            lo, n = chunk.box.offsets[0], chunk.box.shape[0]
            for shard in range(saved_world):
                start, stop = _rows(rows, saved_world, shard)
                for g in {start, stop - 1} if stop > start else ():
                    if not lo <= g < lo + n:
                        continue
                    got = float(local[chunk.local[0].start + g - lo].reshape(-1)[0])
                    if got != sign * value(index, shard):
                        raise AssertionError(f"{name}: row {g} holds {got}, expected {sign * value(index, shard)}")


def plain_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state as one flat dict of contiguous plain tensors (for safetensors / torch.save)."""
    flat = {name: t for name, t in tensors(state)}
    for fqn, s in state["optimizer"]["state"].items():
        flat[f"{fqn}.step"] = s["step"]
    return flat
