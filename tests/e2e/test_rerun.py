"""Running a ``resumable train`` command twice loses nothing.

Real one-process jobs (tiny model, stop_step 2-4): a fresh start into a folder holding an
earlier run's checkpoints is refused with one message quoting the command that resumes them;
that command (``resume_training: true`` alone) resumes from the job's own checkpoint folder
and appends to the earlier run's log; a weights-only checkpoint (``save_optimizer: false``,
a HuggingFace folder) under ``resume_training: true`` says what to set instead.
"""

from __future__ import annotations

import json
import shlex

from resumable.cli import main as cli
from resumable.commit import read_tracker
from tests.e2e.jobs import run_job, train_cmd

RESUME = ["runner_config.stop_step=2", "resume_training=true"]


def _error(done) -> str:
    """The job's one error line (the last of its stderr), checked to be its only report."""
    assert "Traceback" not in done.stderr
    return done.stderr.splitlines()[-1]


def test_the_same_command_twice_resumes_a_fresh_start_over_it_is_refused_and_logs_are_appended(tmp_path):
    out, ckpt, log = tmp_path / "job", tmp_path / "job" / "checkpoint", tmp_path / "job" / "log" / "train.jsonl"
    first = run_job(train_cmd(out, *RESUME))  # resume_training alone, nothing saved yet: a fresh start, said so
    assert ("INFO resumable.train.checkpointing: resume_training is true and load_checkpoint is empty: nothing to "
            f"resume in the job's checkpoint folder, fresh start ({ckpt} holds no checkpoint yet)\n") in first.stderr
    first_log = log.read_bytes()

    fresh = run_job(train_cmd(out, *RESUME[:1]), expect_ok=False)  # the same without resume_training
    resume = shlex.join(["resumable", "train", *train_cmd(out, *RESUME)[4:]])  # the first command
    assert fresh.returncode == 2
    assert _error(fresh) == (
        f"resumable train: error: {ckpt} holds the checkpoints of an earlier run (iteration_00000002) and this run "
        "starts at step 0 (resume_training is false): its saves would write over them. To continue that run from "
        f"iteration 2: {resume}. To start over, deleting them: add --set callbacks.0.discard_newer_checkpoints=true, "
        "or set another output_dir")
    assert log.read_bytes() == first_log and read_tracker(ckpt) == 2  # nothing written, nothing moved

    # The first command again, one step further (and saving weights only): it resumes, the log goes on.
    done = run_job(train_cmd(out, *RESUME, "runner_config.stop_step=3", "callbacks.0.save_optimizer=false"))
    assert ("INFO resumable.train.checkpointing: resume_training is true and load_checkpoint is empty: resuming from "
            f"the job's checkpoint folder {ckpt}\n") in done.stderr
    assert f"resumed from {ckpt / 'iteration_00000002'} at global step 2 " in done.stderr
    text = log.read_bytes()
    assert text.startswith(first_log)
    boundary, step = (json.loads(line) for line in text[len(first_log):].splitlines())
    assert sorted(boundary) == ["event", "start_step", "time"]
    assert (boundary["event"], boundary["start_step"], step["global_step"]) == ("run_start", 2, 3)
    # Each save and load: one event in log/checkpoints.jsonl (its fields: test_checkpoint_events) and a console line.
    events = [json.loads(line) for line in (out / "log" / "checkpoints.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["iteration"], e["mode"]) for e in events] == [
        ("save", 2, "sync"), ("load", 2, "sync"), ("save", 3, "sync")]
    assert all(f"INFO resumable.events: {what} iteration {n}: " in done.stderr
               for what, n in (("loaded", 2), ("saved", 3)))

    # Iteration 3 holds weights only: resuming from it says what to set, not which optimizer tensors it lacks.
    weights = run_job(train_cmd(out, *RESUME, "runner_config.stop_step=4"), expect_ok=False)
    it3 = ckpt / "iteration_00000003"
    assert weights.returncode == 2
    assert _error(weights) == (
        f"resumable train: error: {it3} was saved with save_optimizer: false: it holds weights only, and "
        "resume_training: true restores the whole training state (optimizer, step, data position). Set "
        f"resume_training: false, load_checkpoint: {it3} and another output_dir to start a new run from its weights")
    assert read_tracker(ckpt) == 3

    # A HuggingFace folder holds weights only too.
    hf, job = tmp_path / "hf", tmp_path / "from_hf"
    assert cli(["convert", "--to", "hf", "--quiet", str(it3), str(hf)]) == 0
    refused = run_job(train_cmd(job, *RESUME, f"load_checkpoint={hf}"), expect_ok=False)
    assert refused.returncode == 2
    assert _error(refused) == (
        f"resumable train: error: load_checkpoint {hf} holds weights only (its conversion, "
        f"{job / 'converted_checkpoint' / 'iteration_00000000'}, has no optimizer state), and resume_training: true "
        "restores the whole training state (optimizer, step, data position). Set resume_training: false to start a "
        "new run from its weights")


def test_legacy_a_fresh_start_over_an_earlier_runs_steps_is_refused_then_discarded_on_request(tmp_path):
    out, ckpt = tmp_path / "job", tmp_path / "job" / "checkpoint"
    legacy = ["use_legacy_format=true", "runner_config.stop_step=2"]
    run_job(train_cmd(out, *legacy))
    saved = sorted(p.name for p in (ckpt / "rank_0").iterdir())
    fresh = run_job(train_cmd(out, *legacy), expect_ok=False)  # the same command again: it would bury them
    resume = shlex.join(["resumable", "train", *train_cmd(out, *legacy, "resume_training=true")[4:]])
    assert fresh.returncode == 2
    assert _error(fresh) == (
        f"resumable train: error: {ckpt} holds the checkpoints of an earlier run (epoch 1 step 2) and this run "
        "starts at step 0 (resume_training is false): its saves would write over them. To continue that run from "
        f"epoch 1 step 2: {resume}. To start over, deleting them: add --set "
        "callbacks.0.discard_newer_checkpoints=true, or set another output_dir")
    assert sorted(p.name for p in (ckpt / "rank_0").iterdir()) == saved  # nothing written, nothing deleted
    again = run_job(train_cmd(out, *legacy, "callbacks.0.discard_newer_checkpoints=true"))
    assert "discard_newer_checkpoints: deleted" in again.stderr
