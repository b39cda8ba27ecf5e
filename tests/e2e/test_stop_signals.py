"""Every way a ``resumable train`` job ends keeps its last save, leaves no process behind and
waits for nothing unboundedly. Real jobs (1 and 2 processes under torchrun), real signals
sent as a terminal (to the process group), ``kill`` (to the wrapper's pid) or a crash
(SIGKILL) would; the job's processes are found by a marker in their environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from resumable import commit
from resumable.preemption import PREEMPTED_EXIT
from resumable.resolve import verify_files
from tests.e2e.jobs import _env, log_records, train_cmd
from tests.launch import free_port

MARKER_ENV = "RESUMABLE_TEST_JOB"
# A model whose checkpoint (about 100 MB with the optimizer) takes long enough to write that
# the test sees the save in flight (its .tmp-iteration_* folder) and signals the job then.
BIG = ["model.hidden_size=512", "model.intermediate_size=2048", "model.head_dim=128",
       "callbacks.0.async_save=true", "callbacks.0.save_checkpoint_steps=2"]


def _job_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (a zombie's environment reads empty)."""
    wanted = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue  # ended while we looked, or not ours to read
    return pids


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"{what}: not within {timeout} s")


@contextmanager
def _job(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``cmd`` in a session of its own (a signal to its group never reaches the test) with a
    unique marker; on the way out SIGKILL whatever of it is left, passed or failed."""
    marker = uuid.uuid4().hex
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "w") as err:
        job = subprocess.Popen(cmd, env={**_env(), **(env or {}), MARKER_ENV: marker}, stdout=subprocess.DEVNULL,
                               stderr=err, start_new_session=True)
        try:
            yield job, marker
        finally:
            for pid in [job.pid, *_job_pids(marker)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            job.wait()


def _stderr(out: Path) -> str:
    return (out / "stderr.txt").read_text()


def _in_flight(checkpoint: Path) -> int | None:
    """The iteration of a save in progress (its temp folder exists), else None."""
    names = [p.name for p in checkpoint.glob(".tmp-iteration_*")] if checkpoint.is_dir() else []
    return int(names[0].rsplit("_", 1)[1]) if names else None


def _assert_committed_and_clean(checkpoint: Path, at_least: int) -> int:
    newest = commit.read_tracker(checkpoint)
    assert newest is not None and newest >= at_least, (newest, at_least)
    verify_files(checkpoint / f"iteration_{newest:08d}", checksum=True)
    assert not list(checkpoint.glob(".tmp-*")), "a save was left half-written"
    return newest


def _legacy_in_flight(checkpoint: Path) -> int | None:
    """The step of a legacy save in progress (a rank's ``.<file>.tmp-*``; first epoch), else None."""
    temps = list(checkpoint.glob("rank_*/.*.tmp-*"))
    return int(temps[0].name.split(".safetensors")[0].rsplit("_", 1)[1]) if temps else None


def _assert_legacy_committed_and_clean(checkpoint: Path, at_least: int, nproc: int) -> None:
    for rank in range(nproc):
        meta = json.loads((checkpoint / f"rank_{rank}" / "meta.json").read_text())
        assert meta["last_epoch"] == 1 and meta["last_step"] >= at_least, (rank, meta, at_least)
    assert not list(checkpoint.glob("rank_*/.*.tmp-*")), "a save was left half-written"
    verified = subprocess.run([sys.executable, "-m", "resumable.cli", "verify", str(checkpoint)],
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("nproc, layout, sig", [(1, "v2", signal.SIGINT), (1, "v2", signal.SIGTERM),
                                                (2, "v2", signal.SIGINT), (2, "legacy", signal.SIGINT)])
def test_ctrl_c_or_sigterm_during_an_async_save_commits_it_and_exits_128_plus_the_signal(
        tmp_path: Path, nproc: int, layout: str, sig: signal.Signals) -> None:
    out = tmp_path / "job"
    checkpoint = out / "checkpoint"
    legacy = layout == "legacy"
    # save_on_preemption off: SIGTERM is then a plain stop, as Ctrl-C (tests/e2e/test_preemption.py: on)
    cmd = train_cmd(out, *BIG, "runner_config.epochs=100000", f"parallel_config.data_parallel={nproc}",
                    "callbacks.0.save_on_preemption=false",
                    *(["use_legacy_format=true"] if legacy else []), nproc=nproc if nproc > 1 else 0)
    in_flight = _legacy_in_flight if legacy else _in_flight
    with _job(cmd, out) as (job, _):
        step = _wait_for(lambda: in_flight(checkpoint), 180, "an async save in flight")
        if sig == signal.SIGINT:
            os.killpg(job.pid, sig)  # what Ctrl-C in the terminal does
        else:
            os.kill(job.pid, sig)  # `kill PID`
        assert job.wait(timeout=120) == 128 + sig, _stderr(out)[-3000:]
    if legacy:
        _assert_legacy_committed_and_clean(checkpoint, step, nproc)
    else:
        _assert_committed_and_clean(checkpoint, step)
    assert f"training stopped by {sig.name}" in _stderr(out)
    assert "Traceback" not in _stderr(out), _stderr(out)[-3000:]


FAILING_LOOP = """
import sys
from resumable.train.checkpointing import checkpoint_callbacks
from resumable.train.config import load_config
from resumable.train.loop import Callback, run


class FailAfterSave(Callback):  # after the monitor: its async save of step 4 has just started
    def on_step_end(self, trainer):
        if trainer.ctx.global_step == 4:
            raise RuntimeError("a bug in the loop at step 4")


cfg = load_config(None, sys.argv[1:])
run(cfg, [*checkpoint_callbacks(cfg), FailAfterSave()])
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_an_error_in_the_loop_during_an_async_save_commits_it_then_fails(tmp_path: Path, nproc: int) -> None:
    out = tmp_path / "job"
    script = tmp_path / "failing_loop.py"
    script.write_text(FAILING_LOOP)
    sets = train_cmd(out, *BIG, "runner_config.stop_step=10", f"parallel_config.data_parallel={nproc}")[5::2]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    with _job([sys.executable, *launcher, str(script), *sets], out) as (job, _):
        assert job.wait(timeout=180) == 1, _stderr(out)[-3000:]
    assert "RuntimeError: a bug in the loop at step 4" in _stderr(out)
    assert _assert_committed_and_clean(out / "checkpoint", 4) == 4


def test_sigterm_to_the_wrapper_saves_on_every_process_stops_them_and_the_same_command_resumes(tmp_path: Path) -> None:
    out = tmp_path / "job"
    checkpoint = out / "checkpoint"
    cmd = train_cmd(out, f"load_checkpoint={checkpoint}", "resume_training=true", "runner_config.epochs=100000",
                    "callbacks.0.save_checkpoint_steps=3", "callbacks.0.async_save=true",
                    "parallel_config.data_parallel=2", nproc=2)
    with _job(cmd, out / "first") as (job, marker):
        _wait_for(lambda: (commit.read_tracker(checkpoint) or 0) >= 6, 180, "two committed checkpoints")
        os.kill(job.pid, signal.SIGTERM)  # `kill PID`, as a container runtime stops a job: a preemption
        assert job.wait(timeout=90) == PREEMPTED_EXIT, _stderr(out / "first")[-3000:]
        _wait_for(lambda: not _job_pids(marker), 10, "every process of the job gone")
    newest = _assert_committed_and_clean(checkpoint, 6)
    logged = len(log_records(out))
    assert newest == log_records(out)[-1]["global_step"]  # the step the workers agreed on was saved
    # The lock went with the job: the identical command takes the folder and resumes from the newest.
    with _job(cmd, out / "second") as (job, _):
        _wait_for(lambda: len(log_records(out)) > logged or job.poll() is not None, 180, "the relaunch trains")
        assert job.poll() is None, _stderr(out / "second")[-3000:]
        assert log_records(out)[logged]["global_step"] == newest + 1
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=90) == PREEMPTED_EXIT, _stderr(out / "second")[-3000:]


def _workers(marker: str) -> list[int]:
    """The job's torchrun workers (``-m resumable.train`` without ``.launch``)."""
    found = []
    for pid in _job_pids(marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"resumable.train" in argv and b"resumable.train.launch" not in argv:
            found.append(pid)
    return found


@pytest.mark.parametrize("phase", ["torchrun starting", "workers starting", "training"])
def test_a_sigkilled_wrapper_takes_torchrun_and_every_worker_with_it(tmp_path: Path, phase: str) -> None:
    out = tmp_path / "job"
    cmd = train_cmd(out, "runner_config.epochs=100000", "parallel_config.data_parallel=2", nproc=2)
    with _job(cmd, out) as (job, marker):
        ready = {"torchrun starting": lambda: len(_job_pids(marker)) >= 2,
                 "workers starting": lambda: len(_workers(marker)) == 2,
                 "training": lambda: len(log_records(out)) >= 2}[phase]
        _wait_for(ready, 180, phase)
        os.killpg(job.pid, signal.SIGKILL)  # the wrapper's whole process group, as a crash or `kill -9 -PGID`
        job.wait()
        _wait_for(lambda: not _job_pids(marker), 15, f"every process of the job gone (killed while {phase})")


def test_the_workers_of_a_users_own_torchrun_die_with_it(tmp_path: Path) -> None:
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "resumable.train", *train_cmd(out, "runner_config.epochs=100000", "parallel_config.data_parallel=2")[4:]]
    with _job(cmd, out) as (job, marker):
        _wait_for(lambda: len(log_records(out)) >= 2, 180, "training")
        os.kill(job.pid, signal.SIGKILL)  # torchrun alone: its workers run in sessions of their own
        job.wait()
        _wait_for(lambda: not _job_pids(marker), 15, "every worker gone")


def _lone_rank(tmp_path: Path, rank: int) -> tuple[subprocess.CompletedProcess, int]:
    out = tmp_path / f"rank{rank}"
    port = free_port()
    env = {**_env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RESUMABLE_RENDEZVOUS_TIMEOUT": "3"}
    cmd = [sys.executable, "-m", "resumable.train", *train_cmd(out, "parallel_config.data_parallel=2")[4:]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120), port


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_fails_after_the_rendezvous_timeout(tmp_path: Path, rank: int) -> None:
    start = time.monotonic()
    done, port = _lone_rank(tmp_path, rank)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"error: rank {rank}: the job's 2 processes did not all join at 127.0.0.1:{port} within 3 s "
            "(RESUMABLE_RENDEZVOUS_TIMEOUT): a process did not start or died, or MASTER_ADDR/MASTER_PORT "
            "differ between them") in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - start < 60


PDEATHSIG_PROBE = """
import ctypes, os, sys
from resumable.proctree import bind_to_launcher
bind_to_launcher()
bind_to_launcher()  # a second call (an in-process run after another) must not take itself for the launcher
value = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
print(value.value, os.environ["RESUMABLE_PARENT_PID"] == str(os.getpid()))
"""


def test_a_launched_process_is_bound_to_its_launcher_and_dies_if_the_launcher_is_already_gone() -> None:
    run = lambda parent: subprocess.run(  # noqa: E731
        [sys.executable, "-c", PDEATHSIG_PROBE], capture_output=True, text=True, timeout=60,
        env={**_env(), "RESUMABLE_PARENT_PID": str(parent)})
    bound = run(os.getpid())  # we are its parent
    assert (bound.returncode, bound.stdout) == (0, f"{int(signal.SIGKILL)} True\n"), bound.stderr
    orphan = run(1)  # a launcher pid that is not its parent: as if it had died before the call
    assert orphan.returncode == -signal.SIGKILL and orphan.stdout == "", orphan.stderr


@pytest.mark.parametrize("second_signal", [False, True])
def test_a_job_that_does_not_stop_is_killed_after_the_stop_timeout_or_at_a_second_signal(
        tmp_path: Path, second_signal: bool) -> None:
    out = tmp_path / "job"
    timeout = 60 if second_signal else 2
    cmd = train_cmd(out, "runner_config.epochs=100000", "parallel_config.data_parallel=2", nproc=2)
    cmd[4:4] = ["--stop-timeout", str(timeout)]
    with _job(cmd, out) as (job, marker):
        _wait_for(lambda: len(log_records(out)) >= 2, 180, "training")
        for pid in set(_job_pids(marker)) - {job.pid}:
            os.kill(pid, signal.SIGSTOP)  # a hung torchrun and hung workers: no stop request reaches them
        start = time.monotonic()
        os.kill(job.pid, signal.SIGTERM)
        if second_signal:
            time.sleep(1)  # the first one is being handled
            os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=timeout + 30) == 143, _stderr(out)[-3000:]
        _wait_for(lambda: not _job_pids(marker), 10, "every process of the job gone")
        took = time.monotonic() - start
        assert (took < 10) if second_signal else (timeout + 5 <= took < timeout + 15), took
    expected = ("second signal (SIGTERM): killing the job" if second_signal
                else f"the job did not stop within {timeout + 5} s: killing it")
    assert expected in _stderr(out), _stderr(out)[-3000:]
