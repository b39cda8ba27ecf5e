"""The trainer's checkpoint callbacks: ``CheckpointMonitor`` saves, ``Resume`` loads.

Both run on every rank at the same points of ``Trainer.fit`` (their calls into the
library are collective). The YAML keys they read are those of docs/formats.md:

- ``callbacks: - type: CheckpointMonitor`` (prefix, directory, save_checkpoint_steps,
  keep_checkpoint_max, keep_checkpoint_every_n_steps, keep_best_checkpoint_max, best_checkpoint_metric,
  best_checkpoint_mode, async_save, checkpoint_format, remove_redundancy, save_optimizer,
  on_save_error);
- ``load_checkpoint`` + ``resume_training``: with ``resume_training: true`` the whole
  training state is restored (weights, optimizer, step, data position, RNG); without it
  only the weights are loaded and training starts at step 0 (fine-tuning), as in
  MindSpore Transformers. ``resume_training: true`` without ``load_checkpoint`` resumes
  from the job's own checkpoint folder (as torchtitan does; a fresh start when it holds
  nothing). A job never starts at step 0 into a folder holding committed checkpoints: it
  is refused with the command that resumes them (or ``discard_newer_checkpoints``);
- ``balanced_load``, ``load_ckpt_async``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.state_dict import set_model_state_dict

from resumable import commit, dist, storage
from resumable.errors import CheckpointError, ConfigError, NewerCheckpointsError, NotImplementedYet
from resumable.train.launch import restart_count
from resumable.commit import parse_iteration
from resumable.formats.schema import listed
from resumable.formats.v2 import read_metadata
from resumable.load import LoadResult, StateMismatchError, load
from resumable.manager import CheckpointManager
from resumable.prefetch import Prefetch
from resumable.retention import KeepBest
from resumable.resolve import Resolution, fall_back, resolve_checkpoint
from resumable.train.foreign import ForeignOptions, ensure_loadable, needs_conversion_legacy
from resumable.train.config import TrainConfig
from resumable.train.data import fill_position, unset_position
from resumable.train.legacy_callbacks import legacy_callbacks
from resumable.train.loop import Callback, Trainer
from resumable.train.saving import TrainCommand, fresh_start_refusal, layout_info, on_save_error, same_folder

logger = logging.getLogger(__name__)


class CheckpointMonitor(Callback):
    """Saves Checkpoint 2.0 every ``save_checkpoint_steps`` steps and at the last step."""

    def __init__(self, cfg: TrainConfig, command: TrainCommand | None = None) -> None:
        self.cfg = cfg
        self.command = command  # quoted when a fresh start over an earlier run is refused
        self.manager: CheckpointManager | None = None
        self.last_saved: int | None = None
        self.protected: set[int] = set()
        self.skipped: tuple[str, ...] = ()  # what the resume skipped (damaged iterations), for start_from's message

    def open(self, trainer: Trainer) -> None:
        """Take the checkpoint folder: lock it (a second job stops here) and clean leftovers. Idempotent.

        ``Resume`` calls it before reading anything, so a second job pointed at a live
        job's folder fails with ``LockedError`` at once instead of racing its saves and
        retention. Collective (every rank calls it at the same point).
        """
        if self.manager is not None:
            return
        mon = self.cfg.checkpoint
        assert mon is not None  # only built when the config has a CheckpointMonitor
        directory = self.cfg.checkpoint_dir
        if storage.is_file(directory):  # every rank sees the same shared path
            raise ConfigError(f"{directory}, the folder checkpoints are saved to (callbacks.0.directory, default "
                              "<output_dir>/checkpoint), is a file: move it away or set callbacks.0.directory")
        self.manager = CheckpointManager(
            self.cfg.checkpoint_dir, prefix=mon.prefix, save_checkpoint_steps=mon.save_checkpoint_steps,
            keep_checkpoint_max=mon.keep_checkpoint_max, keep_every_n_steps=mon.keep_checkpoint_every_n_steps,
            keep_best=(KeepBest(mon.keep_best_checkpoint_max, mon.best_checkpoint_metric, mon.best_checkpoint_mode)
                       if mon.keep_best_checkpoint_max is not None else None),
            async_save=mon.async_save,
            save_optimizer=mon.save_optimizer, remove_redundancy=mon.remove_redundancy,
            checkpoint_format=mon.checkpoint_format, layout_info=layout_info(trainer),
            events_path=self.cfg.local_dir / "log" / "checkpoints.jsonl")
        self.manager.protected |= self.protected

    def on_train_begin(self, trainer: Trainer) -> None:
        self.open(trainer)
        assert self.manager is not None and self.cfg.checkpoint is not None
        # Before any step: refuse (or, when asked, discard) iterations newer than the start,
        # which the saves to come would write over.
        start = trainer.ctx.global_step
        try:
            self.manager.start_from(start, discard_newer=self.cfg.checkpoint.discard_newer_checkpoints,
                                    skipped=self.skipped)
        except NewerCheckpointsError:  # every rank is here (start_from is collective)
            earlier = commit.committed_iterations(self.cfg.checkpoint_dir) if start == 0 else []
            if earlier:  # the command of an earlier run, run again: say how to resume it
                names = [commit.iteration_dirname(n) for n in earlier]
                raise NewerCheckpointsError(fresh_start_refusal(
                    self.cfg, self.command, names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}",
                    f"iteration {earlier[-1]}")) from None
            raise
        self.last_saved = start  # the state we start from is already on disk (or random)

    def _save(self, trainer: Trainer) -> None:
        assert self.manager is not None
        step = trainer.ctx.global_step
        with on_save_error(self.cfg, step):
            # The step's loss (the same on every rank) is what keep_best_checkpoint_max ranks by.
            loss = trainer.last_loss
            self.manager.save(trainer.state_dict(), step, metrics={"loss": loss} if loss is not None else None)
        self.last_saved = step

    def on_step_end(self, trainer: Trainer) -> None:
        assert self.manager is not None
        if trainer.preempted is not None:  # every rank agreed on it at this step: save it, committed before exiting
            if self.last_saved != trainer.ctx.global_step:
                self._save(trainer)
            with on_save_error(self.cfg, trainer.ctx.global_step):
                self.manager.wait()
        elif self.manager.should_save(trainer.ctx.global_step):
            self._save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        assert self.manager is not None
        if self.last_saved != trainer.ctx.global_step:
            self._save(trainer)  # training always ends on a checkpoint
        with on_save_error(self.cfg, trainer.ctx.global_step):
            self.manager.close()  # the job does not exit before the last save is committed
        if self.cfg.checkpoint is not None and self.cfg.checkpoint.last_save_model_only:
            self._export(trainer.ctx.global_step)

    def _export(self, step: int) -> None:
        """Rank 0 writes iteration ``step`` as a HuggingFace folder in ``export_dtype`` through the library side
        of ``resumable convert --to hf`` (one tensor in memory at a time); collective: its error is every rank's."""
        import torch

        from resumable.sources import open_source
        from resumable.tools.merge import DTYPE_ALIASES, export_hf

        assert self.cfg.checkpoint is not None
        out = self.cfg.local_dir / "export" / f"step_{step:08d}"
        failure: BaseException | None = None
        if dist.rank() == 0:
            try:
                if out.exists():  # a rerun that trained nothing: the export of this step is already there
                    logger.info("last_save_model_only: %s exists, not written again", out)
                else:
                    dtype = getattr(torch, DTYPE_ALIASES[self.cfg.checkpoint.export_dtype])
                    export_hf(open_source(self.cfg.checkpoint_dir / commit.iteration_dirname(step)), out, dtype=dtype)
                    logger.info("last_save_model_only: wrote the model of step %d as a HuggingFace folder %s (%s)",
                                step, out, self.cfg.checkpoint.export_dtype)
            except Exception as exc:  # every rank must raise it, not just rank 0
                failure = exc
        failure = dist.broadcast_object(failure)
        if failure is not None:
            raise failure

    def protect(self, iteration: int) -> None:
        """Keep ``iteration`` (the one resumed from) out of retention while this job runs."""
        self.protected.add(iteration)
        if self.manager is not None:
            self.manager.protected.add(iteration)


class Resume(Callback):
    """Loads ``load_checkpoint`` before the first step (fresh start when it resolves to nothing)."""

    def __init__(self, cfg: TrainConfig, monitor: CheckpointMonitor | None = None, own: bool = False) -> None:
        self.cfg = cfg
        self.monitor = monitor
        self.own = own  # load_checkpoint is the job's own checkpoint folder (resume_training: true alone)
        self.resolution: Resolution | None = None
        # Built before the trainer builds its model, so the reads overlap with that.
        self._prefetch = Prefetch(lambda: _prefetch_paths(cfg)) if cfg.load_ckpt_async else None

    def _resolve(self) -> Resolution:
        """Rank 0 decides and tells the others, so every rank loads the same iteration."""
        found: Resolution | BaseException
        if dist.rank() == 0:
            try:
                # A MindFormers or HuggingFace folder is converted once into <output_dir>/converted_checkpoint.
                options = ForeignOptions.from_config(self.cfg)
                path = ensure_loadable(self.cfg.load_checkpoint, self.cfg.local_dir, options)
                # The job's own folder not created yet is a first run, even outside output_dir.
                inside = self.cfg.checkpoint_dir if self.own else self.cfg.output_dir
                found = resolve_checkpoint(path, output_dir=inside, fallback=self.cfg.resume_training is True)
                if found.path is not None and self.cfg.resume_training is True:
                    _refuse_weights_only(self.cfg, found.path, converted=path != storage.as_path(self.cfg.load_checkpoint))
            except Exception as exc:  # every rank must raise it, not just rank 0
                found = exc
        else:
            found = None  # type: ignore[assignment]
        found = dist.broadcast_object(found)
        if isinstance(found, BaseException):
            raise found
        return found

    def _load(self, state: dict[str, Any], res: Resolution, exclude: list[str]) -> LoadResult:
        """Load ``res``, checksums included; with ``resume_training: true`` fall back past damaged iterations.

        Policy: every file's xxh3-64 is verified before any tensor is touched (the files
        split across the ranks: each reads about 1/world of the checkpoint once more). It
        is the only check that catches a flipped bit in tensor data; on the default config
        it costs a few milliseconds (docs/internals.md). A failed iteration is skipped,
        with a warning, for the newest older one that loads, only when training resumes
        automatically from a checkpoint folder (``resume_training: true``); a named
        ``iteration_*`` folder or a weights-only load fails with the error instead.
        Collective: ``load`` raises on every rank alike, and rank 0 alone decides whether
        to fall back, so every rank tries the same iteration next (or raises).
        """
        failed: dict[int, str] = {}
        auto = self.cfg.resume_training is True and not _names_iteration(self.cfg.load_checkpoint)
        while True:
            assert res.path is not None and res.iteration is not None
            try:
                return load(state, res.path, balanced=self.cfg.balanced_load, verify="checksum",
                            exclude_from_loading=exclude)
            except Exception as exc:  # load() agrees on failures: every rank is here together
                if not auto:
                    raise
                failed[res.iteration] = str(exc)
                following = self._fall_back(failed, exc)
                if following is None:
                    raise
            res = self.resolution = following

    def _fall_back(self, failed: dict[int, str], error: Exception) -> Resolution | None:
        """Rank 0 picks the next iteration to try (None: raise ``error``) and tells the others (collective).

        Damage (any ``CheckpointError`` or ``OSError`` but a ``StateMismatchError``) falls
        back; a state that does not match is the job's own configuration, the same for
        every iteration, and is raised as it is.
        """
        found: Resolution | BaseException | None = None
        if dist.rank() == 0 and _is_damage(error):
            try:
                found = fall_back(self.cfg.load_checkpoint, failed)
            except Exception as exc:  # every rank must raise it, not just rank 0
                found = exc
        found = dist.broadcast_object(found)
        if isinstance(found, BaseException):
            raise found from error
        return found

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.monitor is not None:
            self.monitor.open(trainer)  # lock the folder before reading it (one job per folder)
        if self._prefetch is not None:
            self._prefetch.join()
        self.resolution = res = self._resolve()
        if self.own:
            logger.info("resume_training is true and load_checkpoint is empty: %s",
                        f"nothing to resume in the job's checkpoint folder, fresh start ({res.reason})" if res.fresh
                        else f"resuming from the job's checkpoint folder {self.cfg.load_checkpoint}")
        elif res.fresh:
            logger.info("fresh start: %s", res.reason)
        if res.fresh:
            return
        full = self.cfg.resume_training is True
        state = trainer.state_dict()
        fresh_data = state["data"]
        if not full:  # weights only: the optimizer and the context start anew
            state = {"model": state["model"]}
        else:
            unset_position(state)  # a converted MindFormers checkpoint records counters only
        kept, skipped = without_exclusions(state, self.cfg.exclude_from_loading)
        result = self._load(kept, res, skipped)
        merge_back(state, kept, left_out(self.cfg.exclude_from_loading, skipped))
        if "data" in self.cfg.exclude_from_loading and full:
            state["data"] = fresh_data
        if self.monitor is not None and self.monitor.manager is not None:
            self.monitor.manager.record_load(result)  # its event beside the saves'
        if self.monitor is not None and self.resolution is not None:
            self.monitor.skipped = self.resolution.skipped
        if full:
            derived = fill_position(state, trainer.batches)
            if derived is not None:
                logger.info("%s: %s", result.path, derived)
            trainer.load_state_dict(state)
            if self.monitor is not None:
                self.monitor.protect(result.iteration)
            saved_gbs = result.common.get("global_batch_size")
            if saved_gbs and saved_gbs != trainer.ctx.global_batch_size:
                logger.info("global batch size changed (%s -> %s): continuing from %d consumed samples",
                            saved_gbs, trainer.ctx.global_batch_size, trainer.ctx.consumed_samples)
            logger.info("resumed from %s at global step %d (epoch %d, step %d in epoch)", result.path,
                        trainer.ctx.global_step, trainer.ctx.epoch, trainer.ctx.step_in_epoch)
        else:
            set_model_state_dict(trainer.model, state["model"])
            logger.info("loaded weights from %s; training starts at step 0 (resume_training is false)", result.path)


#: exclude_from_loading's words for parts of the state, and the top-level keys they leave out.
EXCLUDABLE = {"optimizer": ("optimizer", "the optimizer state"), "rng": ("rank_local", "the RNG states"),
              "data": ("data", "the data position")}


def without_exclusions(state: dict[str, Any], exclude: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The part of ``state`` to load (sharing its tensors, so they fill in place) and the saved names the
    load leaves out on purpose, for ``exclude_from_loading`` (logged in one line).

    Raises:
        ConfigError: a pattern matches no tensor of the model (a typo would otherwise load everything).
    """
    if not exclude:
        return state, []
    kept = dict(state)
    words = [EXCLUDABLE[e][1] for e in EXCLUDABLE if e in exclude and EXCLUDABLE[e][0] in state]
    for entry in exclude:
        if entry in EXCLUDABLE:
            kept.pop(EXCLUDABLE[entry][0], None)
    names = sorted(state["model"])
    patterns = [e for e in exclude if e not in EXCLUDABLE]
    matched = sorted({n for n in names for p in patterns if fnmatch.fnmatchcase(n, p)})
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"exclude_from_loading: {pattern!r} matches no tensor of the model (expected "
                              f"optimizer, rng, data or a pattern over its tensors: "
                              f"{listed(names, 'resumable inspect the checkpoint')})")
    skipped = ["optimizer"] if "optimizer" in exclude else []
    if matched:
        kept["model"] = {n: t for n, t in state["model"].items() if n not in matched}
        skipped += matched + [f"optimizer.state.{n}" for n in matched]
        if "optimizer" in kept:
            opt = kept["optimizer"]
            kept["optimizer"] = {**opt, "state": {n: v for n, v in opt.get("state", {}).items() if n not in matched}}
        words.append(f"{len(matched)} tensor(s) and their optimizer state: "
                     f"{listed(matched, 'the model: resumable inspect the checkpoint')}")
    logger.info("exclude_from_loading: left out %s", "; ".join(words) or "nothing")
    return kept, skipped


def left_out(exclude: list[str], skipped: list[str]) -> set[str]:
    """The dotted state paths :func:`merge_back` keeps as they are: the loader puts every saved plain value
    back (an optimizer's ``param_groups`` too), wanted or not."""
    return {EXCLUDABLE[e][0] for e in exclude if e in EXCLUDABLE} | set(skipped)


def merge_back(state: dict[str, Any], loaded: dict[str, Any], keep: set[str], prefix: str = "") -> None:
    """Put the loaded values of ``loaded`` (a part of ``state``) into ``state``, except the paths in ``keep``
    (tensors were filled in place)."""
    if loaded is state:
        return
    for key, value in loaded.items():
        path = f"{prefix}{key}"
        if path in keep:
            continue
        if isinstance(value, dict) and isinstance(state.get(key), dict) and value is not state[key]:
            merge_back(state[key], value, keep, f"{path}.")
        else:
            state[key] = value


def _prefetch_paths(cfg: TrainConfig) -> list[Path]:
    """This rank's share of the files of the iteration a resume will pick: the files it wrote when the
    world size is unchanged, else every local_world-th file (the page cache is shared by a node's ranks)."""
    res = resolve_checkpoint(cfg.load_checkpoint, output_dir=cfg.output_dir, fallback=cfg.resume_training is True)
    if res.fresh:
        return []
    files = read_metadata(res.path).files
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    writers = {info.rank for info in files.values()}
    if len(writers) == world:
        return [res.path / name for name, info in sorted(files.items()) if info.rank == rank]
    return [res.path / name for name in sorted(files)[local_rank::local_world]]


def _refuse_weights_only(cfg: TrainConfig, folder: Path, converted: bool) -> None:
    """``resume_training: true`` restores the optimizer too: a checkpoint of weights only is refused, saying
    what to set instead (not the optimizer tensors it lacks). Damage is left to the load (and its fallback)."""
    try:
        weights_only = not read_metadata(folder).save_optimizer
    except (CheckpointError, OSError):
        return
    if not weights_only:
        return
    what = (f"load_checkpoint {cfg.load_checkpoint} holds weights only (its conversion, {folder}, has no optimizer "
            "state)" if converted else f"{folder} was saved with save_optimizer: false: it holds weights only")
    # A new run from the job's own folder goes elsewhere: its saves would write over this run's.
    elsewhere = (f", load_checkpoint: {folder} and another output_dir" if same_folder(folder.parent, cfg.checkpoint_dir)
                 else "")
    raise ConfigError(f"{what}, and resume_training: true restores the whole training state (optimizer, step, data "
                      f"position). Set resume_training: false{elsewhere} to start a new run from its weights")


def _is_damage(error: BaseException) -> bool:
    """True for a failure a damaged checkpoint causes (a resume falls back past it)."""
    return isinstance(error, (CheckpointError, OSError)) and not isinstance(error, StateMismatchError)


def _names_iteration(path: str) -> bool:
    """True when ``load_checkpoint`` names one ``iteration_*`` (or temp) folder rather than a checkpoint folder."""
    name = storage.as_path(path).name
    return parse_iteration(name) is not None or name.startswith((".tmp-", ".old-", ".del-"))


def _own_checkpoint_exists(cfg: TrainConfig) -> bool:
    """Whether the job's own checkpoint folder holds a committed checkpoint (2.0 or legacy)."""
    if cfg.use_legacy_format:
        return storage.is_dir(cfg.checkpoint_dir) and any(e.name.startswith("rank_")
                                                          for e in storage.list_dir(cfg.checkpoint_dir))
    try:
        return commit.latest_committed(cfg.checkpoint_dir) is not None
    except CheckpointError:
        return True  # damaged: the resume says so (and falls back)


def checkpoint_callbacks(cfg: TrainConfig, command: TrainCommand | None = None) -> list[Callback]:
    """The callbacks a config asks for, in order: HF init, resume (it sets the step), the monitor.

    ``resume_training`` without ``load_checkpoint`` resumes from the job's own checkpoint
    folder. Legacy mode takes ``Resume`` (Checkpoint 2.0) for a ``load_checkpoint`` its own
    loader cannot read (``foreign.needs_conversion_legacy``: each rank asks the same shared
    files). ``command`` is quoted when a fresh start is refused (the resume command).
    """
    from resumable.train.pretrained import PretrainedInit

    callbacks: list[Callback] = [PretrainedInit(cfg)] if cfg.pretrained_model_dir else []
    restarts = restart_count()
    if restarts and cfg.checkpoint is not None and _own_checkpoint_exists(cfg):
        # torchrun restarted the job after a process died (--max-restarts): go on from the newest complete
        # checkpoint of this job's own folder, whatever load_checkpoint / resume_training said for its start.
        logger.warning("restart %d of the job by its launcher: resuming from the newest complete checkpoint in %s",
                       restarts, cfg.checkpoint_dir)
        cfg = cfg.model_copy(update={"resume_training": True, "load_checkpoint": ""})
    own = cfg.resume_training is True and not cfg.load_checkpoint
    if own:  # as torchtitan: resume where this job saves (over pretrained_model_dir's weights), never fresh silently
        cfg = cfg.model_copy(update={"load_checkpoint": str(cfg.checkpoint_dir)})
    if cfg.use_legacy_format:  # Checkpoint 1.0: per-rank files (resumable.train.legacy_callbacks)
        if cfg.load_checkpoint and needs_conversion_legacy(cfg.load_checkpoint):
            # A MindFormers or HuggingFace checkpoint (or a single foreign file): converted once to
            # Checkpoint 2.0, which the 2.0 loader reshards onto this layout; the saves stay Checkpoint 1.0.
            if isinstance(cfg.resume_training, str):
                raise NotImplementedYet(
                    f"resume_training: {cfg.resume_training!r} names a step, but load_checkpoint "
                    f"{cfg.load_checkpoint} is not a resumable legacy checkpoint: it is converted from its newest "
                    "complete step; set resume_training: true (or convert the step you want with resumable convert)")
            return callbacks + [Resume(cfg)] + legacy_callbacks(cfg, resume=False, command=command)
        if cfg.exclude_from_loading:
            raise NotImplementedYet(f"exclude_from_loading {cfg.exclude_from_loading} with use_legacy_format: true "
                                    "and a Checkpoint 1.0 load_checkpoint: the legacy loader restores everything; "
                                    "convert it with resumable convert --to v2 and load that")
        return callbacks + legacy_callbacks(cfg, command=command)
    monitor = CheckpointMonitor(cfg, command) if cfg.checkpoint is not None else None
    if cfg.load_checkpoint:
        callbacks.append(Resume(cfg, monitor, own))
    if monitor is not None:
        callbacks.append(monitor)
    return callbacks
