"""Full tensors from any checkpoint: unified folders (``resumable merge``) and HuggingFace exports.

Both write HuggingFace-style safetensors (``model.safetensors`` or shards plus
``model.safetensors.index.json``) through :func:`resumable.formats.hf.write_hf_folder`,
assembling one tensor at a time from its chunks, so memory is bounded by the largest
tensor. They write into a hidden temporary folder beside ``out`` of their own
(``commit.new_output_dir``) and commit it with ``commit.publish_output_dir`` (every file
and the folder fsynced, renamed, the parent fsynced): neither an interrupted run nor a
power loss leaves a folder that looks complete. On an object store (``s3://``, no rename) the
output is written in place into a prefix that must hold no object; a failed run removes it.

- *unified* keeps every tensor (model and optimizer state) and the training context
  (``common.json``), so ``resumable split`` can turn it back into the same checkpoint;
- *hf* keeps the model's parameters only (``lm_head.weight`` is left out when the
  embeddings are tied, as ``save_pretrained`` does) plus ``config.json``, and loads with
  ``transformers``' ``from_pretrained``; a Qwen3 ``config.json`` is checked against the
  tensors' shapes first (every problem listed, nothing written).

Both write the ``config.json`` of :func:`known_config` (the source's, or one inferred from a
Qwen3 checkpoint's shapes; *unified* writes none for a model no mapping knows) and copy
the source's generation and tokenizer files byte for byte (:mod:`resumable.formats.hf_aux`).

Example::

    merge(open_source("output/checkpoint"), "unified/")
    export_hf(open_source("output/checkpoint"), "hf/", hf_config)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from resumable import commit, storage
from resumable.errors import ConfigError
from resumable.formats import hf, hf_aux, v2
from resumable.models import qwen3
from resumable.sources import Source, SourceTensor
from resumable.storage import AnyPath
from resumable.tools import progress_bar

log = logging.getLogger(__name__)

__all__ = ["export_hf", "known_config", "merge", "with_dtype", "DTYPE_ALIASES"]

DEFAULT_SHARD = 5 << 30

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``--dtype``'s short names → torch's."""


def _write(out: AnyPath, config: dict[str, Any] | None, tensors: list[SourceTensor], common: dict[str, Any] | None,
           files: dict[str, hf_aux.AuxFile], max_shard_size: int, dtype: torch.dtype | None,
           progress: bool) -> AnyPath:
    entry = storage.stat(out)
    if entry is not None and (not entry.is_dir or storage.list_dir(out)):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder or delete it")

    def cast(t: SourceTensor) -> torch.dtype:
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    config = with_dtype(config, {cast(t) for t in tensors if t.dtype.is_floating_point})
    by_name = {t.name: t for t in tensors}
    with progress_bar(sum(t.nbytes for t in tensors), f"writing {out.name}", progress) as bar:
        def get(name: str) -> torch.Tensor:
            t = by_name[name]
            data = t.read().to(cast(t))
            bar.update(t.nbytes)
            return data
        temp = commit.new_output_dir(out)  # right before the try: a Ctrl-C from here on removes it
        try:
            hf.write_hf_folder(temp, config, [(t.name, cast(t), t.shape) for t in tensors], get, max_shard_size)
            record = hf_aux.copy(files, temp)
            if common is not None:
                common = {**common, "state": hf_aux.with_record(common.get("state"), record)}
                storage.write_atomic(temp / v2.COMMON, v2.common_bytes(common))
            commit.publish_output_dir(temp, out)
        except BaseException:
            # Local: our own temp folder; object store: ``out`` itself, which new_output_dir found empty.
            storage.remove_tree(temp)
            raise
    return out


def with_dtype(config: dict[str, Any] | None, written: set[torch.dtype]) -> dict[str, Any] | None:
    """``config`` recording the floating dtype the weights are written in (``dtype``, and ``torch_dtype`` when
    the config has that older key), so ``from_pretrained(dtype="auto")`` gets what is on disk; unchanged
    when no config, or when the floating tensors are of several dtypes (nothing single to record)."""
    if config is None or len(written) != 1:
        return config
    name = str(next(iter(written))).removeprefix("torch.")
    return {**config, "dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}


def merge(source: Source, out: str | os.PathLike[str], *, max_shard_size: int = DEFAULT_SHARD,
          dtype: torch.dtype | None = None, progress: bool = False) -> AnyPath:
    """Write every tensor of ``source`` in full, plus its ``common.json`` (a *unified* checkpoint).

    Args:
        source: any checkpoint (:func:`resumable.sources.open_source`).
        out: a new (or empty) folder.
        max_shard_size: bytes per safetensors shard (a larger tensor gets a shard alone).
        dtype: cast floating-point tensors to this dtype while streaming (one tensor at a time); integer
            and boolean tensors are never cast. ``config.json`` records the dtype written (:func:`with_dtype`).
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
    config, notes = known_config(source)
    for note in notes:  # an unknown model (most of our own checkpoints): no config.json, said only at debug level
        log.log(logging.INFO if config else logging.DEBUG, "%s: %s%s", source.path,
                "" if config else "no config.json written: ", note)
    return _write(storage.as_path(out), config, list(source.tensors.values()), common, source.hf_files,
                  max_shard_size, dtype, progress)


def known_config(source: Source) -> tuple[dict[str, Any] | None, list[str]]:
    """The ``config.json`` of ``source`` and notes on where it comes from: the HuggingFace config it
    records, else one inferred from the shapes when its model tensors are a whole Qwen3
    (:func:`resumable.models.qwen3.infer_hf_config`), else None (no model mapping knows it: the
    note says why).

    Example::

        config, notes = known_config(open_source("mf_run/checkpoint"))
    """
    recorded = source.model_config
    if recorded and "model_type" in recorded:
        return recorded, []
    shapes = {n: t.shape for n, t in source.tensors.items() if t.kind == "model"}
    try:
        return qwen3.infer_hf_config(shapes, recorded)
    except ValueError as exc:
        return None, [f"it records no model config, and no known model's config follows from its tensors: {exc}"]


def export_hf(source: Source, out: str | os.PathLike[str], config: dict[str, Any] | None = None, *,
              origin: str = "the config.json given", max_shard_size: int = DEFAULT_SHARD,
              dtype: torch.dtype | None = None, progress: bool = False) -> AnyPath:
    """Write the model parameters of ``source`` as a HuggingFace folder with ``config``.

    Args:
        source: any checkpoint.
        out: a new (or empty) folder.
        config: the ``config.json`` content (see :func:`resumable.models.qwen3.hf_config`);
            None: :func:`known_config`.
        origin: where ``config`` comes from, for the error (e.g. ``--hf-config c.json``).
        max_shard_size, dtype, progress: as :func:`merge`.

    Raises:
        ConfigError: no config given and none known; or a Qwen3 config that does not fit the
            tensors' shapes (every problem listed). Nothing is written.
        FileExistsError: ``out`` exists and is not empty.

    Example::

        export_hf(open_source("output/checkpoint"), "hf/", hf_config(cfg.model))
    """
    if config is None:
        config, notes = known_config(source)
        if config is None:
            raise ConfigError(f"{source.path}: {notes[0]}; pass --hf-config config.json (or --config C.yaml) to "
                              "export it as a HuggingFace folder")
        for note in notes:
            log.info("%s: %s", source.path, note)
        origin = "the config.json it records" if config is source.model_config else "the inferred config.json"
    tensors = [t for t in source.tensors.values() if t.kind == "model"]
    if config.get("tie_word_embeddings"):
        tensors = [t for t in tensors if t.name != "lm_head.weight"]
    if qwen3.is_hf_config(config):
        problems = qwen3.config_shape_problems(config, {t.name: t.shape for t in tensors})
        if problems:
            raise ConfigError(f"{origin} does not fit the tensors of {source.path} ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems) + "\nfix the config, or pass the model's own config.json")
    else:
        log.debug("%s: config.json of model_type %r: not checked against the tensors (only Qwen3's shapes are "
                  "known)", source.path, config.get("model_type"))
    return _write(storage.as_path(out), config, tensors, None, source.hf_files, max_shard_size, dtype, progress)
