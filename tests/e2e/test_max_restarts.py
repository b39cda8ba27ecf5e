"""``resumable train --max-restarts N``: a worker of a 4-process job dies, torchrun restarts the job, the
restart resumes from the newest complete checkpoint, and the job ends with the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resumable import commit
from resumable.proctree import children, kill_tree
from resumable.sources import open_source
from tests.e2e.jobs import _env, log_records, run_job, train_cmd

pytestmark = pytest.mark.slow

STEPS, EVERY = 10, 3


def _cmd(out: Path, *options: str) -> list[str]:
    # resume_training stays false: the first start is fresh, a restart resumes all the same.
    cmd = train_cmd(out, "parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                    f"runner_config.stop_step={STEPS}", f"callbacks.0.save_checkpoint_steps={EVERY}", nproc=4)
    cmd[4:4] = list(options)  # after "resumable.cli train"
    return cmd


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t.read() for name, t in open_source(folder).tensors.items()}


def _workers(launcher: int) -> list[int]:
    return [p for torchrun in children(launcher) for p in children(torchrun)]


def test_a_dead_worker_is_restarted_and_the_job_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    reference, out = tmp_path / "reference", tmp_path / "job"
    run_job(_cmd(reference))
    job = subprocess.Popen(_cmd(out, "--max-restarts", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (log_records(out) and log_records(out)[-1]["global_step"] >= EVERY + 2
                   and (commit.read_tracker(out / "checkpoint") or 0) >= EVERY):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before a worker was killed"
            time.sleep(0.02)
        os.kill(_workers(job.pid)[-1], signal.SIGKILL)  # one worker dies, no goodbye
        _, stderr = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            kill_tree(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, stderr[-3000:]
    assert "restart 1 of the job by its launcher: resuming from the newest complete checkpoint" in stderr
    final = f"iteration_{STEPS:08d}"
    want, have = _weights(reference / "checkpoint" / final), _weights(out / "checkpoint" / final)
    assert want.keys() == have.keys() and all(torch.equal(want[n], have[n]) for n in want)
