"""Preemption: a SIGTERM (or the configured signal) to the launcher or to one worker makes every rank
save the same next step; the job exits with 75 (``PREEMPTED_EXIT``) and the identical command resumes
bit for bit. The library offers the same to any loop (``CheckpointManager.preemption_requested``).

Real ``resumable train`` jobs (1 and 2 processes) and a real 2-rank gloo loop, real signals; SIGTERM to the
launcher of a 2-process job is ``tests/e2e/test_stop_signals.py``'s wrapper test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resumable import CheckpointManager, commit
from resumable.errors import ConfigError
from resumable.preemption import PREEMPTED_EXIT
from resumable.proctree import children, kill_tree
from tests.e2e.jobs import _env, log_records, losses, run_job, train_cmd
from tests.launch import run_distributed

pytestmark = pytest.mark.slow

STEPS = 14


def _cmd(out: Path, *extra: str, nproc: int = 0) -> list[str]:
    # Saves only at the end: what a resume continues from is the preemption's save.
    return train_cmd(out, f"load_checkpoint={out / 'checkpoint'}", "resume_training=true",
                     f"runner_config.stop_step={STEPS}", "callbacks.0.save_checkpoint_steps=1000",
                     *extra, nproc=nproc)


def _signal_at_step(cmd: list[str], out: Path, step: int, target) -> subprocess.CompletedProcess:
    """Start the job, send SIGTERM to ``target(job)`` once step ``step`` is logged, wait for the end."""
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (log_records(out) and log_records(out)[-1]["global_step"] >= step):
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-3000:] if job.stderr else ""
            time.sleep(0.01)
        os.kill(target(job), signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=120)
        return subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)
    finally:
        if job.poll() is None:
            kill_tree(job.pid, signal.SIGKILL)
            job.wait()


def _rank1(job: subprocess.Popen) -> int:
    """Rank 1's worker: the launcher's torchrun's children, in rank order (each started as -m resumable.train)."""
    deadline = time.monotonic() + 30
    while True:
        workers = [p for t in children(job.pid) for p in children(t)]
        if len(workers) == 2 or time.monotonic() > deadline:
            ranks = {int(open(f"/proc/{p}/environ", "rb").read().split(b"RANK=")[1].split(b"\0")[0]): p
                     for p in workers}
            return ranks[1]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    runs = {}
    for label, nproc in (("single", 0), ("dp2", 2)):
        out = tmp_path_factory.mktemp(label)
        run_job(_cmd(out, *(["parallel_config.data_parallel=2"] if nproc else []), nproc=nproc))
        runs[label] = losses(out)
    return runs


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigterm_saves_the_next_step_exits_75_and_the_identical_command_resumes_bit_for_bit(
        tmp_path: Path, reference, async_save: bool) -> None:
    out = tmp_path / "job"
    cmd = _cmd(out, f"callbacks.0.async_save={str(async_save).lower()}")
    done = _signal_at_step(cmd, out, 6, lambda job: job.pid)
    assert done.returncode == PREEMPTED_EXIT, done.stderr[-3000:]
    saved = commit.read_tracker(out / "checkpoint")
    assert saved == log_records(out)[-1]["global_step"] >= 6  # the step boundary after the signal, committed
    assert f"training stopped for preemption; the newest checkpoint is iteration {saved}" in done.stderr
    assert "Traceback" not in done.stderr
    again = run_job(cmd)
    assert f"at global step {saved}" in again.stderr
    got, ref = losses(out), reference["single"]
    assert [got[s] for s in range(saved + 1, STEPS + 1)] == [ref[s] for s in range(saved + 1, STEPS + 1)]


def _torchrun(job: subprocess.Popen) -> int:
    """The launcher's torchrun (what a scheduler signalling the job's processes one by one reaches too)."""
    [torchrun] = children(job.pid)
    return torchrun


@pytest.mark.parametrize("target", [_rank1, _torchrun], ids=["rank-1-worker", "torchrun"])
def test_sigterm_to_one_worker_or_torchrun_saves_the_same_step_on_every_rank(tmp_path: Path, reference,
                                                                             target) -> None:
    # To the launcher of 2 processes: tests/e2e/test_stop_signals.py (the wrapper test).
    out = tmp_path / "job"
    cmd = _cmd(out, "parallel_config.data_parallel=2", nproc=2)
    done = _signal_at_step(cmd, out, 6, target)
    assert done.returncode == PREEMPTED_EXIT, done.stderr[-3000:]
    saved = commit.read_tracker(out / "checkpoint")
    assert saved == log_records(out)[-1]["global_step"]
    assert f"training stopped for preemption; the newest checkpoint is iteration {saved}" in done.stderr
    assert "preemption requested" in done.stderr and ("[rank 1]" in done.stderr or target is _torchrun)
    again = run_job(cmd)
    assert f"at global step {saved}" in again.stderr
    got, ref = losses(out), reference["dp2"]
    assert [got[s] for s in range(saved + 1, STEPS + 1)] == [ref[s] for s in range(saved + 1, STEPS + 1)]


def _library_loop(rank: int, world: int, folder: str) -> tuple[int, int]:
    manager = CheckpointManager(folder, preemption=True)
    w = torch.zeros(4)
    try:
        for step in range(1, 100):
            w += 1  # a training step
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is told
            if (sig := manager.preemption_requested()) is not None:
                manager.save({"model": {"w": w}}, step)
                manager.wait()
                return step, sig
    finally:
        manager.close()
    return -1, 0


def test_a_users_loop_asks_the_manager_and_every_rank_agrees_on_the_step(tmp_path: Path) -> None:
    results = run_distributed(_library_loop, 2, str(tmp_path / "ckpt"))
    assert results == [(3, int(signal.SIGTERM))] * 2
    assert commit.read_tracker(tmp_path / "ckpt") == 3
    with CheckpointManager(tmp_path / "other") as manager, pytest.raises(ConfigError, match="preemption=True"):
        manager.preemption_requested()
