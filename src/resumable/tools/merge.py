"""Full tensors from any checkpoint: unified folders (``resumable merge``) and HuggingFace exports.

Both write HuggingFace-style safetensors (``model.safetensors`` or shards plus
``model.safetensors.index.json``) through :func:`resumable.formats.hf.write_hf_folder`,
assembling one tensor at a time from its chunks, so memory is bounded by the largest
tensor. They write into a hidden temporary folder beside ``out`` of their own
(``commit.new_output_dir``) and commit it with ``commit.publish_output_dir`` (every file
and the folder fsynced, renamed, the parent fsynced): neither an interrupted run nor a
power loss leaves a folder that looks complete.

- *unified* keeps every tensor (model and optimizer state) and the training context
  (``common.json``), so ``resumable split`` can turn it back into the same checkpoint;
- *hf* keeps the model's parameters only (``lm_head.weight`` is left out when the
  embeddings are tied, as ``save_pretrained`` does) plus ``config.json``, and loads with
  ``transformers``' ``from_pretrained``.

Example::

    merge(open_source("output/checkpoint"), "unified/")
    export_hf(open_source("output/checkpoint"), "hf/", hf_config)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from resumable import commit
from resumable.formats import hf, v2
from resumable.sources import Source, SourceTensor

__all__ = ["export_hf", "merge"]

DEFAULT_SHARD = 5 << 30


def _write(out: Path, config: dict[str, Any], tensors: list[SourceTensor], common: dict[str, Any] | None,
           max_shard_size: int, dtype: torch.dtype | None, progress: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder or delete it")

    def cast(t: SourceTensor) -> torch.dtype:
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    by_name = {t.name: t for t in tensors}
    temp = commit.new_output_dir(out)
    with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=f"writing {out.name}",
              disable=not progress) as bar:
        def get(name: str) -> torch.Tensor:
            t = by_name[name]
            data = t.read().to(cast(t))
            bar.update(t.nbytes)
            return data
        try:
            hf.write_hf_folder(temp, config, [(t.name, cast(t), t.shape) for t in tensors], get, max_shard_size)
            if common is not None:
                (temp / v2.COMMON).write_bytes(v2.common_bytes(common))
            commit.publish_output_dir(temp, out)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return out


def merge(source: Source, out: str | os.PathLike[str], *, max_shard_size: int = DEFAULT_SHARD,
          dtype: torch.dtype | None = None, progress: bool = False) -> Path:
    """Write every tensor of ``source`` in full, plus its ``common.json`` (a *unified* checkpoint).

    Args:
        source: any checkpoint (:func:`resumable.sources.open_source`).
        out: a new (or empty) folder.
        max_shard_size: bytes per safetensors shard (a larger tensor gets a shard alone).
        dtype: cast floating-point tensors to this dtype.
        progress: show a progress bar (bytes written).

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` exists and is not empty.

    Example::

        merge(open_source("output/checkpoint/iteration_00000100"), "unified/", progress=True)
    """
    common = dict(source.common)
    if source.iteration is not None:
        common.setdefault("iteration", source.iteration)
    if source.layout is not None:
        common["source_layout"] = source.layout
    return _write(Path(out), source.model_config or {}, list(source.tensors.values()), common,
                  max_shard_size, dtype, progress)


def export_hf(source: Source, out: str | os.PathLike[str], config: dict[str, Any], *,
              max_shard_size: int = DEFAULT_SHARD, dtype: torch.dtype | None = None,
              progress: bool = False) -> Path:
    """Write the model parameters of ``source`` as a HuggingFace folder with ``config``.

    Args:
        source: any checkpoint.
        out: a new (or empty) folder.
        config: the ``config.json`` content (see ``resumable.train.model.hf_config``).
        max_shard_size, dtype, progress: as :func:`merge`.

    Raises:
        FileExistsError: ``out`` exists and is not empty.

    Example::

        export_hf(open_source("output/checkpoint"), "hf/", hf_config(cfg.model))
    """
    tensors = [t for t in source.tensors.values() if t.kind == "model"]
    if config.get("tie_word_embeddings"):
        tensors = [t for t in tensors if t.name != "lm_head.weight"]
    return _write(Path(out), config, tensors, None, max_shard_size, dtype, progress)
