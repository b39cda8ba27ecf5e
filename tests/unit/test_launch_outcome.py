"""Which one line ``resumable train``'s launcher prints for a failed job, and its exit status: each
rank writes its report as a worker does (``launch.report`` into torchrun's error file), torchrun's
own ``ProcessFailure`` reads it back, ``launch.outcome`` chooses."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from resumable.train.launch import LAUNCHED_ENV, outcome, report, signalled


def _ended(folder: Path, monkeypatch: pytest.MonkeyPatch, ranks: list[tuple[int, int, str | None]]) -> dict:
    """``ranks``: (rank, exit status, its report or None for none) in the order the ranks ended."""
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    failures = {}
    for rank, status, text in ranks:
        error_file = folder / f"{rank}" / "error.json"
        error_file.parent.mkdir(parents=True)
        if text is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
            assert report(status, text)
        failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=status, error_file=str(error_file))
    return failures


def test_outside_the_launcher_a_worker_prints_its_own_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    assert not report(2, "printed by the caller")


def test_a_configuration_error_wins_over_the_ranks_torchrun_stopped_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures = _ended(tmp_path, monkeypatch, [(1, 2, "train_dataset.path: missing"), (0, 143, "stopped by SIGTERM")])
    assert outcome(failures) == (2, "error: train_dataset.path: missing")


def test_of_ranks_agreeing_on_an_error_rank_0_speaks_whoever_reported_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures = _ended(tmp_path, monkeypatch, [(1, 2, "bad shard"), (0, 2, "rank 1 failed: bad shard")])
    assert outcome(failures) == (2, "error: rank 1 failed: bad shard")


def test_a_bug_is_the_first_failing_ranks_traceback_with_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures = _ended(tmp_path, monkeypatch, [(1, 1, "Traceback ...\nRuntimeError: a bug"),
                                              (0, 1, "Traceback ...\nRuntimeError: Connection closed by peer")])
    assert outcome(failures) == (1, "rank 1 failed:\nTraceback ...\nRuntimeError: a bug")


def test_a_killed_rank_is_named_and_a_job_that_only_stopped_prints_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    killed = _ended(tmp_path / "a", monkeypatch, [(1, -signal.SIGKILL, None), (0, 143, "stopped by SIGTERM")])
    assert outcome(killed) == (1, "rank 1 was killed by SIGKILL (out of memory?)")
    stopped = _ended(tmp_path / "b", monkeypatch, [(0, 130, "stopped by SIGINT"), (1, 130, None)])
    assert outcome(stopped) == (130, None)


@pytest.mark.parametrize("reports, status", [
    ({0: 75, 1: 75}, 75),           # every worker of the last attempt saved for preemption
    ({0: 75, 1: None}, 143),        # one worker ended without a report: it did not save
    ({0: 75, 1: 130}, 143),         # one stopped without saving (its own Ctrl-C)
], ids=["all-saved", "one-silent", "one-stopped"])
def test_a_signal_to_torchrun_ends_with_75_only_when_every_worker_saved_for_preemption(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reports: dict, status: int) -> None:
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    (tmp_path / "run_0" / "attempt_0" / "0").mkdir(parents=True)  # an earlier attempt, which did not save
    for rank, saved in reports.items():  # torchrun's --log-dir layout: <run>/attempt_<n>/<rank>/error.json
        error_file = tmp_path / "run_0" / "attempt_1" / str(rank) / "error.json"
        error_file.parent.mkdir(parents=True)
        if saved is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
            assert report(saved, "stopped")
    assert signalled(tmp_path, signal.SIGTERM) == status
