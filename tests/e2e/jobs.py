"""Run real ``resumable train`` jobs from tests: build the command, run or kill it, read its log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from resumable.commit import read_tracker
from resumable.proctree import kill_tree

# A small, quick job: 2 layers, short sequences; one step is a few milliseconds.
SMALL = ["model.num_hidden_layers=2", "train_dataset.seq_length=32", "runner_config.batch_size=4",
         "lr_schedule.warmup_steps=2", "parallel_config.data_parallel=1", "parallel_config.model_parallel=1"]


def train_cmd(out: Path, *overrides: str, nproc: int = 0, base: list[str] = SMALL) -> list[str]:
    sets = [x for kv in [*base, f"output_dir={out}", *overrides] for x in ("--set", kv)]
    return [sys.executable, "-m", "resumable.cli", "train", *(["--nproc", str(nproc)] if nproc else []), *sets]


def _env() -> dict[str, str]:
    # A test process may itself run under torchrun variables; the job must not inherit them.
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}


def run_job(cmd: list[str], *, expect_ok: bool = True, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**_env(), **(env or {})}, start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid, signal.SIGKILL)  # torchrun workers too: never leave a hung job behind
        out, err = job.communicate()
        raise AssertionError(f"job hung for {timeout} s and was killed:\n{out[-2000:]}\n{err[-4000:]}") from None
    done = subprocess.CompletedProcess(cmd, job.returncode, out, err)
    if expect_ok:
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def log_records(out: Path) -> list[dict]:
    """The step records of every run logged in ``out`` (the lines between runs, ``{"event": ...}``, left out)."""
    path = out / "log" / "train.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if "event" not in r]


def losses(out: Path) -> dict[int, float]:
    """global step → loss; a step logged again after a resume keeps its last value."""
    return {r["global_step"]: r["loss"] for r in log_records(out)}


def kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start a job and SIGKILL its whole process tree once ``ready()`` is true (polled every 10 ms)."""
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                           start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ready():
                return
            if job.poll() is not None:
                raise AssertionError(f"job ended (exit {job.returncode}) first:\n{job.stderr.read()[-3000:]}")
            time.sleep(0.01)
        raise AssertionError(f"job was not ready to be killed in {timeout} s")
    finally:
        if job.poll() is None:
            kill_tree(job.pid, signal.SIGKILL)
        job.wait()


def run_until_step_then_kill(cmd: list[str], out: Path, step: int, *, committed: int = 0,
                             timeout: float = 300) -> int:
    """Start a job, SIGKILL its whole process tree once its log reaches ``step`` and its tracker
    names at least ``committed`` (an async save commits later than the step it saves);
    return the last logged step."""
    kill_when(cmd, lambda: bool(records := log_records(out)) and records[-1]["global_step"] >= step
              and (read_tracker(out / "checkpoint") or 0) >= committed, timeout)
    return log_records(out)[-1]["global_step"]


def start_bodies(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 workers: int = 2) -> Iterator[dict[str, Future]]:
    """For a module fixture: run the bodies of the module's selected tests side by side; yield
    test name -> its future.

    A test ``test_<x>`` whose module defines ``_<x>(out, **its parameters)`` has that body
    submitted at once to ``workers`` threads, with a fresh folder; the test itself waits for
    its future (``started[request.node.name].result()``), so a failure is still its own. Jobs
    of one or two processes that wait on their saves leave a core idle: two share 2 cores.
    """
    pool = ThreadPoolExecutor(workers)
    futures = {}
    for item in request.session.items:
        body = getattr(request.module, "_" + item.originalname.removeprefix("test_"), None)
        if item.module is not request.module or body is None:
            continue
        params = item.callspec.params if hasattr(item, "callspec") else {}
        futures[item.name] = pool.submit(body, tmp_path_factory.mktemp(re.sub(r"\W", "_", item.name)[:40]), **params)
    yield futures
    pool.shutdown(cancel_futures=True)  # an interrupted session waits for the running bodies only
