"""MindSpore strategy files (``strategy/ckpt_strategy_rank_{r}.ckpt``): how a legacy job split each parameter.

A tensor- or pipeline-parallel MindSpore / MindFormers job saves each rank's *slices*
and, beside them, one strategy file per rank: a serialized ``mindspore.straspb``
``ParallelStrategyMap`` (read here with :mod:`resumable.formats.protowire`, no
protobuf), or JSON of the same content when the name ends in ``.json``. Only
``parallel_layout_item`` matters for checkpoints::

    ParallelLayoutItem { param_name = 1 (string); parallel_layouts = 2 }
    ParallelLayouts    { dev_matrix = 1, tensor_map = 2, param_split_shape = 3, indices_offset = 4
                         (each repeated {repeated dim = 1}); field = 5, opt_weight_shard_step = 6,
                         opt_weight_shard_size = 7 (int32) }

What a layout means, as MindSpore's own merge (``merge_sliced_parameter``,
``_reshape_param_data``, ``_construct_tensor_layout_for_opt_shard``) applies it:

- ``dev_matrix`` D: the devices of one pipeline stage, row-major (rank ``r`` of the job is
  device ``r % prod(D)`` of its stage). ``tensor_map`` M: dimension ``i`` is split
  ``D[len(D)-1-M[i]]`` ways over that axis, ``-1`` not split. Axes no dimension maps to
  are replicas.
- Two conventions, normalised here to the first: MindSpore's C++ writer removes size-1
  axes and writes -1; MindFormers' Python writer keeps them (``D = [dp, *shard]``,
  ``M = [n-1, ..., 0]``) and puts the global shape in ``param_split_shape``.
- ``opt_weight_shard_size`` k > 0 (``-1``: the whole replica group, ``prod(D) / step``):
  optimizer parallelism. ``opt_weight_shard_step`` must equal the number of model-parallel
  slices; the ranks ``step`` apart holding one slice split its dimension 0 further into
  k consecutive parts, rank ``r`` holding part ``(r // step) % k``.
- ``param_split_shape`` with ``indices_offset`` (C++ writer, manual split): the slices
  along dimension 0 are uneven, slice ``s`` having ``param_split_shape[s]`` rows from row
  ``indices_offset[s]``.

Everything read is checked (sizes capped, every value's type and range); errors name
the file, the parameter and the field.

Example::

    layouts = read_ms_strategy("output/strategy")          # merged over every rank's file
    w = layouts["fc1.weight"]
    w.global_shape((8, 16))                                # (16, 16) on a row split over 2
    w.rank_box(1, (8, 16))                                 # Box(offsets=(8, 0), shape=(8, 16))
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Iterable

from resumable import storage
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, NotImplementedYet
from resumable.formats.jsonfile import files_in, parse_json_object, read_bounded
from resumable.formats.protowire import LENGTH, VARINT, Wire, WireError, as_int32, as_int64
from resumable.formats.schema import MAX_DIM, MAX_NDIM, is_int, shown
from resumable.geometry import Box
from resumable.storage import AnyPath

__all__ = ["ParamLayout", "STRATEGY_FILE", "read_ms_strategy", "read_ms_strategy_file"]

STRATEGY_FILE = re.compile(r"^ckpt_strategy_rank_(\d+)\.(ckpt|json)$")
"""Names of the strategy files of a folder (MindSpore's ``strategy_ckpt_save_file`` per rank)."""

MAX_STRATEGY_BYTES = 256 << 20
"""Largest strategy file parsed (a few hundred bytes per parameter)."""
MAX_PARAMS = 1 << 20
MAX_AXES = 32
MAX_DEVICES = 1 << 24
"""Most devices of one pipeline stage (the product of a dev_matrix)."""
MAX_SLICES = 1 << 16
"""Most entries of param_split_shape / indices_offset."""
MAX_NAME = 4096

_DIM_FIELDS = {1: "dev_matrix", 2: "tensor_map", 3: "param_split_shape", 4: "indices_offset"}
_INT_FIELDS = {5: "field", 6: "opt_weight_shard_step", 7: "opt_weight_shard_size"}
_STAGE_PREFIX = re.compile(r"^(\d+)-(.+)$")  # names in a file merged by merge_pipeline_strategys: "1-fc2.weight"


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter was split, both writers' conventions normalised to the C++ writer's.

    ``dev_matrix`` has no size-1 axis, ``tensor_map`` holds ``-1`` for unsplit dims,
    ``param_split_shape`` / ``indices_offset`` are empty unless dimension 0 is split
    unevenly, ``opt_shard_size`` is 0 without optimizer parallelism (``-1`` resolved),
    ``tensor_shape`` is the global shape when the file records it.
    """

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[int, ...]
    param_split_shape: tuple[int, ...] = ()
    indices_offset: tuple[int, ...] = ()
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    field: int = 0
    tensor_shape: tuple[int, ...] | None = None
    source: str = dataclass_field(default="", compare=False, repr=False)
    """``"<file>: parameter '<name>'"``, for messages."""

    @property
    def devices(self) -> int:
        """Devices of one pipeline stage (the ranks ``r`` with the same ``r // devices`` share a stage)."""
        return math.prod(self.dev_matrix)

    @property
    def splits(self) -> tuple[int, ...]:
        """Model-parallel pieces along each dimension (optimizer parallelism not counted)."""
        return tuple(1 if k == -1 else self.dev_matrix[len(self.dev_matrix) - 1 - k] for k in self.tensor_map)

    @property
    def is_split(self) -> bool:
        """Whether ranks hold different parts (else every rank holds the whole tensor)."""
        return any(s > 1 for s in self.splits) or self.opt_shard_size > 1

    def global_shape(self, slice_shape: Iterable[int]) -> tuple[int, ...]:
        """The whole tensor's shape, given the shape of a slice a rank's file holds.

        Raises:
            CorruptCheckpointError: the slice has the wrong number of dims, or does not
                give the global shape the file records.
            NotImplementedYet: a ``field`` split.
        """
        slice_shape = self._checked(slice_shape)
        shape = [s * k for s, k in zip(slice_shape, self.splits)]
        if shape and self.opt_shard_size:
            shape[0] *= self.opt_shard_size
        if self.param_split_shape:
            shape[0] = sum(self.param_split_shape)
        if any(d > MAX_DIM for d in shape):
            raise CorruptCheckpointError(f"{self.source}: slice {list(slice_shape)} times the split {list(self.splits)} "
                                         f"exceeds {MAX_DIM} elements along a dim; the strategy does not fit the files")
        if self.tensor_shape is not None and tuple(shape) != self.tensor_shape:
            raise CorruptCheckpointError(
                f"{self.source}: a slice of shape {list(slice_shape)} split {self._split_text()} gives "
                f"{shape}, but the strategy records the global shape {list(self.tensor_shape)} (it does not divide "
                "evenly or the slice is not this job's); use the strategy files of the job that wrote the checkpoint")
        return tuple(shape)

    def rank_box(self, rank: int, slice_shape: Iterable[int]) -> Box:
        """Where the slice of job rank ``rank`` (``rank_{rank}``) lies in the global tensor.

        Raises:
            As :meth:`global_shape`; also CorruptCheckpointError when an uneven split
            gives that rank's slice another number of rows.

        Example::

            ParamLayout((2, 2), (1, -1)).rank_box(2, (4, 8))    # Box(offsets=(4, 0), shape=(4, 8))
        """
        slice_shape = self._checked(slice_shape)
        if not is_int(rank) or rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
        local = rank % self.devices
        coord, stride = [0] * len(self.dev_matrix), 1
        for j in reversed(range(len(self.dev_matrix))):  # row-major: the last axis varies fastest
            coord[j] = local // stride % self.dev_matrix[j]
            stride *= self.dev_matrix[j]
        at = [c * s for c, s in zip(self._coords(coord), slice_shape)]
        if at and self.opt_shard_size:
            part = local // self.opt_shard_step % self.opt_shard_size  # nested inside the model-parallel slice
            at[0] = (at[0] * self.opt_shard_size) + part * slice_shape[0]
        if self.param_split_shape:
            piece = self._coords(coord)[0]
            if slice_shape[0] != self.param_split_shape[piece]:
                raise CorruptCheckpointError(
                    f"{self.source}: rank {rank} holds slice {piece} of dim 0, which param_split_shape gives "
                    f"{self.param_split_shape[piece]} rows, but its file holds {slice_shape[0]}")
            at[0] = self.indices_offset[piece]
        return Box(tuple(at), slice_shape)

    def _coords(self, coord: list[int]) -> list[int]:
        """The slice coordinate along each tensor dim of a device at ``coord``."""
        return [0 if k == -1 else coord[len(self.dev_matrix) - 1 - k] for k in self.tensor_map]

    def _split_text(self) -> str:
        opt = f", dim 0 again {self.opt_shard_size} ways (optimizer parallelism)" if self.opt_shard_size else ""
        return f"{list(self.splits)}{opt}"

    def _checked(self, slice_shape: Iterable[int]) -> tuple[int, ...]:
        slice_shape = tuple(slice_shape)
        if self.field:
            raise NotImplementedYet(f"{self.source}: a 'field' split (field {self.field}, EmbeddingLookup's "
                                    "field slicing) of a MindSpore strategy file")
        if len(slice_shape) != len(self.tensor_map):
            raise CorruptCheckpointError(
                f"{self.source}: the files hold a {len(slice_shape)}-D slice {list(slice_shape)} but the strategy's "
                f"tensor_map {list(self.tensor_map)} has {len(self.tensor_map)} dims; use the strategy files of the "
                "job that wrote the checkpoint")
        return slice_shape


# ---------------------------------------------------------------- reading


def read_ms_strategy(path_or_dir: str | os.PathLike[str] | storage.ObjectPath) -> dict[str, ParamLayout]:
    """The layouts of a strategy file, or of every ``ckpt_strategy_rank_*.ckpt|.json`` of a folder, merged.

    Pipeline stages each have their own files; merging gives every stage's parameters.
    Parameter names of a file merged by MindSpore's ``merge_pipeline_strategys``
    (``"1-fc2.weight"``) lose their stage prefix.

    Raises:
        CheckpointNotFoundError: the path does not exist, or the folder holds no strategy file.
        UnsafeCheckpointError: a file is not a regular file, is too large, or resolves outside the folder.
        CorruptCheckpointError: a damaged file, a value of the wrong type or range, or two
            files that disagree on a parameter (both named).
        NotImplementedYet: an uneven split of a dim other than 0, or an optimizer shard of
            a layout MindSpore's merge does not define.

    Example::

        read_ms_strategy("output/strategy")["decoder.layers.0.mlp.linear_fc1.weight"].splits   # (2, 1)
    """
    path = storage.as_path(path_or_dir)
    files = [path] if storage.is_file(path) else _strategy_files(path)
    merged: dict[str, ParamLayout] = {}
    for file in files:
        for name, layout in read_ms_strategy_file(file).items():
            merged[name] = _agree(merged[name], layout, name) if name in merged else layout
    return merged


def _strategy_files(folder: AnyPath) -> list[AnyPath]:
    if not storage.is_dir(folder):
        raise CheckpointNotFoundError(f"strategy path {folder} does not exist; point it at the source job's "
                                      "<output_dir>/strategy folder or one of its ckpt_strategy_rank_*.ckpt files")
    found = {(int(m.group(1)), entry.name): entry for m, entry in files_in(folder, STRATEGY_FILE)}
    if not found:
        raise CheckpointNotFoundError(f"strategy folder {folder} holds no ckpt_strategy_rank_N.ckpt (or .json) file")
    return [found[key] for key in sorted(found)]


def _agree(a: ParamLayout, b: ParamLayout, name: str) -> ParamLayout:
    """One layout for a parameter two files give; a recorded global shape is kept."""
    if a.tensor_shape is None:
        a = _with_shape(a, b.tensor_shape)
    if b.tensor_shape is None:
        b = _with_shape(b, a.tensor_shape)
    if a != b:
        raise CorruptCheckpointError(
            f"strategy files disagree on parameter {name!r}: {_describe(a)} in {a.source.rsplit(': ', 1)[0]} but "
            f"{_describe(b)} in {b.source.rsplit(': ', 1)[0]}; the strategy files of one job agree on every "
            "parameter they share: are they from two jobs?")
    return a


def _with_shape(layout: ParamLayout, shape: tuple[int, ...] | None) -> ParamLayout:
    return ParamLayout(layout.dev_matrix, layout.tensor_map, layout.param_split_shape, layout.indices_offset,
                       layout.opt_shard_step, layout.opt_shard_size, layout.field, shape, layout.source)


def _describe(layout: ParamLayout) -> str:
    text = f"dev_matrix {list(layout.dev_matrix)} tensor_map {list(layout.tensor_map)}"
    if layout.opt_shard_size:
        text += f" opt_weight_shard {layout.opt_shard_step}x{layout.opt_shard_size}"
    if layout.param_split_shape:
        text += f" param_split_shape {list(layout.param_split_shape)}"
    if layout.tensor_shape is not None:
        text += f" shape {list(layout.tensor_shape)}"
    return text


def read_ms_strategy_file(path: str | os.PathLike[str] | storage.ObjectPath) -> dict[str, ParamLayout]:
    """The layouts of one strategy file: protobuf, or JSON when the name ends in ``.json`` (as MindSpore decides).

    Raises:
        As :func:`read_ms_strategy`.
    """
    path = storage.as_path(path)
    data = read_bounded(path, "MindSpore strategy file", MAX_STRATEGY_BYTES)
    if not data:
        raise CorruptCheckpointError(f"MindSpore strategy file {path} is empty; the strategy file is damaged")
    if path.suffix == ".json":
        items = _json_items(parse_json_object(data, f"MindSpore strategy file {path}"), path)
    elif data.lstrip()[:1] == b"{":
        raise CorruptCheckpointError(
            f"{path} holds JSON, not a protobuf ParallelStrategyMap: MindSpore reads a strategy file as JSON only "
            "when its name ends in .json (resumable's own legacy strategy files are read by the legacy loader)")
    else:
        try:
            items = _protobuf_items(data)
        except WireError as e:
            raise CorruptCheckpointError(f"corrupt MindSpore strategy file {path}: {e}") from None
    layouts: dict[str, ParamLayout] = {}
    for name, raw in items:
        where = f"{path}: parameter {shown(name)}"
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise CorruptCheckpointError(f"{where}: param_name must be a non-empty string of at most {MAX_NAME} "
                                         "characters; the strategy file is damaged")
        m = _STAGE_PREFIX.match(name)
        key = m.group(2) if m else name
        layout = _layout(raw, where)
        layouts[key] = _agree(layouts[key], layout, key) if key in layouts else layout
    return layouts


def _protobuf_items(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(param_name, raw layout)`` of each ``parallel_layout_item`` of a ParallelStrategyMap."""
    wire = Wire(data, 0, len(data))
    items = []
    while not wire.done():
        number, wire_type = wire.key()
        if number != 3:  # current_stage, parallel_strategy_item: not needed to place slices
            wire.skip(wire_type)
            continue
        if wire_type != LENGTH:
            raise WireError(f"parallel_layout_item #{len(items)} has wire type {wire_type}, expected a message")
        if len(items) >= MAX_PARAMS:
            raise WireError(f"more than {MAX_PARAMS} parallel_layout_item entries")
        items.append(_protobuf_item(wire.sub(), len(items)))
    return items


def _protobuf_item(wire: Wire, number: int) -> tuple[str, dict[str, Any]]:
    name, raw = None, None
    while not wire.done():
        field, wire_type = wire.key()
        if field == 1 and wire_type == LENGTH:
            name = wire.text()
        elif field == 2 and wire_type == LENGTH:
            raw = _protobuf_layouts(wire.sub(), f"parallel_layout_item #{number}"
                                                + ("" if name is None else f" (parameter {shown(name)})"))
        else:
            wire.skip(wire_type)
    if name is None or raw is None:
        missing = "param_name" if name is None else "parallel_layouts"
        raise WireError(f"parallel_layout_item #{number}{'' if name is None else f' ({shown(name)})'} has no {missing}")
    return name, raw


def _protobuf_layouts(wire: Wire, where: str) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    while not wire.done():
        field, wire_type = wire.key()
        if field in _DIM_FIELDS and wire_type == LENGTH:
            key = _DIM_FIELDS[field]
            if len(raw.setdefault(key, [])) >= 2:  # MindSpore writes one; two are refused in _one()
                raise WireError(f"{where}: more than two {key} entries")
            raw[key].append(_protobuf_dims(wire.sub(), key, where))
        elif field in _INT_FIELDS and wire_type == VARINT:
            value = as_int32(wire.varint())
            if value is None:
                raise WireError(f"{where}: {_INT_FIELDS[field]} is out of the int32 range")
            raw[_INT_FIELDS[field]] = value
        elif field in _DIM_FIELDS or field in _INT_FIELDS:
            raise WireError(f"{where}: field {field} has wire type {wire_type}")
        else:
            wire.skip(wire_type)
    return raw


def _protobuf_dims(wire: Wire, key: str, where: str) -> list[int]:
    """The ``dim`` values of one DevMatrix (uint32), TensorMap (int32) or ParamSplitShape (int64) message."""
    dims: list[int] = []
    limit = MAX_SLICES if key in ("param_split_shape", "indices_offset") else MAX_NDIM
    while not wire.done():
        field, wire_type = wire.key()
        if field != 1:
            wire.skip(wire_type)
            continue
        for value in wire.varints(wire_type):
            if key == "tensor_map":
                converted = as_int32(value)
            elif key == "dev_matrix":
                converted = value if value < 1 << 32 else None
            else:
                converted = as_int64(value)
            if converted is None:
                raise WireError(f"{where}: {key} value {value} is out of its type's range")
            dims.append(converted)
            if len(dims) > limit:
                raise WireError(f"{where}: {key} has more than {limit} values")
    return dims


def _json_items(doc: dict[str, Any], path: AnyPath) -> list[tuple[Any, dict[str, Any]]]:
    """MindSpore's JSON (``parallel_layout_item``: name → flat lists) or the protobuf's shape as JSON."""
    items = doc.get("parallel_layout_item")
    where = f"MindSpore strategy file {path}"
    if isinstance(items, dict):
        pairs = list(items.items())
    elif isinstance(items, list) and all(isinstance(i, dict) for i in items):
        pairs = [(i.get("param_name"), i.get("parallel_layouts")) for i in items]
    else:
        raise CorruptCheckpointError(f"{where}: 'parallel_layout_item' must be an object (name -> layout) or a list "
                                     f"of {{'param_name', 'parallel_layouts'}}, got {shown(items)}")
    out = []
    for name, layout in pairs:
        if not isinstance(layout, dict):
            raise CorruptCheckpointError(f"{where}: the layout of parameter {shown(name)} must be an object, "
                                         f"got {shown(layout)}")
        raw: dict[str, Any] = {key: value for key, value in layout.items() if key in _INT_FIELDS.values()}
        for key in (*_DIM_FIELDS.values(), "tensor_shape"):
            if key in layout:
                raw[key] = _json_dims(layout[key], f"{where}: parameter {shown(name)}: {key!r}")
        out.append((name, raw))
    return out


def _json_dims(value: Any, where: str) -> list[list[Any]]:
    """``[2, 4]`` (MindSpore's JSON) or ``[{"dim": [2, 4]}]`` (the protobuf's shape) → ``[[2, 4]]``."""
    if isinstance(value, list) and all(isinstance(v, dict) for v in value) and value:
        if not all(isinstance(v.get("dim"), list) for v in value):
            raise CorruptCheckpointError(f"{where} must hold {{'dim': [...]}} entries, got {shown(value)}")
        return [v["dim"] for v in value]
    if isinstance(value, list):
        return [value]
    raise CorruptCheckpointError(f"{where} must be a list, got {shown(value)}")


# ---------------------------------------------------------------- checking and normalising


def _one(raw: dict[str, Any], key: str, where: str, minimum: int, maximum: int, limit: int) -> tuple[int, ...] | None:
    """The single entry of a repeated dim field (None when absent), every value an int in range."""
    entries = raw.get(key, [])
    if len(entries) > 1:
        raise CorruptCheckpointError(f"{where}: {key} has {len(entries)} entries, MindSpore writes one; "
                                     "the strategy file is damaged")
    if not entries:
        return None
    values = entries[0]
    if len(values) > limit or not all(is_int(v) and minimum <= v <= maximum for v in values):
        raise CorruptCheckpointError(f"{where}: {key} must be at most {limit} integers in [{minimum}, {maximum}], "
                                     f"got {shown(values)}; the strategy file is damaged")
    return tuple(values)


def _int_field(raw: dict[str, Any], key: str, where: str, minimum: int, maximum: int) -> int:
    value = raw.get(key, 0)  # writers before optimizer parallelism have no opt_weight_shard_* fields
    if not is_int(value) or not minimum <= value <= maximum:
        raise CorruptCheckpointError(f"{where}: {key} must be an integer in [{minimum}, {maximum}], got {shown(value)}; "
                                     "the strategy file is damaged")
    return value


def _layout(raw: dict[str, Any], where: str) -> ParamLayout:
    damaged = "the strategy file is damaged"
    dev = _one(raw, "dev_matrix", where, 1, MAX_DEVICES, MAX_AXES)
    tmap = _one(raw, "tensor_map", where, -1, MAX_AXES - 1, MAX_NDIM)
    if dev is None or tmap is None:
        raise CorruptCheckpointError(f"{where}: {'dev_matrix' if dev is None else 'tensor_map'} is missing; {damaged}")
    if math.prod(dev) > MAX_DEVICES:
        raise CorruptCheckpointError(f"{where}: dev_matrix {list(dev)} has more than {MAX_DEVICES} devices; {damaged}")
    if any(k >= len(dev) for k in tmap):
        raise CorruptCheckpointError(f"{where}: tensor_map {list(tmap)} refers past dev_matrix {list(dev)} "
                                     f"(entries count axes from the right, 0 to {len(dev) - 1}); {damaged}")
    used = [k for k in tmap if k != -1]
    if len(used) != len(set(used)):
        raise CorruptCheckpointError(f"{where}: tensor_map {list(tmap)} splits two dims over one device axis; {damaged}")
    devices = math.prod(dev)
    split_shape = _one(raw, "param_split_shape", where, 0, MAX_DIM, MAX_SLICES) or ()
    offsets = _one(raw, "indices_offset", where, 0, MAX_DIM, MAX_SLICES) or ()
    recorded = _one(raw, "tensor_shape", where, 0, MAX_DIM, MAX_NDIM)
    field = _int_field(raw, "field", where, 0, MAX_DIM)
    step = _int_field(raw, "opt_weight_shard_step", where, 0, devices)
    size = _int_field(raw, "opt_weight_shard_size", where, -1, devices)
    dev, tmap = _normalised(dev, tmap)
    layout = ParamLayout(dev, tmap, source=where)
    splits = layout.splits
    if split_shape and not offsets:  # MindFormers' Python writer: the global shape
        if len(split_shape) != len(tmap) or (recorded is not None and recorded != split_shape):
            raise CorruptCheckpointError(
                f"{where}: param_split_shape {list(split_shape)} without indices_offset must be the global shape of "
                f"the {len(tmap)}-D parameter{'' if recorded is None else f' {list(recorded)}'}; {damaged}")
        recorded, split_shape = split_shape, ()
    elif split_shape or offsets:
        _check_uneven(split_shape, offsets, splits, where)
    if size == -1:
        size = devices // step if step else 0
    if not step or size <= 1:
        step = size = 0
    elif step != math.prod(splits) or devices % (step * size):
        raise CorruptCheckpointError(
            f"{where}: opt_weight_shard_step {step} and opt_weight_shard_size {size} do not fit a tensor split "
            f"{list(splits)} ({math.prod(splits)} slices) over {devices} devices: the step must be the number of "
            f"slices and step x size must divide the devices; {damaged}")
    elif split_shape:
        raise NotImplementedYet(f"{where}: an uneven param_split_shape together with optimizer parallelism")
    elif not _slices_rightmost(dev, tmap):
        raise NotImplementedYet(
            f"{where}: optimizer parallelism on tensor_map {list(tmap)} over dev_matrix {list(dev)}, whose split "
            "axes are not the rightmost device axes (MindSpore's merge places such optimizer shards differently)")
    return ParamLayout(dev, tmap, split_shape, offsets, step, size, field, recorded, where)


def _normalised(dev: tuple[int, ...], tmap: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The C++ writer's convention: size-1 axes dropped, dims mapped to one become -1."""
    kept = [j for j, d in enumerate(dev) if d > 1]
    position = {j: i for i, j in enumerate(kept)}
    out = []
    for k in tmap:
        j = len(dev) - 1 - k
        out.append(len(kept) - 1 - position[j] if k != -1 and j in position else -1)
    return tuple(dev[j] for j in kept), tuple(out)


def _slices_rightmost(dev: tuple[int, ...], tmap: tuple[int, ...]) -> bool:
    """Whether the split dims, in order, map to the rightmost device axes in order.

    MindSpore's merge of an optimizer shard (``_construct_tensor_layout_for_opt_shard``)
    numbers the model-parallel slices by ``rank % step``, row-major over the split
    counts; that is the layout's own numbering exactly then.
    """
    mapped = [k for k in tmap if k != -1]
    return mapped == list(range(len(mapped) - 1, -1, -1))


def _check_uneven(split_shape: tuple[int, ...], offsets: tuple[int, ...], splits: tuple[int, ...], where: str) -> None:
    if len(split_shape) != len(offsets):
        raise CorruptCheckpointError(f"{where}: param_split_shape has {len(split_shape)} entries but indices_offset "
                                     f"{len(offsets)}; the strategy file is damaged")
    if not splits or any(s > 1 for s in splits[1:]):
        raise NotImplementedYet(f"{where}: an uneven split (param_split_shape) of a tensor split {list(splits)}: only "
                                "uneven splits of dim 0 alone are read")
    if len(split_shape) != splits[0]:
        raise CorruptCheckpointError(f"{where}: param_split_shape has {len(split_shape)} entries for {splits[0]} "
                                     "slices of dim 0; the strategy file is damaged")
    starts = [sum(split_shape[:i]) for i in range(len(split_shape))]
    if list(offsets) != starts:
        raise CorruptCheckpointError(f"{where}: indices_offset {shown(list(offsets))} are not where the slices of "
                                     f"param_split_shape {shown(list(split_shape))} start ({shown(starts)}); "
                                     "the strategy file is damaged")
