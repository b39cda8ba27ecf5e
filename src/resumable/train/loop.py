"""The training loop: ``Trainer`` (model, optimizer, data, context) and ``run(cfg)``.

Every rank builds the same ``Trainer`` and calls ``fit()``; all collectives happen inside
``train_step`` (and in model/optimizer state-dict calls), in the same order on every rank.

Checkpointing plugs in through callbacks (see ``Callback``): ``on_train_begin`` may call
``trainer.load_state_dict(...)``, ``on_step_end`` may save ``trainer.state_dict()``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from resumable import storage
from resumable.async_save import collective_timeout, env_seconds, finish_pending
from resumable.errors import ConfigError
from resumable.models.qwen3 import hf_config
from resumable.preemption import PREEMPTED_EXIT, Preemption
from resumable.proctree import STOP_SIGNALS
from resumable.train.config import TrainConfig, check_layout, record_config
from resumable.train.data import Batches, load_dataset
from resumable.train.model import build_model, causal_lm_loss
from resumable.train.parallel import Layout, build_layout, build_pipeline, parallelize, sync_grads
from resumable.train.schedule import build_optimizer, lr_at, set_lr

logger = logging.getLogger(__name__)


@dataclass
class TrainContext:
    """Where training stands; every field counts what is *done*.

    ``epoch`` is the number of completed epochs (the 0-based epoch in progress),
    ``step_in_epoch`` the steps done in it and ``sample_in_epoch`` the samples taken from its
    order (``step_in_epoch x global_batch_size`` unless the batch size changed on resume).
    """

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    consumed_samples: int = 0
    global_batch_size: int = 0
    sample_in_epoch: int = 0


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP, ...) reached the training thread.

    A ``KeyboardInterrupt`` (``except Exception`` does not swallow it); the process should
    exit with :attr:`exit_status`, 128 + the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class Preempted(Interrupted):
    """A preemption signal: every rank saved the same step; the process exits with ``PREEMPTED_EXIT`` (75)."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(signum)
        self.args = (f"preempted by {signal.Signals(signum).name}: saved global step {step}",)
        self.step = step

    @property
    def exit_status(self) -> int:
        return PREEMPTED_EXIT


class _StopSignals:
    """While entered (main thread only): each stop signal raises ``Interrupted`` in the training thread.

    Inside :meth:`deferred` (the step-end and train-end hooks, where checkpoints are saved)
    the signal is held until the block ends, so a signal never cuts a save in the middle on
    one rank while the others go on with it. A second signal exits at once, status 128 +
    its number (what was committed stays valid; the save in flight is left uncommitted).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._raised = False
        self._depth = 0
        self._previous: dict[int, Any] = {}
        #: Signals that ask for a save at the next step boundary (``callbacks.0.save_on_preemption``).
        self.preemption: Preemption | None = None

    def __enter__(self) -> "_StopSignals":
        self.received, self._raised, self._depth = None, False, 0
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.preemption is not None and self.received is None and (
                signum in self.preemption.signals or self.preemption.signum is not None):
            self.preemption.handle(signum)  # recorded for the step-end agreement (a second one exits)
            return
        if self.received is not None:
            print(f"[rank {os.environ.get('RANK', '0')}] second signal ({signal.Signals(signum).name}): "
                  "exiting now, without waiting for the save in flight", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if not self._depth:
            self._raised = True
            raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a stop signal until the block ends (then raise it), unless the block raised."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self.received is not None and not self._raised and not self._depth:
            self._raised = True
            raise Interrupted(self.received)


_STOP = _StopSignals()


class Callback:
    """Hooks called on every rank, in list order; override what you need."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        """Before the first step (a loader restores ``trainer.load_state_dict`` here)."""

    def on_step_end(self, trainer: "Trainer") -> None:
        """After each optimizer step; ``trainer.ctx`` already counts the step."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the last step, before the process group is destroyed."""


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states as base64 strings (JSON-able)."""
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode("ascii")  # noqa: E731
    state: dict[str, Any] = {"torch_cpu": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["torch_cuda"] = enc(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["torch_cuda"]))


class Trainer:
    """One rank's share of a training run described by a ``TrainConfig``."""

    def __init__(self, cfg: TrainConfig, layout: Layout, callbacks: Iterable[Callback] = ()) -> None:
        self.cfg = cfg
        self.layout = layout
        self.callbacks = list(callbacks)
        #: The preemption signal every rank agreed on at this step (the monitor then saves it), or None.
        self.preempted: int | None = None
        rc, pc = cfg.runner_config, cfg.parallel_config
        # Data first: a bad data file should fail before the model is built.
        self.batches = Batches(load_dataset(cfg.train_dataset, cfg.model.vocab_size), cfg.seed,
                               rc.batch_size, pc.micro_batch_num, layout.dp, layout.coord("dp"))
        self.total_steps = cfg.lr_schedule.total_steps or rc.epochs * self.batches.steps_per_epoch
        self.model = parallelize(build_model(cfg.model, cfg.seed), layout)
        # What draws from the global RNG while training (attention dropout) depends on the seed
        # alone; torch seeds it randomly per process. A resume restores its state (rank_local).
        torch.manual_seed(cfg.seed)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, lr_at(0, cfg.lr_schedule, self.total_steps))
        self.pipeline = build_pipeline(self.model, layout, pc.micro_batch_num, causal_lm_loss) if layout.pp > 1 else None
        self.ctx = TrainContext(global_batch_size=self.batches.global_batch_size)
        self.last_loss: float | None = None
        self.last_lr = 0.0
        self.last_seconds = 0.0

    @property
    def finished(self) -> bool:
        stop = self.cfg.runner_config.stop_step
        return self.ctx.epoch >= self.cfg.runner_config.epochs or (stop is not None and self.ctx.global_step >= stop)

    # -- one step -----------------------------------------------------------------------

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accumulate gradients over the micro batches; returns this rank's mean loss."""
        mbn = self.cfg.parallel_config.micro_batch_num
        if self.pipeline is not None:
            losses: list[torch.Tensor] = []
            if self.layout.is_first_stage:
                self.pipeline.step(x)
            elif self.layout.is_last_stage:
                self.pipeline.step(target=y, losses=losses)
            else:
                self.pipeline.step()
            return torch.stack(losses).mean().detach() if losses else torch.zeros((), device=x.device)
        total = torch.zeros((), device=x.device)
        for i, (xi, yi) in enumerate(zip(x.chunk(mbn), y.chunk(mbn))):
            if self.layout.sharded_optimizer:  # reduce-scatter once, after the last micro batch
                self.model.set_requires_gradient_sync(i == mbn - 1)
            loss = causal_lm_loss(self.model(xi), yi) / mbn
            loss.backward()
            total += loss.detach()
        return total

    def _global_loss(self, local: torch.Tensor) -> float:
        """The step's loss on every rank: mean over "dp", sent from the last pipeline stage."""
        if self.layout.dp > 1:
            dist.all_reduce(local, group=self.layout.group("dp"))
            local /= self.layout.dp
        if self.layout.pp > 1:
            dist.broadcast(local, group=self.layout.group("pp"), group_src=self.layout.pp - 1)
        return float(local.item())

    def train_step(self) -> float:
        """Run the next global step and advance ``ctx``; returns the step's loss."""
        start = time.perf_counter()
        ctx = self.ctx
        self.last_lr = lr_at(ctx.global_step, self.cfg.lr_schedule, self.total_steps)
        set_lr(self.optimizer, self.last_lr)
        x, y = self.batches.get(ctx.epoch, ctx.sample_in_epoch)
        local = self._forward_backward(x.to(self.layout.device), y.to(self.layout.device))
        sync_grads(self.model, self.layout)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = self._global_loss(local)

        gbs = ctx.global_batch_size
        ctx.global_step += 1
        ctx.step_in_epoch += 1
        ctx.sample_in_epoch += gbs
        ctx.consumed_samples += gbs
        if self.batches.epoch_done(ctx.sample_in_epoch):
            ctx.epoch, ctx.step_in_epoch, ctx.sample_in_epoch = ctx.epoch + 1, 0, 0
        self.last_seconds = time.perf_counter() - start
        return self.last_loss

    def fit(self) -> None:
        """Train until the configured epochs or ``runner_config.stop_step``, calling the hooks."""
        for cb in self.callbacks:
            cb.on_train_begin(self)
        report = _Report(self) if dist.get_rank() == 0 else None
        while not self.finished:
            self.train_step()
            if report is not None:
                report.step()
            if _STOP.preemption is not None:  # every rank, every step: one all-reduce of one integer
                self.preempted = _STOP.preemption.requested()
            with _STOP.deferred():  # a stop signal waits for the hooks' save to be handed over
                for cb in self.callbacks:
                    cb.on_step_end(self)
            if self.preempted is not None:
                raise Preempted(self.preempted, self.ctx.global_step)
        with _STOP.deferred():
            for cb in self.callbacks:
                cb.on_train_end(self)
        if report is not None:
            report.close()

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole training state, as ``resumable.save`` takes it (collective under FSDP)."""
        ctx, sched = self.ctx, self.cfg.lr_schedule
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "global_step": ctx.global_step,
            "epoch_num": ctx.epoch,
            "step_num": ctx.step_in_epoch,
            "consumed_samples": ctx.consumed_samples,
            "global_batch_size": ctx.global_batch_size,
            "loss_scale": None,
            "lr_schedule": {**sched.model_dump(), "total_steps": self.total_steps,
                            "next_lr": lr_at(ctx.global_step, sched, self.total_steps)},
            "data": {"source": self.batches.dataset.source, "num_samples": self.batches.dataset.num_samples,
                     "seed": self.cfg.seed, "epoch": ctx.epoch, "sample_in_epoch": ctx.sample_in_epoch},
            "rank_local": {"rng": _rng_state()},
            # The architecture, as transformers' config.json: `resumable convert --to hf` needs it.
            "model_config": hf_config(self.cfg.model),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (possibly saved on another layout).

        The learning rate follows from ``global_step`` and this run's config. If the data
        changed (other source or size: incremental training), the new data starts at its
        beginning while the global step continues. ``rank_local`` may be missing or None
        (e.g. after a world-size change): the RNG state is then left as it is.
        """
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        ctx, data, dataset = self.ctx, state["data"], self.batches.dataset
        ctx.global_step = int(state["global_step"])
        ctx.consumed_samples = int(state["consumed_samples"])
        if (data["source"], data["num_samples"]) == (dataset.source, dataset.num_samples):
            ctx.epoch, ctx.sample_in_epoch = int(data["epoch"]), int(data["sample_in_epoch"])
        else:
            logger.info("data changed (%s, %s samples -> %s, %s samples): starting it from its beginning",
                        data["source"], data["num_samples"], dataset.source, dataset.num_samples)
            ctx.epoch, ctx.sample_in_epoch = 0, 0
        ctx.step_in_epoch = ctx.sample_in_epoch // ctx.global_batch_size
        rank_local = state.get("rank_local")
        if rank_local and rank_local.get("rng"):
            _set_rng_state(rank_local["rng"])


class _Report:
    """Rank 0's output: ``<output_dir>/log/train.jsonl``, a progress bar or log lines, a summary."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.path = trainer.cfg.local_dir / "log" / "train.jsonl"
        self.file = _append_run(self.path, trainer.ctx.global_step)
        self.start_step = trainer.ctx.global_step
        self.config = record_config(trainer.cfg, self.path.parent, self.start_step)  # one file per run
        self.tokens = 0
        self.seconds = 0.0
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self._last_step(), initial=self.start_step, unit="step")

    def _last_step(self) -> int:
        t = self.trainer
        remaining_epochs = t.cfg.runner_config.epochs - t.ctx.epoch
        last = t.ctx.global_step + remaining_epochs * t.batches.steps_per_epoch - t.ctx.step_in_epoch
        stop = t.cfg.runner_config.stop_step
        return min(last, stop) if stop is not None else last

    def step(self) -> None:
        t, ctx = self.trainer, self.trainer.ctx
        tokens = ctx.global_batch_size * t.cfg.train_dataset.seq_length
        self.tokens += tokens
        self.seconds += t.last_seconds
        record = {"global_step": ctx.global_step, "epoch": ctx.epoch, "step_in_epoch": ctx.step_in_epoch,
                  "loss": t.last_loss, "lr": t.last_lr, "tokens_per_s": tokens / t.last_seconds,
                  "seconds": t.last_seconds}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{t.last_loss:.4f}", lr=f"{t.last_lr:.2e}")
        elif ctx.global_step % t.cfg.runner_config.log_interval == 0:
            logger.info("step %d (epoch %d, step %d): loss %.4f, lr %.3e, %.0f tokens/s",
                        ctx.global_step, ctx.epoch, ctx.step_in_epoch, t.last_loss, t.last_lr,
                        record["tokens_per_s"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        t = self.trainer
        steps = t.ctx.global_step - self.start_step
        speed = self.tokens / self.seconds if self.seconds else 0.0
        loss = f"{t.last_loss:.4f}" if t.last_loss is not None else "n/a"
        print(f"trained {steps} steps (global step {t.ctx.global_step}), final loss {loss}, "
              f"{speed:.0f} tokens/s\n  log: {self.path}\n  config: {self.config}\n"
              f"  checkpoints: {t.cfg.checkpoint_dir}", flush=True)


#: ``train.jsonl``'s line between two runs' records; readers of the step records skip lines with "event".
RUN_START = "run_start"


def _append_run(path: Path, start_step: int) -> TextIO:
    """Open a run's log for appending: an earlier run's records are never truncated (a rerun, even one
    that discards newer checkpoints, may repeat their steps); a later run's follow a ``run_start`` line."""
    last = storage.local.last_byte(path)
    file = storage.local.open_append(path)
    if last:
        cut = last != b"\n"  # the earlier run was killed in the middle of a line
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        file.write(("\n" if cut else "") + json.dumps({"event": RUN_START, "start_step": start_step,
                                                        "time": stamp}) + "\n")
        file.flush()
    return file


def setup_logging() -> None:
    """Log with the rank in the prefix; INFO on rank 0, warnings elsewhere. Keeps existing handlers."""
    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                            level=logging.INFO if rank == 0 else logging.WARNING)


def _init_distributed() -> bool:
    """Join the torchrun job, or make a 1-process group; True if this call created it."""
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if "WORLD_SIZE" in os.environ:
        _join_job(backend)
    else:  # a store in memory: one process needs no rendezvous and no port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


#: Environment variable: seconds a rank waits for the job's store and for its peers to join.
RENDEZVOUS_ENV = "RESUMABLE_RENDEZVOUS_TIMEOUT"


def _join_job(backend: str) -> None:
    """Join the torchrun job (env://), every wait bounded.

    Connecting to the store and waiting for the peers (the backend's address exchange
    goes through the store, which keeps this bound) take at most
    ``$RESUMABLE_RENDEZVOUS_TIMEOUT`` seconds (default 10 min, torchrun's own join
    timeout); each collective afterwards at most ``$RESUMABLE_COLLECTIVE_TIMEOUT`` (30 min,
    a slow file system must not fail a healthy save), after which a dead or hung peer is
    an error on the others.

    Raises:
        ConfigError: the job did not come together in time, naming the address and the bound.
    """
    rendezvous = env_seconds(RENDEZVOUS_ENV, timedelta(minutes=10))
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=rendezvous))
        # torchrun keeps its store across restarts (--max-restarts): the backend's address exchange of an
        # earlier attempt would still be there (dead peers' addresses), so each attempt has keys of its own.
        store = dist.PrefixStore(f"resumable/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=collective_timeout())
    except dist.DistError as exc:  # a store or connect timeout, a peer that closed
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise ConfigError(
            f"rank {os.environ.get('RANK')}: the job's {os.environ['WORLD_SIZE']} processes did not all join at "
            f"{where} within {rendezvous.total_seconds():g} s ({RENDEZVOUS_ENV}): a process did not start or "
            f"died, or MASTER_ADDR/MASTER_PORT differ between them ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _finish_saves() -> None:
    """On the way out after an error or a stop signal: let the save in flight commit before the
    process group goes (on a normal end the monitor already waited for it)."""
    committed, failures = finish_pending()
    for path in committed:
        logger.info("the checkpoint save in flight was committed before exiting: %s", path)
    for text in failures:
        logger.error("the checkpoint save in flight when training stopped failed (the newest committed "
                     "checkpoint is unchanged): %s", text)


def _fix_threads() -> None:
    """One intra-op thread unless OMP_NUM_THREADS says otherwise.

    A fixed count keeps CPU kernels bitwise repeatable; one thread because the reference
    model is tiny and, on a busy machine, spinning OpenMP threads made steps 20x slower.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run(cfg: TrainConfig, callbacks: Iterable[Callback] = ()) -> Trainer:
    """Train ``cfg`` on this process's share of the job (all ranks call it); returns the Trainer.

    Under ``torchrun`` it joins the job from the environment; without ``WORLD_SIZE`` it runs
    as a single process. A process group it creates, it also destroys.

    Ends: a stop signal (``proctree.STOP_SIGNALS``) raises :class:`Interrupted`, an error
    propagates; either way the save in flight is finished (committed, or failed and
    discarded: never half-committed) before the process group is destroyed.
    """
    setup_logging()
    check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any work
    _fix_threads()
    mon = cfg.checkpoint
    _STOP.preemption = Preemption(mon.preemption_signals) if mon is not None and mon.save_on_preemption else None
    with _STOP:
        created = _init_distributed()
        try:
            trainer = Trainer(cfg, build_layout(cfg), callbacks)
            trainer.fit()
            # Leave together: gloo torn down while a peer still finishes FSDP's last
            # collectives sometimes aborts that peer ("terminate called without an active exception").
            dist.barrier()
            return trainer
        finally:
            try:
                with _STOP.deferred():  # a first stop signal now must not cut this wait
                    _finish_saves()  # its commit needs the process group: before destroying it
            finally:
                if created:
                    dist.destroy_process_group()
