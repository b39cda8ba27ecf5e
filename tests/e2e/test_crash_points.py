"""A job SIGKILLed at any instant of a save resumes from a complete checkpoint, losing at most one interval.

Real ``python -m resumable.train`` jobs (tiny model, 1-2 processes) are killed either by
themselves at named points of the save (``RESUMABLE_FAULT``, deterministic) or by us, whole
process tree, at instants drawn by a seeded RNG. After each kill the checks of
``tools/soak.py`` run: the tracker (legacy: every rank's meta.json) names a complete
checkpoint whose checksums verify, the identical command resumes from exactly it, the
kill's leftovers are gone once it trains, and at most one save interval (two with async
saves) of logged steps is lost. Each chain ends with an unharmed run that must finish at
``stop_step`` with nothing temporary left. ``make soak`` runs the long, random version.

The chains of the selected tests start together, two at a time (a job is mostly one process
and waits on its saves: 2 cores), and each test waits for its own chain and its checks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests.e2e.jobs import start_bodies
from tools.soak import Chain, Job, after_run, check_finished, damage, run_job

pytestmark = pytest.mark.slow


def _chain(job: Job, out: Path, faults: list[str], random_kills: int = 0, seed: int = 0) -> Chain:
    """Run ``job`` once per fault (each must kill it), ``random_kills`` times killed at a seeded
    random instant of its training, then once unharmed; check every run."""
    chain = Chain(job, out)
    for fault in faults:
        run = run_job(job, out, fault=fault)
        assert run.killed, f"{fault} never fired (exit {run.returncode}):\n{run.log[-3000:]}"
        after_run(chain, run)
    rng = random.Random(seed)
    for _ in range(random_kills):
        # A job that saves every step spends most of its training time in saves: the
        # instant lands in staging, writing, fsync, rename, tracker or retention.
        after_run(chain, run_job(job, out, kill_at=rng.uniform(0.05, 0.4)))
    final = run_job(job, out)
    after_run(chain, final)
    check_finished(chain)
    return chain


def _sync_saves_survive_a_kill_at_every_step_of_the_commit_and_at_random_instants(out: Path) -> None:
    # ":2" (":3" for one-file-written, reached once per file) lets the first save of the run
    # commit, so each kill has something to lose.
    chain = _chain(Job("v2-sync-1p", stop_step=12), out,
                   ["one-file-written:3", "before-rename:2", "after-rename:2", "atomic-write:3", "retention-renamed:1"],
                   random_kills=2, seed=8)
    assert chain.runs == 8


def _async_saves_survive_a_kill_while_staging_and_while_the_background_thread_commits(out: Path) -> None:
    _chain(Job("v2-async-1p", async_save=True), out, ["staged:2", "files-written:3"])


def _legacy_saves_survive_a_kill_between_file_and_meta_json(out: Path) -> None:
    _chain(Job("legacy-1p", legacy=True), out, ["legacy-file-published:2", "atomic-write:2"])


def _asynchronous_legacy_saves_survive_a_kill_while_staging_and_in_the_background(out: Path) -> None:
    _chain(Job("legacy-async-1p", legacy=True, async_save=True), out, ["staged:2", "legacy-before-meta:2"])


def _legacy_keep_one_never_deletes_the_last_step_complete_on_every_rank(out: Path) -> None:
    # Rank 1 dies before its meta.json names the new step; rank 0 must not have deleted the
    # previous step's file by then (retention waits until every rank recorded the new step).
    _chain(Job("legacy-2p-keep1", nproc=2, legacy=True, keep=1, stop_step=6), out, ["legacy-before-meta:2@1"])


def _a_damaged_newest_checkpoint_is_refused_untouched_then_discarded_on_request(out: Path, kind: str) -> None:
    # after_run checks the refusal (exit != 0, the damaged iteration and discard_newer_checkpoints
    # named, no byte changed), then the resume from the newest intact iteration, and that no
    # intact committed iteration was lost.
    job = Job("v2-sync-1p", stop_step=6)
    chain = Chain(job, out)
    run = run_job(job, out, fault="after-tracker:4")
    assert run.killed
    after_run(chain, run)
    assert damage(chain, random.Random(0), kind) == kind
    refusing = chain.refusal_due
    after_run(chain, run_job(job, out, discard=chain.discard))
    assert chain.discard == refusing and not chain.refusal_due
    final = run_job(job, out, discard=chain.discard)
    after_run(chain, final)
    check_finished(chain)


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    yield from start_bodies(request, tmp_path_factory)


def test_sync_saves_survive_a_kill_at_every_step_of_the_commit_and_at_random_instants(started, request) -> None:
    started[request.node.name].result()


def test_async_saves_survive_a_kill_while_staging_and_while_the_background_thread_commits(started, request) -> None:
    started[request.node.name].result()


def test_legacy_saves_survive_a_kill_between_file_and_meta_json(started, request) -> None:
    started[request.node.name].result()


def test_asynchronous_legacy_saves_survive_a_kill_while_staging_and_in_the_background(started, request) -> None:
    started[request.node.name].result()


def test_legacy_keep_one_never_deletes_the_last_step_complete_on_every_rank(started, request) -> None:
    started[request.node.name].result()


@pytest.mark.parametrize("kind", ["flip-shard", "garbage-tracker"])  # make soak draws all of DAMAGES
def test_a_damaged_newest_checkpoint_is_refused_untouched_then_discarded_on_request(started, request, kind) -> None:
    started[request.node.name].result()
