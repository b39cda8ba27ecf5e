"""The trainer's Checkpoint 1.0 callbacks (``use_legacy_format: true``): save per-rank files, resume from them.

They mirror :mod:`resumable.train.checkpointing` (``CheckpointMonitor`` / ``Resume``) and
run on every rank at the same points of ``Trainer.fit`` (their library calls are
collective). Keys read (docs/formats.md): the CheckpointMonitor's ``prefix``,
``directory``, ``save_checkpoint_steps``, ``keep_checkpoint_max``, ``keep_checkpoint_every_n_steps``,
``keep_best_checkpoint_max`` / ``best_checkpoint_metric`` / ``best_checkpoint_mode``, ``async_save``,
``checkpoint_format``, ``remove_redundancy``, ``save_optimizer``; ``output_dir`` (``strategy/``,
``unified_checkpoint/``, ``transformed_checkpoint/``); ``load_checkpoint``,
``resume_training`` (true, or a file name), ``load_ckpt_format``, ``auto_trans_ckpt``,
``src_strategy_path_or_dir``, ``transform_process_num``, ``remove_redundancy``,
``load_ckpt_async``. A ``load_checkpoint`` this loader cannot read (a MindFormers tree or 2.0
folder, a HuggingFace folder, a single foreign file) is converted once to Checkpoint 2.0 and loaded
by :class:`resumable.train.checkpointing.Resume` instead (``checkpoint_callbacks``, train/foreign.py).

Run it::

    python -m resumable.train --set use_legacy_format=true --set runner_config.stop_step=20 ...
    python -m resumable.train --set use_legacy_format=true --set load_checkpoint=output/checkpoint \\
        --set resume_training=true
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import set_model_state_dict

from resumable import dist
from resumable.async_save import collective_timeout
from resumable.errors import CheckpointNotFoundError, NewerCheckpointsError
from resumable.formats import v1
from resumable.legacy import (
    BackgroundLegacySaves,
    LegacyLoadOptions,
    LegacySaver,
    LegacySource,
    check_transform_process_num,
    load_legacy,
    resolve_legacy,
)
from resumable.legacy.resolve import complete_steps
from resumable.legacy.save import discard_steps
from resumable.lock import DirectoryLock, lock_for_job
from resumable.prefetch import Prefetch
from resumable.retention import KeepBest
from resumable.train.config import TrainConfig
from resumable.train.data import fill_position, unset_position
from resumable.train.loop import Callback, Trainer
from resumable.train.saving import TrainCommand, fresh_start_refusal, layout_info, on_save_error, same_folder

logger = logging.getLogger(__name__)


def legacy_layout(trainer: Trainer) -> dict[str, Any]:
    """The layout recorded in every legacy file; a different one on load needs ``auto_trans_ckpt``."""
    return {"world_size": dist.world_size(), **layout_info(trainer)}


class LegacyCheckpointMonitor(Callback):
    """Saves every ``save_checkpoint_steps`` steps and at the last step, as Checkpoint 1.0.

    File names carry MindSpore's ``{epoch}_{step}``: the 1-based epoch of the step and the
    1-based step inside it (:func:`resumable.formats.v1.name_position`).
    """

    def __init__(self, cfg: TrainConfig, command: TrainCommand | None = None) -> None:
        self.cfg = cfg
        self.command = command  # quoted when a fresh start over an earlier run is refused
        self.saver: LegacySaver | None = None
        self.background: BackgroundLegacySaves | None = None  # async_save: true
        self.protected: set[Path] = set()
        self.last_saved: int | None = None
        self._lock: DirectoryLock | None = None
        self._opened = False
        self._in_epoch = 0  # steps done in the epoch in progress, before the latest step
        self._position = (1, 0)

    def open(self, trainer: Trainer) -> None:
        """Lock the checkpoint folder (one job per folder, resumable.lock). Idempotent; collective.

        ``LegacyResume`` calls it before reading anything; the saver, built afterwards,
        cleans the leftovers of crashed saves under the lock.
        """
        if not self._opened:  # a flag, not the lock: ranks other than 0 hold no lock object
            self._lock = lock_for_job(self.cfg.checkpoint_dir)
            self._opened = True

    def on_train_begin(self, trainer: Trainer) -> None:
        mon = self.cfg.checkpoint
        assert mon is not None  # only built when the config has a CheckpointMonitor
        self.open(trainer)
        if trainer.ctx.global_step == 0:
            self._earlier_run(mon.checkpoint_format, mon.discard_newer_checkpoints)
        group = None
        if mon.async_save and dist.initialized():
            # Background saves agree over a gloo group of their own: never interleaved with training's.
            group = torch.distributed.new_group(backend="gloo", timeout=collective_timeout())
        self.saver = LegacySaver(
            self.cfg.checkpoint_dir, prefix=mon.prefix, fmt=mon.checkpoint_format,
            keep_checkpoint_max=mon.keep_checkpoint_max, keep_every_n_steps=mon.keep_checkpoint_every_n_steps,
            keep_best=(KeepBest(mon.keep_best_checkpoint_max, mon.best_checkpoint_metric, mon.best_checkpoint_mode)
                       if mon.keep_best_checkpoint_max is not None else None),
            remove_redundancy=mon.remove_redundancy, save_optimizer=mon.save_optimizer,
            strategy_dir=self.cfg.local_dir / v1.STRATEGY_DIR, layout=legacy_layout(trainer), protect=self.protected,
            process_group=group)
        if mon.async_save:
            self.background = BackgroundLegacySaves(self.saver)
        ctx = trainer.ctx
        self.last_saved = ctx.global_step  # the state we start from is already on disk (or random)
        self._in_epoch = ctx.step_in_epoch
        self._position = v1.name_position(ctx.epoch, ctx.step_in_epoch, trainer.batches.steps_per_epoch)

    def _earlier_run(self, fmt: str, discard: bool) -> None:
        """A job starting at step 0 into a tree that holds an earlier run's complete steps: refuse (its saves
        would bury them: meta.json moves to this job, keep_checkpoint_max deletes older jobs' files first),
        or delete them when ``discard_newer_checkpoints`` says so. Rank 0 reads the tree and decides for all.

        A job loading weights from this same tree has been refused, or has discarded them, already
        (``LegacyResume._newer_steps_in_the_way``).
        """
        root = self.cfg.checkpoint_dir
        steps: list[tuple[tuple[int, int], tuple[str, ...]]] = []
        if dist.rank() == 0 and root.is_dir():
            try:
                steps = complete_steps(root, fmt)
            except CheckpointNotFoundError:
                steps = []  # no rank folders, or no step complete on every rank: nothing to bury
        steps = dist.broadcast_object(steps)
        if not steps:
            return
        if discard:
            discard_steps(root, steps)
            return
        (newest, _), oldest = steps[0], steps[-1][0]
        held = f"epoch {newest[0]} step {newest[1]}" if len(steps) == 1 else (
            f"{len(steps)} steps, epoch {oldest[0]} step {oldest[1]} to epoch {newest[0]} step {newest[1]}")
        raise NewerCheckpointsError(fresh_start_refusal(self.cfg, self.command, held,
                                                        f"epoch {newest[0]} step {newest[1]}"))

    def _save(self, trainer: Trainer) -> None:
        assert self.saver is not None
        # The step's loss (the same on every rank) is what keep_best_checkpoint_max ranks by.
        metrics = {"loss": trainer.last_loss} if trainer.last_loss is not None else None
        with on_save_error(self.cfg, trainer.ctx.global_step):
            if self.background is not None:  # waits for the previous save, raising its error
                self.background.save(trainer.state_dict(), *self._position, metrics=metrics)
            else:
                self.saver.save(trainer.state_dict(), *self._position, metrics=metrics)
        self.last_saved = trainer.ctx.global_step

    def on_step_end(self, trainer: Trainer) -> None:
        ctx = trainer.ctx
        self._position = v1.name_position(ctx.epoch, ctx.step_in_epoch, self._in_epoch + 1)
        self._in_epoch = ctx.step_in_epoch
        mon = self.cfg.checkpoint
        assert mon is not None
        if ctx.global_step % mon.save_checkpoint_steps == 0 or trainer.preempted is not None:
            self._save(trainer)
        if trainer.preempted is not None and self.background is not None:
            with on_save_error(self.cfg, ctx.global_step):
                self.background.wait()  # committed before the job exits

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last_saved != trainer.ctx.global_step:
            self._save(trainer)  # training always ends on a checkpoint
        if self.background is not None:
            with on_save_error(self.cfg, trainer.ctx.global_step):
                self.background.wait()  # the job ends once its last save is recorded
        if self._lock is not None:
            self._lock.release()

    def protect(self, path: Path) -> None:
        """Keep ``path`` (the file resumed from) out of retention while this job runs."""
        self.protected.add(path.resolve())
        if self.saver is not None:
            self.saver.protect.add(path.resolve())


def _prefetch_paths(cfg: TrainConfig, rank: int) -> list[Path]:
    """This rank's file of the checkpoint a resume will pick (the same rule the load uses)."""
    from resumable.legacy import resolve_here

    found = resolve_here(cfg.load_checkpoint, cfg.resume_training, cfg.load_ckpt_format, cfg.output_dir, rank)
    if found.root is None:
        return []
    return [found.root / (found.files[0] if found.single else found.files[min(rank, len(found.files) - 1)])]


class LegacyResume(Callback):
    """Loads ``load_checkpoint`` before the first step (fresh start when it resolves to nothing).

    With ``resume_training`` true or a file name the whole state is restored (weights,
    optimizer, step, data position, RNG when the layout is unchanged); with false only the
    weights are loaded and training starts at step 0.
    """

    def __init__(self, cfg: TrainConfig, monitor: LegacyCheckpointMonitor | None = None) -> None:
        self.cfg = cfg
        self.monitor = monitor
        self.source: LegacySource | None = None
        # Constructed before the trainer builds its model: the prefetch overlaps with that.
        rank = dist.rank() if dist.initialized() else _env_rank()
        self._prefetch = Prefetch(lambda: _prefetch_paths(cfg, rank)) if cfg.load_ckpt_async else None

    def on_train_begin(self, trainer: Trainer) -> None:
        cfg = self.cfg
        if self.monitor is not None:
            self.monitor.open(trainer)  # lock the folder before reading it (one job per folder)
        if cfg.transform_process_num is not None:
            check_transform_process_num(cfg.transform_process_num, dist.world_size())
        if self._prefetch is not None:
            self._prefetch.join()
        self.source = source = resolve_legacy(cfg.load_checkpoint, cfg.resume_training, fmt=cfg.load_ckpt_format,
                                              output_dir=cfg.output_dir)
        if source.fresh:
            logger.info("fresh start: %s", source.reason)
            return
        buried = self._newer_steps_in_the_way(source)
        full = cfg.resume_training is not False
        state = trainer.state_dict()
        if not full:  # weights only: the optimizer and the context start anew
            state = {"model": state["model"]}
        else:
            unset_position(state)  # a converted MindFormers checkpoint records counters only
        opts = LegacyLoadOptions(layout=legacy_layout(trainer), auto_trans_ckpt=cfg.auto_trans_ckpt,
                                 src_strategy_path_or_dir=cfg.src_strategy_path_or_dir,
                                 transform_process_num=cfg.transform_process_num,
                                 remove_redundancy=cfg.remove_redundancy, output_dir=cfg.output_dir)
        result = load_legacy(state, source, opts)
        if buried:  # told to discard them; only once the load succeeded
            assert source.root is not None
            discard_steps(source.root, buried)
        if not full:
            set_model_state_dict(trainer.model, state["model"])
            logger.info("loaded weights from %s; training starts at step 0 (resume_training is false)", source.root)
            return
        derived = fill_position(state, trainer.batches)
        if derived is not None:
            logger.info("%s: %s", result.source.root, derived)
        trainer.load_state_dict(state)
        if self.monitor is not None:
            assert result.source.root is not None
            for name in result.source.files:
                self.monitor.protect(result.source.root / name)
        logger.info("resumed from %s at global step %d (epoch %d, step %d in epoch)", result.source.root,
                    trainer.ctx.global_step, trainer.ctx.epoch, trainer.ctx.step_in_epoch)


    def _newer_steps_in_the_way(self, source: LegacySource) -> tuple[tuple[tuple[int, int], tuple[str, ...]], ...]:
        """The steps newer than this job's start that its saves would bury, to discard; refuses them otherwise.

        A job saving into the tree it loads from replaces every rank's ``meta.json`` (the
        newer steps are no longer resumed from) and ``keep_checkpoint_max`` deletes older
        jobs' files first. The same decision on every rank (``source`` is rank 0's).

        Raises:
            NewerCheckpointsError: naming them (and why a fallback skipped them), unless
                ``callbacks.0.discard_newer_checkpoints`` is true.
        """
        mon = self.cfg.checkpoint
        assert source.root is not None
        if not source.newer or mon is None or not same_folder(self.cfg.checkpoint_dir, source.root):
            return ()
        assert source.position is not None  # only a tree's step has newer ones
        if mon.discard_newer_checkpoints:
            return source.newer
        start = ("step 0 (resume_training: false loads the weights only)" if self.cfg.resume_training is False
                 else f"epoch {source.position[0]} step {source.position[1]}")
        listed = ", ".join(f"epoch {pos[0]} step {pos[1]} ({files[0]}, ...)" for pos, files in source.newer)
        damage = f" This resume skipped: {'; '.join(source.skipped)}." if source.skipped else ""
        raise NewerCheckpointsError(
            f"{source.root} holds {len(source.newer)} step(s) newer than {start} this job starts from: {listed}. "
            "Training on would bury them (every rank's meta.json would name this job's saves, and "
            f"keep_checkpoint_max deletes older jobs' files first).{damage} To keep them, resume from them (repair "
            "or restore what is damaged) or save elsewhere; to discard them, set "
            "callbacks.0.discard_newer_checkpoints: true")


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def legacy_callbacks(cfg: TrainConfig, resume: bool = True, command: TrainCommand | None = None) -> list[Callback]:
    """The Checkpoint 1.0 callbacks a config asks for: resume first (it sets the step), then the monitor.

    ``resume=False``: the caller loads ``load_checkpoint`` itself (a foreign checkpoint, converted).
    ``command`` is quoted when a fresh start over an earlier run is refused (the resume command).
    """
    monitor = LegacyCheckpointMonitor(cfg, command) if cfg.checkpoint is not None else None
    callbacks: list[Callback] = []
    if cfg.load_checkpoint and resume:
        callbacks.append(LegacyResume(cfg, monitor))
    if monitor is not None:
        callbacks.append(monitor)
    return callbacks
