"""Convert between checkpoint formats (``resumable convert SRC OUT --to FORMAT``).

=========  ======================================================================
``--to``   what is written to ``OUT``
=========  ======================================================================
``v2``     Checkpoint 2.0 (``OUT/iteration_*`` + tracker), for one rank unless a
           layout is given: the trainer reshards it online on load
``unified`` full tensors (model and optimizer) + ``common.json`` (as ``merge``), and
           ``config.json`` when the model is known
``hf``     a HuggingFace folder: model parameters + ``config.json``
``legacy`` Checkpoint 1.0: ``OUT/rank_0/{prefix}_rank_0-{epoch}_{step}.safetensors`` and
           ``meta.json``, one rank holding full tensors (loads onto any layout
           with ``auto_trans_ckpt``); written by ``resumable.legacy.LegacySaver``,
           so the whole state is in memory once
=========  ======================================================================

The source may be any format :func:`resumable.sources.open_source` reads (our
Checkpoint 2.0, MindFormers 2.0 with or without ``metadata.json``, legacy ``rank_*``
trees in ``.safetensors`` or ``.ckpt``, HuggingFace / unified folders).

The model config of a HuggingFace export comes, in order, from ``hf_config`` (a
``config.json`` dict), from ``model`` (our YAML's ``model:`` section), or from the
source itself (:func:`resumable.tools.merge.known_config`): a HuggingFace or unified
source's ``config.json``, the ``model_config`` every conversion and the reference trainer
record in the saved state, else one inferred from the shapes of a Qwen3 checkpoint
(MindFormers', logged). A Qwen3 config is checked against the tensors' shapes before
anything is written.

Every target carries the source's ``config.json`` and its generation and tokenizer files
(:mod:`resumable.formats.hf_aux`), so HF → v2 → HF and HF → v2 → legacy → HF give back
the same model without any flag.

Example::

    convert("mf_run/checkpoint", "ckpt", "v2", dtype=torch.float32)
    convert("output/checkpoint", "hf_out", "hf", model=ModelConfig(num_hidden_layers=2))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from resumable import commit, storage
from resumable.errors import CheckpointError, ConfigError
from resumable.formats import hf_aux, v1
from resumable.formats.mindformers import parse_legacy_name
from resumable.lock import DirectoryLock
from resumable.models.qwen3 import AttentionShape, ModelConfig, hf_config as model_hf_config
from resumable.sources import Fused, Names, Source, open_source
from resumable.storage import AnyPath
from resumable.tools import TARGETS, Target
from resumable.tools.merge import DEFAULT_SHARD, export_hf, merge
from resumable.tools.split import TargetLayout, write_v2

__all__ = ["TARGETS", "convert"]


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], to: Target, *,
            layout: TargetLayout | None = None, prefix: str = "CKP", remove_redundancy: bool = False,
            dtype: torch.dtype | None = None, heads: AttentionShape | None = None,
            fused: Fused | None = None, names: Names = "auto", src_strategy: str | os.PathLike[str] | None = None,
            hf_config: dict[str, Any] | None = None, model: ModelConfig | None = None,
            max_shard_size: int = DEFAULT_SHARD, progress: bool = False) -> AnyPath:
    """Convert the checkpoint at ``src`` to format ``to`` in ``out``.

    Args:
        src: any readable checkpoint path (local or ``s3://``).
        out: the output folder (a checkpoint folder for ``v2``; a new folder otherwise); ``s3://`` for every
            target but ``legacy``.
        to: ``v2``, ``unified``, ``hf`` or ``legacy``.
        layout: ``v2`` only: the target layout (default: one rank).
        prefix, remove_redundancy: ``v2`` only, as the CheckpointMonitor keys.
        dtype: cast floating-point tensors (e.g. ``torch.float32`` for the trainer).
        heads, fused, names, src_strategy: how ``src`` is read (:func:`resumable.sources.open_source`).
        hf_config: ``hf`` only: the ``config.json`` content.
        model: ``hf`` only: our ``ModelConfig`` (used when ``hf_config`` is None).
        max_shard_size: ``unified``/``hf``: bytes per safetensors shard.
        progress: show progress bars.

    Returns:
        The folder written (for ``v2``, the committed iteration folder).

    Raises:
        ConfigError: ``hf`` without any model config known (none given or recorded, and the
            tensors are no known model's); a Qwen3 config that does not fit the tensors (all
            problems listed); an unknown target. Nothing is written.
        CheckpointError: ``legacy`` and the step's file already exists.
        LockedError: ``v2`` or ``legacy`` into a folder whose lock a live job holds.
        NotImplementedYet: ``legacy`` onto an object store (checked before ``src`` is read).
    """
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    out = storage.as_path(out)
    if to == "legacy":  # the legacy writer renames and flocks: local folders only
        out = storage.require_local(out, "writing a legacy (Checkpoint 1.0) tree")
    source = open_source(src, heads=heads, fused=fused, names=names, src_strategy=src_strategy)
    if to == "legacy":
        return _write_legacy(source, out, prefix, dtype)
    if to == "v2":
        return write_v2(source, out, layout or TargetLayout(), prefix=prefix, remove_redundancy=remove_redundancy,
                        dtype=dtype, progress=progress)
    if to == "unified":
        return merge(source, out, max_shard_size=max_shard_size, dtype=dtype, progress=progress)
    if hf_config is not None:
        config, origin = hf_config, "--hf-config"
    elif model is not None:
        config, origin = model_hf_config(model), "the model: section of --config"
    else:
        config, origin = None, ""  # the source's own, or one inferred from its shapes
    return export_hf(source, out, config, origin=origin, max_shard_size=max_shard_size, dtype=dtype,
                     progress=progress)


def _write_legacy(source: Source, out: Path, prefix: str, dtype: torch.dtype | None) -> Path:
    """One rank's full tensors as a Checkpoint 1.0 step (file name from the saved epoch and step)."""
    from resumable.legacy import LegacySaver

    objects = dict(source.common.get("state") or {})
    objects.pop("model", None)
    epochs, step = int(objects.get("epoch_num", 0)), int(objects.get("step_num", 0))
    gstep = int(source.common.get("global_step", 0))
    epoch, step = v1.name_position(epochs, step, gstep // epochs if epochs else gstep)
    with DirectoryLock(out):  # LegacySaver cleans and replaces meta.json: never in a live job's folder
        _refuse_legacy_clash(out / "rank_0", prefix, epoch, step)
        if source.model_config:
            objects["model_config"] = source.model_config
        objects = hf_aux.with_record(objects, _legacy_hf_files(source, out / hf_aux.FOLDER))
        optim = {k: v for k, v in (objects.pop("optimizer", None) or {}).items() if k != "state"}
        model = {}
        for name, t in source.tensors.items():
            data = t.read()
            data = data.to(dtype) if dtype is not None and data.is_floating_point() else data
            if t.kind == "opt":
                optim[name[len("optimizer."):]] = data
            else:
                model[name] = data
        saver = LegacySaver(out, prefix=prefix, fmt="safetensors", keep_checkpoint_max=None, remove_redundancy=False,
                            save_optimizer=bool(optim), strategy_dir=out / v1.STRATEGY_DIR,
                            layout={"world_size": 1, "mesh": None, "pipeline_stages": 1})
        return saver.save({"model": model, "optimizer": optim, **objects}, epoch, step)


def _legacy_hf_files(source: Source, folder: Path) -> dict[str, dict[str, Any]]:
    """Publish the source's tokenizer and generation files as ``folder`` (before the step that records
    them); a tree that already holds them keeps them when they are the same bytes."""
    if not source.hf_files:
        return {}
    temp = commit.new_output_dir(folder)
    try:
        record = hf_aux.copy(source.hf_files, temp)
        if storage.exists(folder):
            kept = hf_aux.recorded(folder, record, str(folder))
            if set(kept) != {e.name for e in storage.list_dir(folder)} or hf_aux.problems(kept):
                raise CheckpointError(f"{folder} holds other HuggingFace files than {source.path}'s (an earlier "
                                      "conversion of another model); write into another folder")
        else:
            commit.publish_output_dir(temp, folder)
    finally:
        storage.remove_tree(temp)  # gone already once published
    return record


def _refuse_legacy_clash(folder: Path, prefix: str, epoch: int, step: int) -> None:
    """Refuse a step that exists in ``folder`` or is older than one there (meta.json would move back to it)."""
    if storage.exists(folder / v1.rank_file_name(prefix, 0, 0, epoch, step, "safetensors")):
        raise CheckpointError(f"{folder} already holds epoch {epoch} step {step}; write into another folder")
    found = [e.name for e in storage.list_dir(folder) if (f := parse_legacy_name(e.name)) is not None
             and (f.epoch, f.step) > (epoch, step)]
    if found:
        raise CheckpointError(f"{folder} already holds later steps ({', '.join(found)}) than epoch {epoch} step "
                              f"{step}; writing it would point meta.json back at it: write into another folder")
