"""Every save and every tool output is durable before it is published, observed in its system calls.

SIGKILL keeps the page cache, so no crash test notices a missing fsync; these tests run
real saves (one process, two ``torch.distributed`` processes, Checkpoint 1.0, async) and
real tool runs under ``strace`` and check, from the trace (``tests/durability.py``), that
every file of each published folder was fsynced after its last write and before the
rename that publishes it, the folder itself before, its parent after, and that a first
save fsynced ``output_dir`` after creating ``checkpoint/`` in it (legacy: ``rank_0/``).
The traced runs of the selected tests go side by side, two at a time (``jobs.start_bodies``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from resumable.commit import TRACKER
from resumable.save import save
from tests.durability import creation_problems, members, publish_problems, run_traced, strace_works
from tests.e2e.jobs import _env, start_bodies, train_cmd

pytestmark = pytest.mark.skipif(not strace_works(), reason="strace cannot trace a child here (ptrace forbidden)")

SAVE = """
import sys, torch, resumable
state = {"model": {"w": torch.randn(64, 32), "b": torch.arange(5)},
         "optimizer": {"state": {"w": {"exp_avg": torch.randn(64, 32), "step": torch.tensor(1.0)}}}, "global_step": 1}
if sys.argv[2] == "async":
    resumable.async_save(state, sys.argv[1], 1).wait()
else:
    resumable.save(state, sys.argv[1], 1)
"""


def _run(cmd: list[str], trace: Path):
    done, calls = run_traced(cmd, trace, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return calls


def _assert_iteration_durable(calls, directory: Path, iteration: int) -> None:
    folder = directory / f"iteration_{iteration:08d}"
    assert (folder / "metadata.json").is_file()
    problems = publish_problems(calls, folder, members(folder)) + publish_problems(calls, directory / TRACKER)
    assert problems == []


def _a_first_save_fsyncs_every_file_the_folder_the_parent_and_output_dir(tmp_path: Path, how: str) -> None:
    ckpt = tmp_path / "out" / "checkpoint"
    calls = _run([sys.executable, "-c", SAVE, str(ckpt), how], tmp_path / "trace")
    _assert_iteration_durable(calls, ckpt, 1)
    assert creation_problems(calls, ckpt) + creation_problems(calls, ckpt.parent) == []


def _a_two_process_training_job_saves_durably(tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls = _run(train_cmd(out, "parallel_config.data_parallel=2", "runner_config.stop_step=2",
                           "callbacks.0.save_checkpoint_steps=2", nproc=2), tmp_path / "trace")
    ckpt = out / "checkpoint"
    files = sorted(p.name for p in (ckpt / "iteration_00000002").glob("*.safetensors"))
    assert len(files) == 4, files  # a model and an opt file per rank: both ranks' writes are in the trace
    _assert_iteration_durable(calls, ckpt, 2)
    assert creation_problems(calls, ckpt) == []


def _a_legacy_save_publishes_each_rank_file_and_meta_json_durably(tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls = _run(train_cmd(out, "use_legacy_format=true", "runner_config.stop_step=2",
                           "callbacks.0.save_checkpoint_steps=2"), tmp_path / "trace")
    rank = out / "checkpoint" / "rank_0"
    published = sorted(p for p in rank.iterdir() if p.suffix in (".safetensors", ".json"))
    assert [p.suffix for p in published] == [".safetensors", ".json"], published  # the step's file, meta.json
    assert [x for p in published for x in publish_problems(calls, p)] == []
    assert creation_problems(calls, rank) == []


def _source(tmp_path: Path) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    save({"model": {"model.embed_tokens.weight": torch.randn(32, 8, generator=g), "w": torch.randn(6, 4, generator=g)},
          "global_step": 3}, tmp_path / "src", 3)
    (tmp_path / "config.json").write_text('{"model_type": "custom"}')  # not Qwen3: its shapes are not checked
    return tmp_path / "src"


def _every_tool_output_is_fsynced_before_its_rename_and_its_parent_after(tmp_path: Path, tool: str) -> None:
    source = _source(tmp_path)
    out = tmp_path / "new" / "out"  # its parent is created too
    argv = {"merge": ["merge", str(source), str(out)],
            "convert --to hf": ["convert", str(source), str(out), "--to", "hf", "--hf-config",
                                str(tmp_path / "config.json")],
            "split": ["split", str(source), str(out), "--layout", "dp=2"]}[tool]
    calls = _run([sys.executable, "-m", "resumable.cli", *argv, "--quiet"], tmp_path / "trace")
    if tool == "split":
        _assert_iteration_durable(calls, out, 3)
        assert creation_problems(calls, out) == []
    else:
        assert list(out.glob("*.safetensors"))
        assert (out / "config.json").is_file() == (tool != "merge")  # merge: no known model, no config.json
        assert publish_problems(calls, out, members(out)) == []
    assert creation_problems(calls, out.parent) == []


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    yield from start_bodies(request, tmp_path_factory)


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_first_save_fsyncs_every_file_the_folder_the_parent_and_output_dir(started, request, how):
    started[request.node.name].result()


@pytest.mark.slow
def test_a_two_process_training_job_saves_durably(started, request):
    started[request.node.name].result()


@pytest.mark.slow
def test_a_legacy_save_publishes_each_rank_file_and_meta_json_durably(started, request):
    started[request.node.name].result()


@pytest.mark.parametrize("tool", ["merge", "convert --to hf", "split"])
def test_every_tool_output_is_fsynced_before_its_rename_and_its_parent_after(started, request, tool):
    started[request.node.name].result()
