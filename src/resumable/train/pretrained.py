"""Initialise the reference model from a HuggingFace Qwen3 folder (``pretrained_model_dir``).

The folder holds ``config.json`` and ``model.safetensors`` (or shards with
``model.safetensors.index.json``), as ``transformers``' ``save_pretrained`` writes them.
Our parameter names are HuggingFace's, so no renaming is needed: every rank reads, for
each parameter it holds, only the boxes of its own shard (``layout.local_chunks`` on the
model's state dict, ``formats.hf.read_hf_box``), on any layout (TP, FSDP, pipeline
stages). The config must describe the same architecture as ``model:`` in the YAML;
every difference is listed in one ``ConfigError``. With ``load_checkpoint`` set, the
checkpoint wins and the folder is ignored (logged).

    resumable train --config c.yaml --set pretrained_model_dir=/models/qwen3-tiny
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from resumable import storage
from resumable.errors import ConfigError
from resumable.formats.hf import index_hf_folder, read_hf_box, read_hf_config
from resumable.layout import local_chunks, local_tensor
from resumable.models.qwen3 import config_mismatches
from resumable.train.config import ModelConfig, TrainConfig
from resumable.train.loop import Callback, Trainer

logger = logging.getLogger(__name__)

__all__ = ["PretrainedInit", "init_from_pretrained", "load_pretrained"]


def load_pretrained(model: nn.Module, folder: "str | Path | storage.ObjectPath", model_cfg: ModelConfig) -> int:
    """Fill ``model``'s parameters (plain, TP/FSDP DTensors, a pipeline stage's subset) from a HF folder.

    Each rank reads only the boxes it holds. Not collective.

    Returns:
        The bytes read.

    Raises:
        ConfigError: the folder's config or tensors do not match ``model_cfg`` (all listed).
    """
    folder = storage.as_path(folder)
    config = read_hf_config(folder)
    problems = config_mismatches(model_cfg, config)
    index = index_hf_folder(folder)
    state = model.state_dict()
    if model_cfg.tie_word_embeddings and "lm_head.weight" not in index and "model.embed_tokens.weight" in index:
        index["lm_head.weight"] = index["model.embed_tokens.weight"]
    missing = sorted(n for n in state if n not in index)
    if missing:
        problems.append(f"tensors missing from {folder}: {', '.join(missing)}")
    for name, t in state.items():
        entry = index.get(name)
        if entry is not None and tuple(entry.shape) != tuple(t.shape):
            problems.append(f"{name}: shape {list(t.shape)} in the model, {list(entry.shape)} in {entry.file.name}")
    if problems:
        raise ConfigError(f"pretrained_model_dir {folder} does not match the model config:\n  "
                          + "\n  ".join(problems) + "\nset model: to the folder's config.json values")
    nbytes = 0
    with torch.no_grad():
        for name, t in state.items():
            local = local_tensor(t)
            for chunk in local_chunks(t):
                data = read_hf_box(index[name], chunk.box)
                local[chunk.local].copy_(data)
                nbytes += data.numel() * data.element_size()
    return nbytes


def init_from_pretrained(trainer: Trainer, cfg: TrainConfig) -> None:
    """Load ``cfg.pretrained_model_dir`` into ``trainer.model``; a no-op when unset or when ``load_checkpoint`` is set.

    Every rank calls it (each reads its own slices); not collective.
    """
    if not cfg.pretrained_model_dir:
        return
    if cfg.load_checkpoint:
        logger.info("pretrained_model_dir %s ignored: load_checkpoint %s is set and takes precedence",
                    cfg.pretrained_model_dir, cfg.load_checkpoint)
        return
    nbytes = load_pretrained(trainer.model, cfg.pretrained_model_dir, cfg.model)
    logger.info("initialised the model from %s (%.1f MB read on this rank)", cfg.pretrained_model_dir, nbytes / 1e6)


class PretrainedInit(Callback):
    """Trainer callback: :func:`init_from_pretrained` in ``on_train_begin`` (register it before Resume)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def on_train_begin(self, trainer: Trainer) -> None:
        init_from_pretrained(trainer, self.cfg)
