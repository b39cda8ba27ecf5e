"""A job SIGKILLed at any instant of a save resumes from a complete checkpoint, losing at most one interval.

Real ``python -m resumable.train`` jobs (tiny model, 1-2 processes) are killed either by
themselves at named points of the save (``RESUMABLE_FAULT``, deterministic) or by us, whole
process tree, at instants drawn by a seeded RNG. After each kill the checks of
``tools/soak.py`` run: the tracker (legacy: every rank's meta.json) names a complete
checkpoint whose checksums verify, the identical command resumes from exactly it, the
kill's leftovers are gone once it trains, and at most one save interval (two with async
saves) of logged steps is lost. Each chain ends with an unharmed run that must finish at
``stop_step`` with nothing temporary left. ``make soak`` runs the long, random version.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tools.soak import Chain, Job, after_run, check_finished, run_job

pytestmark = pytest.mark.slow


def _chain(job: Job, out: Path, faults: list[str]) -> Chain:
    """Run ``job`` once per fault (each must kill it), then once unharmed; check every run."""
    chain = Chain(job, out)
    for fault in faults:
        run = run_job(job, out, fault=fault)
        assert run.killed, f"{fault} never fired (exit {run.returncode}):\n{run.log[-3000:]}"
        after_run(chain, run)
    final = run_job(job, out)
    after_run(chain, final)
    check_finished(chain)
    return chain


def test_sync_saves_survive_a_kill_at_every_step_of_the_commit(tmp_path: Path) -> None:
    # ":2" lets the first save of the run commit, so each kill has something to lose.
    chain = _chain(Job("v2-sync-1p"), tmp_path, ["between-files:2", "before-rename:2", "after-rename:2",
                                                 "atomic-write:3", "retention-renamed:1"])
    assert chain.runs == 6


def test_async_saves_survive_a_kill_while_staging_and_while_the_background_thread_commits(tmp_path: Path) -> None:
    _chain(Job("v2-async-1p", async_save=True), tmp_path, ["staged:2", "files-written:3", "after-tracker:2"])


def test_legacy_saves_survive_a_kill_between_file_and_meta_json(tmp_path: Path) -> None:
    _chain(Job("legacy-1p", legacy=True), tmp_path, ["legacy-file-published:2", "atomic-write:2",
                                                     "legacy-after-meta:2"])


def test_legacy_keep_one_never_deletes_the_last_step_complete_on_every_rank(tmp_path: Path) -> None:
    # Rank 1 dies before its meta.json names the new step; rank 0 must not have deleted the
    # previous step's file by then (retention waits until every rank recorded the new step).
    _chain(Job("legacy-2p-keep1", nproc=2, legacy=True, keep=1, stop_step=6), tmp_path, ["legacy-before-meta:2@1"])


def test_kills_at_random_instants_of_a_saving_job(tmp_path: Path) -> None:
    rng = random.Random(8)
    job = Job("v2-sync-1p-random", interval=1, stop_step=10)
    chain = Chain(job, tmp_path)
    kills = 0
    for _ in range(3):
        run = run_job(job, tmp_path, kill_at=rng.uniform(0.0, 0.6))
        after_run(chain, run)
        kills += run.killed
    final = run_job(job, tmp_path)
    after_run(chain, final)
    check_finished(chain)
    assert kills >= 2  # the window is shorter than the job's training: most draws must land
