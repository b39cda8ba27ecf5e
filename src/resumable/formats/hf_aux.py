"""The files of a HuggingFace folder beside its weights and config.json, carried through every conversion.

A model folder holds, besides ``config.json`` and the safetensors, the generation settings
and the tokenizer (:data:`NAMES`). Every conversion copies them byte for byte, so that
HF → v2 → HF (or → legacy → HF) gives back a folder ``transformers`` and ``tokenizers`` load
as the original:

==================  ============================================  =========================
written as          where the files are                           what vouches for them
==================  ============================================  =========================
v2 iteration        ``iteration_*/hf/``                           ``common.json`` ``state.hf_files``
legacy tree         ``<root>/hf/`` (beside ``rank_*``)            the step file's ``state.hf_files``
unified folder      the folder itself (HF's layout)               ``common.json`` ``state.hf_files``
HuggingFace folder  the folder itself                             nothing (as HF's own)
==================  ============================================  =========================

``state.hf_files`` is ``{name: {"size": int, "xxh3_64": "<16 hex>"}}``; the record sits in
JSON that is itself sealed (metadata.json records common.json's checksum; a legacy step
file's checksum is in its ``meta.json``), so ``verify`` detects any damaged or missing
file, and a copy from a damaged file is refused. ``config.json`` itself travels as
``state.model_config`` (the dict the trainer records too).

Example::

    files = find(Path("Qwen3-0.6B"))                # {"tokenizer.json": AuxFile(...), ...}
    record = copy(files, Path("out/iteration_00000000/hf"))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import xxhash

from resumable import storage
from resumable.errors import CorruptCheckpointError
from resumable.formats.hf import safe_member
from resumable.formats.jsonfile import read_bounded
from resumable.storage import AnyPath

__all__ = ["FOLDER", "NAMES", "STATE_KEY", "AuxFile", "copy", "find", "problems", "recorded", "with_record"]

NAMES: tuple[str, ...] = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
"""What ``save_pretrained`` of a model's generation config and tokenizer writes."""

FOLDER = "hf"
"""Their sub-folder in a v2 iteration or a legacy tree."""

STATE_KEY = "hf_files"
"""Their record in the saved state (``common.json["state"]``, a legacy file's context state)."""

MAX_BYTES = 1 << 30
"""Largest file copied (a tokenizer.json is ~10 MB)."""

_HEX16 = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class AuxFile:
    """One file to carry: where it is and, when a record vouches for it, its size and xxh3-64."""

    path: AnyPath
    size: int | None = None
    xxh3_64: str | None = None

    def read(self) -> bytes:
        """Its bytes, checked against the record.

        Raises:
            CorruptCheckpointError: its size or checksum differs from the record (or it is missing).
        """
        try:
            data = read_bounded(self.path, "HuggingFace file", MAX_BYTES)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{self.path}: missing, though the checkpoint records it; restore it "
                                         "or convert another iteration") from None
        if self.xxh3_64 is not None:
            found = xxhash.xxh3_64_hexdigest(data)
            if (len(data), found) != (self.size, self.xxh3_64):
                raise CorruptCheckpointError(
                    f"{self.path}: {len(data)} bytes with xxh3-64 {found}, but the checkpoint records {self.size} "
                    f"bytes with {self.xxh3_64}; the file is damaged: restore it or convert another iteration")
        return data


def find(folder: AnyPath) -> dict[str, AuxFile]:
    """The files of :data:`NAMES` a HuggingFace folder holds (nothing vouches for them).

    Raises:
        UnsafeCheckpointError: one resolves outside the folder or is not a regular file.
    """
    return {name: AuxFile(safe_member(folder, name, "HuggingFace file"))
            for name in NAMES if storage.exists(folder / name)}


def recorded(folder: AnyPath, record: object, where: str) -> dict[str, AuxFile]:
    """The files ``record`` (a ``state.hf_files`` value, None: none) lists, in ``folder``.

    Raises:
        CorruptCheckpointError: the record is malformed (``where`` names the JSON holding it).
        UnsafeCheckpointError: a listed file resolves outside ``folder``.
    """
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CorruptCheckpointError(f"{where}: state.{STATE_KEY} is {type(record).__name__}, not an object; "
                                     "the checkpoint is damaged")
    out = {}
    for name, entry in record.items():
        ok = isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0 \
            and isinstance(entry.get("xxh3_64"), str) and _HEX16.fullmatch(entry["xxh3_64"])
        if name not in NAMES or not ok:
            raise CorruptCheckpointError(
                f"{where}: state.{STATE_KEY} entry {name!r}: {entry!r} must be one of {', '.join(NAMES)} with its "
                "size (int) and xxh3_64 (16 hex digits); the checkpoint is damaged")
        out[name] = AuxFile(safe_member(folder, name, "HuggingFace file"), entry["size"], entry["xxh3_64"])
    return out


def copy(files: Mapping[str, AuxFile], dest: AnyPath) -> dict[str, dict[str, Any]]:
    """Copy ``files`` into ``dest`` (created; each file written whole, durably); returns their record.

    The caller fsyncs ``dest`` itself (``resumable.commit``: the folder fsyncs of a commit).

    Raises:
        CorruptCheckpointError: a source file differs from its record (nothing of it is written).
    """
    record = {}
    if files:
        storage.make_dirs(dest)
    for name, aux in sorted(files.items()):
        data = aux.read()
        storage.write_atomic(dest / name, data)  # durable before the commit that records it
        record[name] = {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    return record


def problems(files: Mapping[str, AuxFile], *, checksum: bool = True) -> list[tuple[str, str]]:
    """``(path, what is wrong)`` for each recorded file that is missing, of another size or (with
    ``checksum``) of another xxh3-64 than its record; files no record vouches for are not judged."""
    out = []
    for aux in files.values():
        if aux.xxh3_64 is None:
            continue
        try:
            if checksum:
                aux.read()
            elif (entry := storage.stat(aux.path)) is None:
                out.append((str(aux.path), f"{aux.path}: missing, though the checkpoint records it; restore it"))
            elif entry.size != aux.size:
                out.append((str(aux.path), f"{entry.size} bytes, but the checkpoint records {aux.size}; the file "
                                           "is damaged: restore it"))
        except (CorruptCheckpointError, OSError) as exc:
            out.append((str(aux.path), str(exc)))
    return out


def with_record(state: Mapping[str, Any] | None, record: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``state`` whose :data:`STATE_KEY` is ``record`` (left out when empty: a source's stale
    record never travels into an output without its files)."""
    out = {k: v for k, v in (state or {}).items() if k != STATE_KEY}
    if record:
        out[STATE_KEY] = record
    return out
