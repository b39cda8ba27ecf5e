"""Checkpoint 1.0 strategy files: placements to and from JSON, and the check that a strategy describes the files.

A conversion trusts the source layout given by ``src_strategy_path_or_dir`` only once
every chunk of the files is where that strategy puts it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError
from resumable.formats import v1
from resumable.geometry import Box
from resumable.layout import placement_chunks
from resumable.legacy.files import RankFiles, local_path


def placement_json(p: Placement) -> list:
    """A placement as a strategy file records it (:func:`_placement` reads it back)."""
    if isinstance(p, Replicate):
        return ["R"]
    if hasattr(p, "split_factor"):
        return ["SS", int(p.dim), int(p.split_factor)]
    if isinstance(p, Shard):
        return ["S", int(p.dim)]
    raise ValueError(f"cannot record placement {p!r} in a strategy file")


def _placement(j: Sequence[Any]) -> Placement:
    from torch.distributed.tensor.placement_types import _StridedShard

    kind = j[0] if j else None
    if kind == "R":
        return Replicate()
    if kind == "S":
        return Shard(int(j[1]))
    if kind == "SS":
        return _StridedShard(int(j[1]), split_factor=int(j[2]))
    raise CorruptCheckpointError(f"unknown placement {j!r} in a strategy file")


def _derived_boxes(doc: Mapping[str, Any], rank: int, where: str) -> dict[str, set[Box]]:
    """Boxes every tensor of a single-file strategy has on ``rank`` (no pipeline split)."""
    root = doc["layout"].get("mesh") or {}
    names, sizes = list(root), list(root.values())
    coord, rest = {}, rank
    for n, s in reversed(list(zip(names, sizes))):
        coord[n], rest = rest % s, rest // s
    out = {}
    for tname, t in doc["tensors"].items():
        shape = t["global_shape"]
        if not t.get("placements"):
            out[tname] = {Box.full(shape)}
            continue
        mesh = t["mesh"]
        if not mesh or not mesh["dim_names"] or any(n not in coord for n in mesh["dim_names"]):
            raise CorruptCheckpointError(
                f"{where}: tensor {tname!r} sits on a mesh whose dims are not named in the layout's mesh; pass the "
                "strategy folder as src_strategy_path_or_dir")
        sub = [coord[n] for n in mesh["dim_names"]]
        chunks = placement_chunks(shape, [_placement(p) for p in t["placements"]], mesh["shape"], sub)
        out[tname] = {c.box for c in chunks}  # a set: each stored box is looked up once
    return out


def check_strategy(src: str | os.PathLike[str], files: RankFiles, names: Sequence[str]) -> None:
    """Check that ``src_strategy_path_or_dir`` describes the source files ``names`` (by source rank).

    A folder must hold every source rank's strategy; a single file suffices when the source
    had no pipeline split (every rank's boxes follow from the placements and the mesh).

    Raises:
        NotImplementedYet: ``src`` is an ``s3://`` path.
        CheckpointNotFoundError: a source rank's strategy file is missing.
        CorruptCheckpointError: the strategy's world size or boxes differ from the files.
    """
    found = v1.strategy_files(local_path(src, "src_strategy_path_or_dir"))
    docs = {r: v1.read_strategy(p) for r, p in found.items()}
    single = len(docs) == 1 and len(names) > 1
    first = next(iter(docs.values()))
    if first["world_size"] != len(names):
        raise CorruptCheckpointError(f"src_strategy_path_or_dir {src} describes {first['world_size']} rank(s) but "
                                     f"the checkpoint has {len(names)}; give the strategy of the job that wrote it")
    if single and int(first["layout"].get("pipeline_stages", 1)) > 1:
        raise CheckpointNotFoundError(
            f"src_strategy_path_or_dir {src} is one file but the source had {first['layout']['pipeline_stages']} "
            "pipeline stages; pass the whole strategy folder")
    for rank, name in enumerate(names):
        if single:
            expected = _derived_boxes(first, rank, str(found[next(iter(docs))]))
        elif rank in docs:
            expected = {t: {Box(tuple(c["offsets"]), tuple(c["shape"])) for c in e["chunks"]}
                        for t, e in docs[rank]["tensors"].items()}
        else:
            raise CheckpointNotFoundError(f"src_strategy_path_or_dir {src} has no {v1.strategy_file_name(rank)}")
        for key, (tname, _, offsets) in files.open(name).chunks.items():
            shape = files.entries[name][key][1]
            if Box(offsets, shape) not in expected.get(tname, ()):
                raise CorruptCheckpointError(
                    f"{files.root / name} holds {tname!r} at {list(offsets)} of shape {list(shape)}, which the "
                    f"strategy {src} does not give rank {rank}; src_strategy_path_or_dir must describe the layout "
                    "that wrote this checkpoint")
