"""The torchrun that ``resumable train`` starts, how its workers tell it how they ended, and the
line the CLI ends a stopped job with.

Launch chain (:mod:`resumable.proctree`): the ``resumable`` CLI → this launcher (torchrun
itself, run by :func:`main`) → N workers (``resumable.train.__main__``). :func:`command`
starts both as ``python -c BOOT MODULE ...``: ``BOOT`` makes every stop signal end the
process silently with 128 + n until the module's ``main`` handles signals itself (under
``python -m`` a Ctrl-C while torch was imported, seconds, printed a traceback per process).

A worker leaves how it ended in torchrun's per-worker error file (``$TORCHELASTIC_ERROR_FILE``)
instead of printing it (:func:`report`); the launcher prints the first failing rank's error
once (:func:`outcome`): exit status 2 for a configuration or checkpoint error, 1 for anything
else, nothing for a stop (the CLI then prints :func:`stopped`). torchrun's own log lines and
its ChildFailedError report are hidden unless ``$LOGLEVEL`` (torchrun's switch) is set.
A stop signal to torchrun itself, which passes it on to the workers, ends the job with 75 when
every worker saved for preemption (:func:`signalled`, from the error files).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from resumable import storage
from resumable.commit import latest_committed, parse_iteration
from resumable.errors import CheckpointError, CheckpointNotFoundError
from resumable.preemption import PREEMPTED_EXIT
from resumable.proctree import STOP_SIGNALS, bind_to_launcher
from resumable.storage.local import make_temp_dir

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from resumable.train.config import TrainConfig

#: Set by the launcher for its workers: they report how they ended instead of printing it.
LAUNCHED_ENV = "RESUMABLE_LAUNCHED"
_REPORT_KEY = "resumable"  # our part of torchrun's error file

_BOOT = (
    "import importlib, os, signal, sys\n"
    f"for s in {sorted(int(s) for s in STOP_SIGNALS)}:\n"
    "    signal.signal(s, lambda n, _: os._exit(128 + n))\n"
    "module = importlib.import_module(sys.argv.pop(1))\n"
    "if hasattr(module, '__path__'):\n"
    "    module = importlib.import_module(module.__name__ + '.__main__')\n"
    "try:\n"
    "    module.main(sys.argv[1:])\n"
    "finally:\n"
    "    import gc\n"
    "    gc.freeze()  # no final collection over torch's objects: a second or more per process at exit\n"
)


def boot(module: str) -> list[str]:
    """The command that runs ``module``'s ``main(argv)`` (a package: its ``__main__``); a stop signal
    before that ``main`` installs its own handling ends the process with 128 + n, silently."""
    return [sys.executable, "-c", _BOOT, module]


def command(nproc: int, train_argv: list[str], max_restarts: int = 0) -> list[str]:
    """This launcher running ``resumable.train``'s main with ``train_argv`` on ``nproc`` local processes,
    restarting them up to ``max_restarts`` times after a failure (each restart resumes: :func:`restart_count`)."""
    return [*boot("resumable.train.launch"), "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--no-python", *boot("resumable.train"), *train_argv]


def restart_count() -> int:
    """How many times torchrun restarted this job's processes (``TORCHELASTIC_RESTART_COUNT``; 0 elsewhere)."""
    text = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(text) if text.isdigit() else 0


def report(status: int, text: str) -> bool:
    """In a worker of this launcher: record its exit ``status`` and what to print for it, and return True;
    False anywhere else (the caller prints ``text`` itself)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHED_ENV) != "1" or not path:
        return False
    now = time.time()
    # torchrun reads "message" and "timestamp" (whole seconds: too coarse to order ranks by).
    storage.write_atomic(Path(path), json.dumps({"message": text, "timestamp": int(now),
                                                 _REPORT_KEY: {"status": status, "time": now}}).encode())
    return True


def outcome(failures: Mapping[int, "ProcessFailure"]) -> tuple[int, str | None]:
    """The job's exit status and the one line to print (None for a stop) from its failed ranks.

    A configuration or checkpoint error of the lowest rank that has one (ranks that agree on
    an error all raise it at once, rank 0 naming the rank it came from), else the first other
    failure by the time it was reported: the ranks after it were stopped by torchrun (SIGTERM)
    or failed for want of it.
    """
    ended: list[tuple[float, int, int, str | None]] = []  # when, rank, status, what to print
    for rank, failure in failures.items():
        data = failure.error_file_data.get(_REPORT_KEY) if isinstance(failure.error_file_data, dict) else None
        if isinstance(data, dict):
            status = int(data["status"])
            text = {2: f"error: {failure.message}", 1: f"rank {rank} failed:\n{failure.message}"}.get(status)
            ended.append((float(data["time"]), rank, status, text))
        elif failure.exitcode < 0:
            cause = " (out of memory?)" if failure.signal_name() == "SIGKILL" else ""
            ended.append((failure.timestamp, rank, 1, f"rank {rank} was killed by {failure.signal_name()}{cause}"))
        elif failure.exitcode > 128:  # stopped by a signal before it could report
            ended.append((failure.timestamp, rank, failure.exitcode, None))
        else:  # a worker whose error file torchrun did not provide
            ended.append((failure.timestamp, rank, 2 if failure.exitcode == 2 else 1,
                          f"rank {rank} exited with status {failure.exitcode}"))
    errors = sorted((e for e in ended if e[2] < 128), key=lambda e: (e[2] != 2, e[1] if e[2] == 2 else e[0]))
    _, _, status, text = errors[0] if errors else min(ended)
    return status, text


def main(argv: list[str]) -> None:
    """torchrun ``argv``; exits with the job's status (:func:`outcome`), 128 + n after stop signal n."""
    bind_to_launcher()
    os.environ[LAUNCHED_ENV] = "1"  # the workers inherit it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "LOGLEVEL" not in os.environ:  # torchrun's lines repeat what the one line below says
        for name in ("torch", "torch.distributed"):
            for handler in logging.getLogger(name).handlers:
                handler.setLevel(logging.CRITICAL + 1)
    logs = make_temp_dir("resumable-torchrun-")  # where torchrun puts each worker's error file
    try:
        run(parse_args([f"--log-dir={logs}", *argv]))
    except SignalException as stop:  # the workers were told and waited for; the CLI says what is saved
        raise SystemExit(signalled(logs, int(stop.sigval))) from None
    except ChildFailedError as failed:
        status, text = outcome(failed.failures)
        if text is not None:
            print(f"resumable train: {text}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
    finally:
        storage.remove_tree(logs)


def signalled(logs: Path, signum: int) -> int:
    """The exit status of a job whose torchrun got stop signal ``signum``: 75 when every worker of the last
    attempt reported saving for preemption (the signal is a preemption signal: torchrun passed it on),
    else 128 + ``signum``. ``logs``: torchrun's ``--log-dir`` (``<run>/attempt_<n>/<rank>/error.json``)."""
    attempts = [(int(e.name.removeprefix("attempt_")), job / e.name) for job in _folders(logs)
                for e in storage.list_dir(job) if e.is_dir and e.name.removeprefix("attempt_").isdigit()]
    if not attempts:
        return 128 + signum
    statuses = []
    for rank in _folders(max(attempts)[1]):
        try:
            doc = json.loads(storage.read_bounded(rank / "error.json", "a worker's error file", 1 << 20))
            statuses.append(int(doc[_REPORT_KEY]["status"]))
        except (OSError, CheckpointError, ValueError, KeyError, TypeError):  # no report: it did not save
            return 128 + signum
    return PREEMPTED_EXIT if statuses and all(s == PREEMPTED_EXIT for s in statuses) else 128 + signum


def _folders(path: Path) -> list[Path]:
    return [path / e.name for e in storage.list_dir(path) if e.is_dir and not e.link]


def stopped(cfg: "TrainConfig", signum: int | None, again: str, resume: str) -> str:
    """What ``resumable train`` says after stop signal ``signum`` (None: a preemption, saved): the newest
    checkpoint of ``cfg``'s folder and ``resume``, the command that resumes from it (``again`` when there
    is none)."""
    stop = "training stopped for preemption" if signum is None else f"training stopped by {signal.Signals(signum).name}"
    try:
        newest = _newest(cfg)
    except CheckpointError as err:
        return f"{stop}; the newest checkpoint in {cfg.checkpoint_dir} cannot be read: {err}"
    if newest is None:
        return f"{stop} before any checkpoint was saved in {cfg.checkpoint_dir}; start again with: {again}"
    return f"{stop}; the newest checkpoint is {newest}; resume with: {resume}"


def _newest(cfg: "TrainConfig") -> str | None:
    """The newest committed checkpoint of ``cfg``'s folder, in words, or None."""
    if not cfg.use_legacy_format:
        folder = latest_committed(cfg.checkpoint_dir)
        return None if folder is None else f"iteration {parse_iteration(folder.name)} ({folder})"
    if cfg.checkpoint is None:
        return None
    from resumable.formats.mindformers import select_legacy_files  # torch: only after a stopped legacy job

    try:
        (epoch, step), files = select_legacy_files(cfg.checkpoint_dir, cfg.checkpoint.checkpoint_format)
    except CheckpointNotFoundError:
        return None
    others = " and the other ranks' files of that step" if len(files) > 1 else ""
    return f"epoch {epoch} step {step} ({files[0]}{others})"
