"""A two-node job (two torchrun agents on this machine) and SHARED_PATHS; the two tests' jobs run
side by side (``jobs.start_bodies``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from resumable.commit import read_tracker
from tests.e2e.jobs import SMALL, _env, start_bodies
from tests.launch import free_port


def _two_nodes(out: Path, shared: str | None) -> list[subprocess.CompletedProcess]:
    port = free_port()
    sets = [x for kv in [*SMALL, "parallel_config.data_parallel=2", f"output_dir={out}",
                         "runner_config.stop_step=2"] for x in ("--set", kv)]
    env = _env()
    env.pop("SHARED_PATHS", None)
    if shared is not None:
        env["SHARED_PATHS"] = shared
    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                          f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                          "-m", "resumable.train", *sets],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for node in (0, 1)
    ]
    return [subprocess.CompletedProcess(a.args, a.wait(timeout=240), *a.communicate()) for a in agents]


def _a_multi_node_job_outside_shared_paths_stops_before_training(tmp_path: Path) -> None:
    out = tmp_path / "local"
    for done in _two_nodes(out, shared=None):
        assert done.returncode != 0
        assert "is not under a shared path; SHARED_PATHS lists nothing (SHARED_PATHS is not set)" in done.stderr
    assert not (out / "log" / "train.jsonl").exists()  # no step was taken


def _a_multi_node_job_under_shared_paths_trains_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "shared" / "run"
    for done in _two_nodes(out, shared=f"/nonexistent:{tmp_path / 'shared'}"):
        assert done.returncode == 0, done.stderr[-3000:]
    assert read_tracker(out / "checkpoint") == 2


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    yield from start_bodies(request, tmp_path_factory)


def test_a_multi_node_job_outside_shared_paths_stops_before_training(started, request):
    started[request.node.name].result()


def test_a_multi_node_job_under_shared_paths_trains_and_checkpoints(started, request):
    started[request.node.name].result()
