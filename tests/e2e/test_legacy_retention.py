"""Legacy retention through two-process ``resumable train`` jobs: every rank folder keeps what the policies say,
and a job SIGKILLed in the middle of the deletions resumes, its next save finishing them on every rank.

Real torchrun jobs of the tiny model (DP2, one legacy file per rank and step); the expected files are
computed from the logged losses by the pure policies (``resumable.retention.decide``), not by the saver.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resumable.cli import main as cli
from resumable.formats import v1
from resumable.legacy import resolve_legacy
from resumable.retention import KeepBest, Policy, decide
from tests.e2e.jobs import losses, run_job, train_cmd

pytestmark = pytest.mark.slow

SETS = ["use_legacy_format=true", "parallel_config.data_parallel=2", "callbacks.0.save_checkpoint_steps=1",
        "runner_config.log_interval=1"]
POLICY = ["callbacks.0.keep_checkpoint_max=1", "callbacks.0.keep_checkpoint_every_n_steps=3",
          "callbacks.0.keep_best_checkpoint_max=1", "callbacks.0.best_checkpoint_mode=max"]


def _steps(folder: Path) -> list[int]:
    """The global steps of a rank folder's files on disk, as its meta.json records them."""
    meta = v1.read_meta(folder)
    assert meta is not None
    return sorted(meta.notes[p.name].global_step for p in folder.iterdir() if p.name != v1.META_JSON)


def test_two_ranks_keep_newest_every_third_and_best_and_survive_a_kill_between_two_deletions(tmp_path, capsys):
    out, tree = tmp_path / "out", tmp_path / "out" / "checkpoint"
    resume = [f"load_checkpoint={tree}", "resume_training=true"]
    # Job 1 keeps everything: five steps. Job 2 resumes with the policies; its first save (step 6)
    # deletes three files per rank folder, and rank 0 is killed before its second unlink.
    run_job(train_cmd(out, *SETS, "runner_config.stop_step=5", "callbacks.0.keep_checkpoint_max=100", nproc=2))
    killed = run_job(train_cmd(out, *SETS, *POLICY, *resume, "runner_config.stop_step=8", nproc=2),
                     expect_ok=False, env={"RESUMABLE_FAULT": "legacy-retention:2@0"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    loss = losses(out)
    policy = Policy(1, 3, KeepBest(1, mode="max"))
    at_six = decide({s: loss[s] for s in range(1, 7)}, policy, tracker=6, protected={5})
    doomed = [s for s in range(1, 7) if s not in at_six]
    assert len(doomed) >= 2, at_six  # the kill lands between two deletions
    assert _steps(tree / "rank_0") == sorted({*at_six, *doomed[1:]})  # the oldest victim went, the others stay
    assert set(_steps(tree / "rank_1")) >= set(at_six)  # rank 1 went on deleting until torchrun stopped it
    # Every rank can resume: every meta.json names step 6, present and intact on every rank.
    assert resolve_legacy(str(tree), True).position == (1, 6)
    assert cli(["verify", str(tree)]) == 0
    capsys.readouterr()

    # The same command resumes from step 6 (protected while it runs) and trains 7 and 8.
    run_job(train_cmd(out, *SETS, *POLICY, *resume, "runner_config.stop_step=8", nproc=2))
    loss = losses(out)
    expected = sorted(decide({s: loss[s] for s in range(1, 9)}, policy, tracker=8, protected={6}))
    assert _steps(tree / "rank_0") == _steps(tree / "rank_1") == expected
    assert expected == sorted({8, 3, 6, max(range(1, 9), key=lambda s: (loss[s], s))})
