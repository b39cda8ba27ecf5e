"""HuggingFace model folders: read the config and a tensor index, write sharded safetensors.

A HuggingFace folder holds ``config.json`` and either ``model.safetensors`` or shards
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {tensor: file}}``).

Reading gives an index ``name → HFTensor(file, dtype, shape)`` built from the
safetensors headers only, so each rank reads just the slices it needs
(:func:`read_hf_box`: the rows a region spans, through the storage layer: a local folder or an
``s3://`` prefix). The config comes back as
the plain dict of ``config.json``: this library must not import the trainer, so the
trainer maps it onto its own ``ModelConfig``.

Writing streams: the caller gives every tensor's name, dtype and shape up front and a
function returning one tensor at a time, so memory stays bounded by the largest
tensor, not by the shard size.

Example::

    index = index_hf_folder("Qwen3-0.6B")
    w = read_hf_box(index["model.norm.weight"], Box((0,), (64,)))
    specs = [(n, t.dtype, t.shape) for n, t in index.items()]
    write_hf_folder("out", read_hf_config("Qwen3-0.6B"), specs,
                    lambda n: read_hf_box(index[n], Box.full(index[n].shape)), max_shard_size=2**30)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from resumable import storage
from resumable.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from resumable.formats.jsonfile import load_json_object
from resumable.storage import AnyPath, ObjectPath
from resumable.storage.local import check_regular
from resumable.formats.schema import need_int, need_number, need_type, shown
from resumable.formats.safetensors_io import read_header, read_region, stored_entry, write_file_streaming
from resumable.geometry import Box

__all__ = [
    "CONFIG",
    "INDEX",
    "SINGLE",
    "HFTensor",
    "index_hf_folder",
    "read_hf_box",
    "load_json_object",
    "read_stored",
    "read_hf_config",
    "safe_member",
    "safetensors_header",
    "write_hf_folder",
]

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype strings → torch dtypes."""

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class HFTensor:
    """One tensor of a HuggingFace folder: the file holding it, its dtype and shape."""

    name: str
    file: AnyPath
    dtype: torch.dtype
    shape: tuple[int, ...]


def safe_member(folder: AnyPath, name: object, what: str) -> AnyPath:
    """``folder / name`` for a bare file name read from metadata, refusing anything that escapes.

    Raises:
        UnsafeCheckpointError: ``name`` is not a non-empty string, is ``.``/``..``, holds a
            path separator or NUL, resolves (through symlinks) outside ``folder``, or is
            not a regular file (a FIFO or a device would block or never end).

    Example::

        safe_member(Path("ckpt"), "model-00001-of-00002.safetensors", "weight_map entry")
    """
    if (not isinstance(name, str) or name in ("", ".", "..")
            or any(c in name for c in ("/", "\\", "\0")) or os.path.isabs(name)):
        raise UnsafeCheckpointError(
            f"{what} {shown(name)} in {folder} is not a bare file name inside the checkpoint folder; refusing to "
            "open it")
    path = folder / name
    if isinstance(path, ObjectPath):  # a bare name under a prefix: nothing to resolve, nothing special
        return path
    try:
        inside = path.resolve().parent == folder.resolve()
        present = path.exists()
    except OSError as exc:  # a name too long for the file system, a symlink loop ...
        raise UnsafeCheckpointError(f"{what} {shown(name)} in {folder} cannot be resolved ({exc.strerror}); "
                                    "refusing to open it (the metadata is damaged or forged)") from None
    if not inside:
        raise UnsafeCheckpointError(f"{what} {shown(name)} in {folder} resolves outside the folder; refusing to "
                                    "open it")
    if present:  # a missing file is the caller's to report, with what names it
        check_regular(path, what)
    return path


def read_hf_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a HuggingFace folder, as a plain dict (its sizes and numbers checked).

    Raises:
        CheckpointNotFoundError: no config.json.
        CorruptCheckpointError / UnsafeCheckpointError: not a bounded JSON object, or a size
            (``hidden_size`` ...) that is not a positive integer, a non-finite ``rope_theta`` ...

    Example::

        read_hf_config("Qwen3-0.6B")["num_key_value_heads"]    # 8
    """
    path = storage.as_path(folder) / CONFIG
    config = load_json_object(path, "HuggingFace config")
    for key in _CONFIG_SIZES:
        if config.get(key) is not None:
            need_int(config, key, str(path), minimum=1, maximum=_MAX_SIZE)
    for key in _CONFIG_NUMBERS:
        if config.get(key) is not None:
            need_number(config, key, str(path))
    for key in ("rope_parameters", "rope_scaling"):
        need_type(config, key, str(path), (dict, type(None)), default=None)
    return config


#: config.json sizes the trainer builds a model from (each must be a positive int when present).
_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")
_CONFIG_NUMBERS = ("rms_norm_eps", "rope_theta")
_MAX_SIZE = 1 << 31  # far above any real model: a size above it is damage, and would be allocated


def safetensors_header(path: AnyPath) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name → (dtype, shape) of every tensor of a safetensors file (or object), from its header only.

    Raises:
        UnsafeCheckpointError: not a regular file (a FIFO would block).
        CorruptCheckpointError: not a readable safetensors file, or an unsupported dtype.
    """
    if isinstance(path, Path):
        check_regular(path, "safetensors file")  # kept apart: a FIFO is unsafe, not unreadable
    try:
        header = read_header(path)
    except CorruptCheckpointError as e:  # a hostile header length (UnsafeCheckpointError) too
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    out = {}
    for key, entry in header.tensors.items():
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} has unsupported dtype {entry.dtype}")
        out[key] = (SAFETENSORS_DTYPES[entry.dtype], entry.shape)
    return out


def index_hf_folder(folder: str | os.PathLike[str]) -> dict[str, HFTensor]:
    """Index the tensors of a HuggingFace folder from its safetensors headers.

    Raises:
        CheckpointNotFoundError: neither ``model.safetensors`` nor the index exists, or a
            shard named by the index is missing.
        UnsafeCheckpointError: the index names a file outside the folder.
        CorruptCheckpointError: a malformed index, or a tensor missing from the shard the
            index names.

    Example::

        index_hf_folder("Qwen3-0.6B")["lm_head.weight"].shape     # (151936, 1024)
    """
    folder = storage.as_path(folder)
    if storage.is_file(folder / INDEX):
        weight_map = load_json_object(folder / INDEX, "HuggingFace index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"{folder / INDEX} has no \"weight_map\" object")
    elif storage.is_file(folder / SINGLE):
        weight_map = {name: SINGLE for name in safetensors_header(folder / SINGLE)}
    else:
        raise CheckpointNotFoundError(f"{folder} holds neither {SINGLE} nor {INDEX}; is it a HuggingFace model folder?")
    headers: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    index = {}
    for name, file_name in weight_map.items():
        path = safe_member(folder, file_name, "weight_map entry")
        if file_name not in headers:
            if not storage.is_file(path):
                raise CheckpointNotFoundError(f"shard {path} named by {folder / INDEX} does not exist")
            headers[file_name] = safetensors_header(path)
        if name not in headers[file_name]:
            raise CorruptCheckpointError(f"{folder / INDEX} puts tensor {name!r} in {file_name}, which does not hold it")
        dtype, shape = headers[file_name][name]
        index[name] = HFTensor(name, path, dtype, shape)
    return index


def read_hf_box(entry: HFTensor, box: Box) -> torch.Tensor:
    """Read the region ``box`` of one tensor, reading only those bytes.

    Example::

        rows = read_hf_box(index["lm_head.weight"], Box((0, 0), (1024, 1024)))
    """
    if not box.within(entry.shape):
        raise ValueError(f"{box} lies outside {entry.name!r} of shape {list(entry.shape)}")
    return read_stored(entry.file, entry.name, entry.dtype, entry.shape, box.slices_in(Box.full(entry.shape)))


def read_stored(path: AnyPath, key: str, dtype: torch.dtype | None, shape: Sequence[int],
                src: tuple[slice, ...]) -> torch.Tensor:
    """``stored[src]`` of ``key`` in a safetensors file or object, once its header stores ``key`` as ``dtype``
    (None: any) of ``shape``: only the rows of dim 0 that ``src`` spans are read, then sliced.

    Raises:
        CorruptCheckpointError: the header disagrees (file and key named), or the file ends early.
    """
    entry = stored_entry(read_header(path), key, dtype, shape)
    with storage.open_reader(path, "safetensors file") as reader:
        reader.random()
        return read_region(reader, entry, src).contiguous()


def _plan_shards(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int) -> list[list[int]]:
    """Indices of ``specs`` per shard, in order, each shard at most ``max_shard_size`` bytes
    unless a single tensor is larger (it then gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for k, (_, dtype, shape) in enumerate(specs):
        size = Box.full(shape).numel * dtype.itemsize
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += size
    return shards


def _write_safetensors(
    path: AnyPath,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    get: Callable[[str], torch.Tensor],
) -> None:
    """Write one safetensors file, each tensor as it is fetched: the checkpoint writer's, so the file
    is fsynced, carries block checksums, and a write error (a full disk) names it."""
    write_file_streaming(path, specs, get, {"format": "pt"})


def write_hf_folder(
    folder: str | os.PathLike[str],
    config: dict[str, Any] | None,
    specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    get: Callable[[str], torch.Tensor],
    max_shard_size: int = 5 << 30,
) -> list[AnyPath]:
    """Write a HuggingFace folder, fetching one tensor at a time.

    Tensors are stored in the order of ``specs``; one shard is written as
    ``model.safetensors`` with no index, several as ``model-0000k-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Files are written in place: the folder must
    be new or empty (an export tool renames it into place when done).

    Args:
        folder: the folder to create.
        config: the content of ``config.json``; None: no config.json (a model no mapping knows).
        specs: ``(name, dtype, shape)`` of every tensor, in file order.
        get: returns the tensor of a name; called once per name, in order.
        max_shard_size: shard size limit in bytes (a larger tensor gets a shard alone).

    Returns:
        The safetensors files written.

    Raises:
        FileExistsError: ``folder`` exists and is not empty.
        ValueError: a duplicate name, an unsupported dtype, or ``get`` returned a tensor
            other than announced.

    Example::

        state = model.state_dict()
        write_hf_folder("out", model.config.to_dict(),
                        [(n, t.dtype, t.shape) for n, t in state.items()], state.__getitem__)
    """
    folder = storage.as_path(folder)
    if storage.list_dir(folder):
        raise FileExistsError(f"{folder} is not empty; write a HuggingFace folder into a new or empty folder")
    plain = [(name, dtype, tuple(int(s) for s in shape)) for name, dtype, shape in specs]
    names = [name for name, _, _ in plain]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")
    unsupported = sorted({str(dtype) for _, dtype, _ in plain if dtype not in _DTYPE_CODES})
    if unsupported:
        raise ValueError(f"safetensors cannot store {unsupported}")
    storage.make_dirs(folder)
    if config is not None:
        storage.write_atomic(folder / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    shards = _plan_shards(plain, max_shard_size)
    files = [folder / SINGLE] if len(shards) == 1 else [
        folder / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    for path, members in zip(files, shards):
        _write_safetensors(path, [plain[k] for k in members], get)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(Box.full(s).numel * d.itemsize for _, d, s in plain)},
            "weight_map": {plain[k][0]: path.name for path, members in zip(files, shards) for k in members},
        }
        storage.write_atomic(folder / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return files
