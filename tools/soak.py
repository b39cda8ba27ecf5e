"""Crash soak: start real training jobs, SIGKILL them at random instants, check and resume, many times.

    python tools/soak.py --kills 50            # about 5-10 minutes on 2 cores
    python tools/soak.py --kills 10 --seed 3   # a shorter, different run
    make soak

Each *chain* is one scenario (1 or 2 processes, sync or async saves, Checkpoint 2.0 or
legacy) in a fresh output folder. The same command is started again and again; each run
is killed (whole process tree, SIGKILL) at an instant drawn by a seeded RNG, either a
time after training started (it then dies while staging, writing, fsyncing, renaming,
updating the tracker or applying retention, since the job saves every step or two), a
time during start-up (while it resolves, loads or cleans), or, deterministically, at a
named point of the save through ``RESUMABLE_FAULT`` (:func:`resumable.commit.fault_point`).
After every kill:

1. the tracker (legacy: every rank's ``meta.json``) names a complete checkpoint, and every
   committed Checkpoint 2.0 folder verifies with checksums (:func:`resolve.verify_files`);
2. the next run of the identical command resumes from exactly that checkpoint;
3. the leftovers of the kill (``.tmp-``/``.old-``/``.del-`` folders, ``.*.tmp-*`` files) are
   gone once that run has started training;
4. it lost at most one save interval of logged steps (two with async saves: one save may
   be in flight while training runs on);
5. no good committed iteration was lost: each one the run found is still there, unchanged,
   unless retention deleted it behind ``keep`` newer committed ones, or the run re-saved it.

Between kills of a Checkpoint 2.0 chain the soak sometimes damages the tracker's target
(:data:`DAMAGES`: a flipped byte or a cut in a shard, a flipped byte in ``common.json`` or
``metadata.json``) or the tracker itself. The next run must then refuse to start, naming the
damaged iteration, without touching a byte of the folder (the fallback would train over an
iteration newer than the one it loads); the run after it is told to discard the damaged
iteration (``discard_newer_checkpoints: true``) and must resume from the newest intact one.
A garbage tracker needs no such choice: the newest committed iteration is intact.

A chain ends when a run reaches ``stop_step`` unharmed; the final state must then be the
last step, committed, with no leftovers. The last line printed is the result::

    soak: kills=50 resumes=47 chains=9 failures=0 seconds=412

The functions here are also the harness of ``tests/e2e/test_crash_*.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from resumable import commit
from resumable.formats import v1, v2
from resumable.proctree import kill_tree
from resumable.errors import CorruptCheckpointError
from resumable.resolve import verify_files

#: Sizes that make a step a few milliseconds: the time goes into saving, which is what we kill.
TINY = ("model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64",
        "train_dataset.seq_length=32", "runner_config.batch_size=2", "lr_schedule.warmup_steps=1")

#: Named points of a save (resumable.commit.fault_point) and the scenarios that reach them.
V2_POINTS = ("one-file-written", "files-written", "before-rename", "after-rename", "atomic-write", "after-tracker",
             "retention-renamed")
ASYNC_POINTS = ("staged", *V2_POINTS)
LEGACY_POINTS = ("legacy-file-published", "legacy-before-meta", "atomic-write", "legacy-after-meta")

#: Damage done to the tracker's target (or the tracker) between two runs of a Checkpoint 2.0 chain.
DAMAGES = ("flip-shard", "truncate-shard", "flip-common", "flip-metadata", "garbage-tracker")

_RESUMED_RE = re.compile(r"resumed from (\S+) at global step (\d+)")
_LEFTOVER_DIR_RE = re.compile(r"^\.(tmp|old|del)-iteration_\d+$")
_TEMP_FILE_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


class Violation(AssertionError):
    """A crash-safety promise was broken; the message says which and where."""


@dataclass(frozen=True)
class Job:
    """One scenario: the same command is run again and again in one output folder."""

    name: str
    nproc: int = 1
    legacy: bool = False
    async_save: bool = False
    interval: int = 1
    stop_step: int = 10
    keep: int = 2

    @property
    def lost_bound(self) -> int:
        """Logged steps a kill may cost: one interval; two with async (one save may still be in flight)."""
        return self.interval * (2 if self.async_save else 1)

    @property
    def points(self) -> tuple[str, ...]:
        """The fault points this scenario's saves pass."""
        if self.legacy:
            return ("staged", *LEGACY_POINTS) if self.async_save else LEGACY_POINTS
        return ASYNC_POINTS if self.async_save else V2_POINTS

    def command(self, out: Path, discard: bool = False) -> list[str]:
        sets = [*TINY, f"output_dir={out}", f"load_checkpoint={out / 'checkpoint'}", "resume_training=true",
                f"runner_config.stop_step={self.stop_step}", f"callbacks.0.save_checkpoint_steps={self.interval}",
                f"callbacks.0.keep_checkpoint_max={self.keep}", f"callbacks.0.async_save={str(self.async_save).lower()}",
                f"use_legacy_format={str(self.legacy).lower()}",
                f"parallel_config.data_parallel={self.nproc}", "parallel_config.model_parallel=1",
                f"callbacks.0.discard_newer_checkpoints={str(discard).lower()}"]
        args = [x for kv in sets for x in ("--set", kv)]
        if self.nproc > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                    "-m", "resumable.train", *args]
        return [sys.executable, "-m", "resumable.train", *args]


SCENARIOS = (
    Job("v2-sync-1p", stop_step=30),
    Job("v2-async-1p", async_save=True, stop_step=30),
    Job("v2-sync-1p-keep1", keep=1, interval=2, stop_step=30),
    Job("legacy-1p", legacy=True, stop_step=30),
    Job("v2-sync-2p", nproc=2, stop_step=16),
    Job("v2-async-2p", nproc=2, async_save=True, stop_step=16),
    Job("legacy-2p-keep1", nproc=2, legacy=True, keep=1, stop_step=16),
    Job("legacy-async-2p", nproc=2, legacy=True, async_save=True, stop_step=16),
)


@dataclass
class Run:
    """What one run of a job did."""

    returncode: int
    killed: bool            # we (or its fault point) killed it
    log: str                # its stdout and stderr
    started_training: bool  # it logged at least one step
    training_s: float | None = None  # first logged step to exit (or kill)


#: file name -> xxh3-64 of its bytes, for one iteration folder.
Fingerprint = dict[str, str]


@dataclass
class Chain:
    """The state carried from one run of a job to the next."""

    job: Job
    out: Path
    expected_start: int = 0                    # the step the next run must resume from (0: fresh)
    last_logged: int = 0                       # the last step logged before the kill
    leftovers: set[tuple[str, int]] = field(default_factory=set)  # (path, inode) to be cleaned
    runs: int = 0
    found: dict[int, Fingerprint] = field(default_factory=dict)    # intact committed iterations before a run
    damaged: dict[int, Fingerprint] = field(default_factory=dict)  # iterations we damaged, as damaged
    tracker_damaged: bool = False  # the soak wrote garbage into the tracker (until a save replaces it)
    refusal_due: bool = False  # the next run must refuse to train over a damaged newer iteration
    discard: bool = False      # runs are told to discard damaged newer iterations
    damages: int = 0


def fingerprints(directory: Path) -> dict[int, Fingerprint]:
    """Every ``iteration_*`` folder of ``directory`` (committed or not) with its files' checksums."""
    found = {}
    for child in sorted(directory.glob("iteration_*")) if directory.is_dir() else []:
        n = commit.parse_iteration(child.name)
        if n is not None and child.is_dir():
            found[n] = {f.name: xxhash.xxh3_64_hexdigest(f.read_bytes()) for f in sorted(child.iterdir()) if f.is_file()}
    return found


def _flip(path: Path, rng: random.Random, start: int = 0) -> None:
    data = bytearray(path.read_bytes())
    i = rng.randrange(start, len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def damage(chain: Chain, rng: random.Random, kind: str | None = None) -> str | None:
    """Damage the tracker's target (or the tracker) of a Checkpoint 2.0 chain; the kind done, or None.

    ``kind``: one of :data:`DAMAGES` (default: drawn from ``rng``).

    Only when the tracker names the newest of at least two committed iterations (so there is
    an intact one to fall back to). Updates what the next run must do.
    """
    directory = chain.out / "checkpoint"
    committed = commit.committed_iterations(directory)
    try:
        target = commit.read_tracker(directory)
    except Exception:
        return None
    if len(committed) < 2 or target != committed[-1]:
        return None
    kind = kind or rng.choice(DAMAGES)
    folder = directory / commit.iteration_dirname(target)
    if kind == "garbage-tracker":
        (directory / commit.TRACKER).write_bytes(b"garbage\n")
        chain.tracker_damaged = True
    elif kind in ("flip-shard", "truncate-shard"):
        shards = sorted(p for p in folder.glob("*.safetensors") if p.stat().st_size > _data_start(p))
        if not shards:
            return None
        shard = rng.choice(shards)
        if kind == "flip-shard":
            _flip(shard, rng, _data_start(shard))
        else:
            os.truncate(shard, shard.stat().st_size - rng.randint(1, shard.stat().st_size - _data_start(shard)))
    else:
        _flip(folder / (v2.COMMON if kind == "flip-common" else v2.METADATA), rng)
    if kind != "garbage-tracker":
        chain.damaged[target] = fingerprints(directory)[target]
        chain.refusal_due = not chain.discard
        chain.expected_start = chain.last_logged = max(n for n in committed if n not in chain.damaged)
    chain.found = intact(chain)
    chain.damages += 1
    return kind


def _data_start(shard: Path) -> int:
    """Where the tensor bytes of a safetensors file begin (8-byte header length + header)."""
    with open(shard, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", commit.FAULT_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **(extra or {})}


def _records(out: Path) -> list[dict]:
    path = out / "log" / "train.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the kill
    return [r for r in records if "event" not in r]  # a run_start line between runs is no step


def run_job(job: Job, out: Path, *, kill_at: float | None = None, after_start: bool = True,
            fault: str | None = None, timeout: float = 180.0, discard: bool = False) -> Run:
    """Run ``job`` once in ``out``; SIGKILL its whole tree ``kill_at`` seconds after training started
    (``after_start``) or after launch, or let ``fault`` (``RESUMABLE_FAULT``) kill it."""
    out.mkdir(parents=True, exist_ok=True)
    before = len(_records(out))
    log_path = out / f"run-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(job.command(out, discard), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_env({commit.FAULT_ENV: fault} if fault else None))
        launched = time.monotonic()
        started: float | None = None
        killed = False
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - launched > timeout:
                    kill_tree(proc.pid)
                    proc.wait()
                    raise Violation(f"{job.name}: run did not finish in {timeout:.0f} s (a hang): "
                                    f"{log_path.read_text()[-3000:]}")
                if started is None and len(_records(out)) != before:
                    started = now
                base = started if after_start else launched
                if kill_at is not None and base is not None and now - base >= kill_at:
                    kill_tree(proc.pid)  # every process of the job at once, as a node failure would
                    proc.wait()
                    killed = True
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
    text = log_path.read_text()
    log_path.unlink()
    killed = killed or (fault is not None and f"{commit.FAULT_ENV}={fault}: killing" in text)
    ended = time.monotonic()
    return Run(proc.returncode, killed, text, started is not None or len(_records(out)) != before,
               ended - started if started is not None else None)


def leftovers(out: Path) -> set[tuple[str, int]]:
    """Temporary names of interrupted saves under the job's folders, with their inodes."""
    found = set()
    for root in (out / "checkpoint", out / v1.STRATEGY_DIR):
        if not root.is_dir():
            continue
        for path in [root, *root.rglob("*")]:
            if _LEFTOVER_DIR_RE.match(path.name) or _TEMP_FILE_RE.match(path.name):
                try:
                    found.add((str(path), path.stat().st_ino))
                except FileNotFoundError:
                    pass
    return found


def committed_step(job: Job, out: Path, damaged: Mapping[int, Fingerprint] | None = None,
                   tracker_damaged: bool = False) -> int:
    """Check the checkpoint a resume would load after a kill and return its global step (0: none yet).

    ``damaged``: iterations the soak damaged on purpose (not checked; never the answer);
    ``tracker_damaged``: the soak wrote garbage into the tracker, and no save replaced it yet.

    Raises:
        Violation: the tracker or a meta.json names something incomplete, or a checksum fails.
    """
    directory = out / "checkpoint"
    try:
        return _legacy_step(directory) if job.legacy else _v2_step(directory, damaged or {}, tracker_damaged)
    except Violation:
        raise
    except Exception as exc:  # any error reading what the crash left is a broken promise
        raise Violation(f"{job.name}: after a kill, {directory} is not loadable: {type(exc).__name__}: {exc}") from exc


def _v2_step(directory: Path, damaged: Mapping[int, Fingerprint], tracker_damaged: bool) -> int:
    intact = [n for n in commit.committed_iterations(directory) if n not in damaged]
    for n in intact:  # every committed folder is whole (retention renames first)
        folder = directory / commit.iteration_dirname(n)
        verify_files(folder, checksum=True)
        if v2.read_common(folder)["global_step"] != n:
            raise Violation(f"{folder}/common.json: global_step is not {n}")
    try:
        target = commit.read_tracker(directory)
    except CorruptCheckpointError:
        if not tracker_damaged:
            raise
        target = None  # the soak wrote garbage into it: the newest intact iteration is loaded
    if target is None or target in damaged:
        return intact[-1] if intact else 0
    if not commit.is_committed(directory / commit.iteration_dirname(target)):
        raise Violation(f"{directory / commit.TRACKER} names {target}, which is not committed")
    return target


def _legacy_step(directory: Path) -> int:
    from safetensors import safe_open

    from resumable.formats.safetensors_io import read_header
    from resumable.legacy import resolve_legacy

    ranks = sorted(directory.glob("rank_*")) if directory.is_dir() else []
    for folder in ranks:
        meta = folder / v1.META_JSON
        if meta.exists():
            name = json.loads(meta.read_text()).get("last_ckpt_file")
            if not isinstance(name, str) or not (folder / name).is_file():
                raise Violation(f"{meta} names {name!r}, which is not a file of {folder}")
    source = resolve_legacy(str(directory), True, output_dir=str(directory.parent))
    if source.fresh:
        return 0
    assert source.root is not None
    steps = set()
    for name in source.files:
        read_header(source.root / name)  # bounded, validated header: a torn file fails here
        with safe_open(str(source.root / name), framework="pt") as f:
            steps.add(int(f.get_tensor("global_step")))
    if len(steps) != 1:
        raise Violation(f"{directory}: the chosen files disagree on the global step: {sorted(steps)}")
    return steps.pop()


def _reported_cleaned(log: str, path: str) -> bool:
    """True when ``log`` says ``path`` was removed or restored (commit.clean_leftovers, save.prepare_temp)."""
    return any(path in line and ("leftover" in line or "stale" in line or "restored" in line)
               for line in log.splitlines())


def start_step(run: Run) -> int | None:
    """The step a run resumed from (0 for a fresh start), or None when it died before deciding."""
    m = _RESUMED_RE.search(run.log)
    if m:
        return int(m.group(2))
    return 0 if "fresh start" in run.log else None


def after_run(chain: Chain, run: Run) -> None:
    """Check one run against what the previous kill (or damage) left; then record what this run left.

    Raises:
        Violation: a broken promise (named).
    """
    job, out = chain.job, chain.out
    chain.runs += 1
    if chain.refusal_due and (not run.killed or run.started_training):
        _check_refusal(chain, run)
        return
    if run.started_training:
        began = start_step(run)
        if began != chain.expected_start:
            raise Violation(f"{job.name}: resumed from step {began}, expected {chain.expected_start} "
                            f"(the checkpoint the kill left)\n{run.log[-3000:]}")
        if began < chain.last_logged - job.lost_bound:
            raise Violation(f"{job.name}: resumed from step {began} but step {chain.last_logged} was logged; more "
                            f"than {job.lost_bound} step(s) lost")
        # The same name may exist again (this run's own save of that iteration, and file systems
        # reuse inode numbers): a leftover counts as cleaned when this run's log reports removing it.
        stale = {(path, ino) for path, ino in chain.leftovers & leftovers(out) if not _reported_cleaned(run.log, path)}
        if stale:
            raise Violation(f"{job.name}: leftovers of the previous kill survived the restart: {sorted(stale)}\n"
                            f"{run.log[-3000:]}")
        chain.leftovers = set()
    _check_nothing_lost(chain, run)
    if not run.killed:
        if run.returncode != 0:
            raise Violation(f"{job.name}: run failed (exit {run.returncode}) without being killed:\n{run.log[-3000:]}")
        return
    records = _records(out)
    chain.last_logged = records[-1]["global_step"] if records else 0
    chain.expected_start = committed_step(job, out, chain.damaged, chain.tracker_damaged)
    chain.leftovers |= leftovers(out)


def intact(chain: Chain) -> dict[int, Fingerprint]:
    """The committed iterations of the chain the soak did not damage, with their checksums."""
    directory = chain.out / "checkpoint"
    committed = set(commit.committed_iterations(directory))
    return {n: fp for n, fp in fingerprints(directory).items() if n in committed and n not in chain.damaged}


def _check_refusal(chain: Chain, run: Run) -> None:
    """The run after a damage must refuse to train over the damaged iteration and change nothing."""
    job, damaged = chain.job, sorted(chain.damaged)
    named = [commit.iteration_dirname(n) for n in damaged]
    if run.started_training or run.returncode == 0:
        raise Violation(f"{job.name}: trained although {named} (damaged, newer than step {chain.expected_start}) "
                        f"would be overwritten; expected a refusal\n{run.log[-3000:]}")
    if "discard_newer_checkpoints" not in run.log or not all(str(n) in run.log for n in damaged):
        raise Violation(f"{job.name}: the refusal names neither {named} nor discard_newer_checkpoints\n"
                        f"{run.log[-3000:]}")
    now = fingerprints(chain.out / "checkpoint")
    if any(now.get(n) != fp for n, fp in {**chain.found, **chain.damaged}.items()):
        raise Violation(f"{job.name}: the refused run changed the checkpoints on disk")
    chain.refusal_due, chain.discard = False, True


def _check_nothing_lost(chain: Chain, run: Run) -> None:
    """Every intact committed iteration the run found is still there, unchanged, unless retention
    deleted it behind ``keep`` newer committed ones or the run saved that iteration again."""
    job, directory = chain.job, chain.out / "checkpoint"
    now = fingerprints(directory)
    committed = commit.committed_iterations(directory)
    began = start_step(run)
    for n, fp in chain.found.items():
        if now.get(n) == fp:
            continue
        resaved = began is not None and n > began  # an interrupted commit, redone (or discarded)
        retired = n not in now and sum(m > n for m in committed) >= job.keep
        if not (resaved and (n in now or chain.discard)) and not retired:
            raise Violation(f"{job.name}: committed iteration {n} was {'changed' if n in now else 'deleted'} by a run "
                            f"that started from step {began} (committed now: {committed})\n{run.log[-3000:]}")
    chain.damaged = {n: fp for n, fp in chain.damaged.items() if now.get(n) == fp}
    tracker = directory / commit.TRACKER
    chain.tracker_damaged = chain.tracker_damaged and tracker.is_file() and tracker.read_bytes() == b"garbage\n"
    chain.found = intact(chain)


def check_finished(chain: Chain) -> None:
    """A run that was not killed: it trained to stop_step, committed it, and left nothing temporary."""
    job, out = chain.job, chain.out
    if chain.damaged:
        raise Violation(f"{job.name}: finished with the damaged iterations {sorted(chain.damaged)} still there")
    step = committed_step(job, out, tracker_damaged=chain.tracker_damaged)
    if step != job.stop_step:
        raise Violation(f"{job.name}: finished but the checkpoint to resume is step {step}, not {job.stop_step}")
    left = leftovers(out)
    if left:
        raise Violation(f"{job.name}: finished with leftovers {sorted(left)}")


def soak(kills: int, seed: int, root: Path, budget_s: float,
         damage_rate: float = 0.25) -> tuple[int, int, int, int, list[str]]:
    """Kill jobs ``kills`` times, damaging the checkpoint after a kill at ``damage_rate``;
    returns (kills, resumes, chains, damages, failures)."""
    rng = random.Random(seed)
    # Seconds of training (first logged step to exit) of an unharmed run, per scenario: random
    # kills are drawn inside it, so that they land while the job trains and saves.
    training_s = {job.name: 0.1 * job.stop_step * job.nproc for job in SCENARIOS}
    done_kills = resumes = chains = damages = 0
    failures: list[str] = []
    started = time.monotonic()
    while done_kills < kills and time.monotonic() - started < budget_s:
        job = rng.choice(SCENARIOS)
        chains += 1
        chain = Chain(job, root / f"chain{chains:03d}-{job.name}")
        try:
            for _ in range(12):  # a chain ends when a run finishes; bounded in case kills keep landing early
                draw = rng.random()
                if draw < 0.2:
                    point = rng.choice(job.points)
                    run = run_job(job, chain.out, fault=f"{point}:{rng.randint(1, 3)}", discard=chain.discard)
                elif draw < 0.3:
                    run = run_job(job, chain.out, kill_at=rng.uniform(0.5, 4.0), after_start=False,
                                  discard=chain.discard)
                else:
                    run = run_job(job, chain.out, kill_at=rng.uniform(0.1, 0.5) * training_s[job.name],
                                  discard=chain.discard)
                if run.started_training and start_step(run):
                    resumes += 1
                refusing = chain.refusal_due
                after_run(chain, run)
                if refusing and not chain.refusal_due:
                    continue  # it refused, as it must: the next run discards the damaged iteration
                if not run.killed:
                    check_finished(chain)
                    if run.training_s is not None and start_step(run) == 0:
                        training_s[job.name] = run.training_s
                    break
                done_kills += 1
                if not job.legacy and rng.random() < damage_rate:
                    damage(chain, rng)
                if done_kills >= kills:
                    break
            damages += chain.damages
            print(f"  chain {chains} {job.name}: {chain.runs} run(s), {chain.damages} damage(s), ok", flush=True)
        except Violation as exc:
            failures.append(f"chain {chains} {job.name}: {exc}")
            print(f"  chain {chains} {job.name}: FAILURE {str(exc)[:2000]}", flush=True)
        shutil.rmtree(chain.out, ignore_errors=True)
    return done_kills, resumes, chains, damages, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to deliver (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instants and scenarios")
    parser.add_argument("--damage", type=float, default=0.25,
                        help="chance of damaging the checkpoint after a kill (Checkpoint 2.0 chains; default 0.25)")
    parser.add_argument("--budget", type=float, default=900.0, help="stop starting chains after this many seconds")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="resumable-soak-") as tmp:
        kills, resumes, chains, damages, failures = soak(args.kills, args.seed, Path(tmp), args.budget, args.damage)
    for f in failures:
        print(f"FAILURE: {f}")
    print(f"soak: kills={kills} resumes={resumes} chains={chains} damages={damages} failures={len(failures)} "
          f"seconds={time.monotonic() - t0:.0f} seed={args.seed}", flush=True)
    return 1 if failures or kills < args.kills else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
